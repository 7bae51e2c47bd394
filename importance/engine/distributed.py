"""Data-parallel scoring through accelerate: shard the calibration windows, all-reduce the sums.

Every accumulator of ``importance.engine.stats.Statistics`` is a plain sum over sequences, so N processes that
each score a disjoint shard of the windows end with exactly the statistics of one process scoring them all
once their sums are added. This module only does the three things that needs, on top of accelerate's
process state (no distribution layer of our own):

* ``process_state()`` - accelerate's ``PartialState`` when the process was started by a launcher
  (``accelerate launch``, ``torchrun``), else None; a launch whose process group cannot start is an
  ``ImpruneError`` naming the fix.
* ``shard_windows(windows, batch_size, rank, world)`` - whole batches dealt round-robin, so each
  process keeps the batch boundaries of the 1-process run (``fisher_unit='batch'`` stays identical).
* ``all_reduce_statistics(stats)`` - the union of keys agreed across processes (an MoE expert never routed
  on one shard has no key there), then bucketed SUM all-reduces of the flattened fp32 sums.

``launch_command(argv, processes)`` builds the ``accelerate launch`` line ``imprune score --processes N``
runs; ``check_processes`` refuses, before anything is launched, a count larger than the calibration batches,
the CPU cores this process may use, the visible GPUs, or what the available memory holds at about
``worker_memory(model bytes)`` per worker.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

import torch

from importance.data.sources import Windows
from importance.errors import ImpruneError

_BUCKET = 1 << 24  # floats per all-reduce call (64 MiB of fp32)
_WORKER_BASE = 512 << 20  # python, torch and transformers in one worker before the model
_WORKER_FACTOR = 3  # weights + gradients + statistics and activations, in units of the weights' bytes


def launched() -> bool:
    """True inside a multi-process launch (accelerate launch / torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state() -> Any | None:
    """accelerate's ``PartialState`` for a multi-process launch, else None (a plain single process)."""
    if not launched():
        return None
    try:
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
    except Exception as err:  # noqa: BLE001 - any init failure becomes one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ImpruneError(f"the multi-process launch could not start its process group ({first}); run "
                           "`accelerate config` or use `imprune score --processes N`, which configures it") from None
    return state if state.num_processes > 1 else None


def shard_windows(windows: Windows, batch_size: int, rank: int, world: int) -> Windows:
    """Batches ``rank, rank + world, ...`` of ``windows`` (whole batches, so boundaries match 1 process)."""
    n_batches = -(-len(windows.input_ids) // batch_size)
    if world > n_batches:
        raise ImpruneError(f"{world} processes but only {n_batches} calibration batches of {batch_size}; "
                           f"use --processes {max(1, n_batches)} or fewer, or more --tokens / a smaller --batch-size")
    idx = [i for b in range(rank, n_batches, world)
           for i in range(b * batch_size, min((b + 1) * batch_size, len(windows.input_ids)))]
    return windows.subset(idx)


def all_reduce_statistics(stats: Any, state: Any) -> Any:
    """Sum ``stats.sums`` over every process in place (same keys everywhere afterwards); returns ``stats``."""
    from accelerate.utils import gather_object

    local = {k: tuple(v.shape) for k, v in stats.sums.items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for part in gather_object([local]):
        for k, shape in part.items():
            if shapes.setdefault(k, shape) != shape:
                raise ImpruneError(f"processes disagree on the shape of '{k}' ({shapes[k]} vs {shape}); every "
                                   "process must load the same model")
    keys = sorted(shapes)
    bucket: list[str] = []
    size = 0
    for k in keys:
        n = max(1, int(torch.Size(shapes[k]).numel()))
        if bucket and size + n > _BUCKET:
            _reduce_bucket(stats, bucket, shapes, state.device)
            bucket, size = [], 0
        bucket.append(k)
        size += n
    if bucket:
        _reduce_bucket(stats, bucket, shapes, state.device)
    seconds = gather_object([float(stats.meta.get("seconds", 0.0))])
    stats.meta["seconds"] = max(seconds)
    stats.meta["processes"] = state.num_processes
    return stats


def _reduce_bucket(stats: Any, keys: list[str], shapes: dict[str, tuple[int, ...]], device: torch.device) -> None:
    import torch.distributed as dist

    parts = []
    for k in keys:
        v = stats.sums.get(k)
        parts.append((v.float() if v is not None else torch.zeros(shapes[k])).reshape(-1).to(device))
    flat = torch.cat(parts)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for k, p in zip(keys, parts):
        n = p.numel()
        home = stats.sums[k].device if k in stats.sums else torch.device("cpu")
        stats.sums[k] = flat[offset:offset + n].reshape(shapes[k]).to(home)
        offset += n


def launch_command(argv: list[str], processes: int) -> list[str]:
    """``accelerate launch`` line that reruns ``imprune <argv>`` (without --processes) in N processes."""
    if shutil.which("accelerate") is None and not _has_accelerate():
        raise ImpruneError("--processes needs accelerate's launcher; `pip install accelerate` (or run "
                           "`accelerate launch -m pruning score ...` yourself)")
    # accelerate's multi-process launcher (torch.distributed.run underneath); on a machine without CUDA
    # every process is a CPU worker and PartialState(cpu=True) joins them over gloo
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port())]
    return cmd + ["-m", "pruning", *argv]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _has_accelerate() -> bool:
    try:
        import accelerate.commands.launch  # noqa: F401
    except ImportError:
        return False
    return True


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def available_memory() -> int | None:
    """Bytes of memory available to new processes (psutil, else /proc/meminfo MemAvailable); None if unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def worker_memory(model_bytes: int) -> int:
    """About what one scoring worker needs: its copy of the weights, gradients, statistics and the runtime."""
    return _WORKER_BASE + _WORKER_FACTOR * int(model_bytes)


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_processes(processes: int, batches: dict[str, tuple[int, str]] | None = None,
                    model_bytes: int | None = None) -> None:
    """Refuse ``--processes`` larger than what the work and the machine allow (one line with the largest allowed
    value), before any process is started. ``batches``: {what: (count, how to get more)}, e.g. the calibration
    batches; ``model_bytes``: the weights one worker loads (memory per worker, ``worker_memory``)."""
    if processes <= 1:
        return
    cpus = usable_cpus()
    if processes > cpus:
        raise ImpruneError(f"--processes {processes} is more than the {cpus} CPU core(s) this machine lets imprune "
                           f"use; use --processes {cpus} or fewer")
    if torch.cuda.is_available() and processes > torch.cuda.device_count():
        gpus = torch.cuda.device_count()
        raise ImpruneError(f"--processes {processes} needs one GPU each but {gpus} are visible; use --processes "
                           f"{gpus} or fewer")
    for what, (count, more) in (batches or {}).items():
        if processes > count:
            raise ImpruneError(f"--processes {processes} but only {count} {what}; each process needs at least one: "
                               f"use --processes {max(1, count)} or fewer, or {more}")
    free = available_memory()
    if model_bytes is not None and free is not None:
        per = worker_memory(model_bytes)
        if processes * per > free:
            raise ImpruneError(f"--processes {processes} needs about {_size(processes * per)} of memory ({_size(per)} "
                               f"per worker for the {_size(model_bytes)} of weights and working memory) but "
                               f"{_size(free)} is available; use --processes {max(1, free // per)} or fewer")
