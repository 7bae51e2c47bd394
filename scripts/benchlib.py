"""Small shared helpers of the benchmark scripts: run a variant in its own process, read its memory."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any


def rss_mb() -> float:
    """Resident memory of this process now, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def start_peak_sampler(keys: tuple[str, ...] = ("VmRSS", "RssAnon"), every: float = 0.02) -> dict[str, int]:
    """Sample this process's /proc status every ``every`` s in a daemon thread; returns the live dict of peaks
    (kB; set a key to 0 to restart its peak). RssAnon excludes memory-mapped weight files, VmRSS counts them."""
    import threading
    import time

    peak = dict.fromkeys(keys, 0)

    def sample() -> None:
        while True:
            with open("/proc/self/status") as f:
                for line in f:
                    key = line.split(":")[0]
                    if key in peak:
                        peak[key] = max(peak[key], int(line.split()[1]))
            time.sleep(every)

    threading.Thread(target=sample, daemon=True).start()
    return peak


def run_child(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` (a child variant) and return the JSON object on its last stdout line."""
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-3000:])
        raise SystemExit(f"variant failed: {' '.join(cmd)}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_results(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # a kill mid-write leaves the previous results whole
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    print(f"\nwrote {path}")


def reference_data(lm: Any, st: dict[str, Any]) -> tuple[Any, Any]:
    """The quality benches' calibration (``st['calib_windows']`` seeded Austen windows without Persuasion) and
    evaluation windows (the first ``st['eval_tokens']`` of Persuasion), both of ``st['seq_len']`` tokens."""
    from importance.data.sources import load_data

    limit = getattr(lm.model.config, "max_position_embeddings", None)
    calib = load_data("austen:train", lm.tokenizer, seq_len=st["seq_len"], samples=st["calib_windows"],
                      seed=st["seed"], max_positions=limit)
    evals = load_data("austen:eval", lm.tokenizer, seq_len=st["seq_len"], tokens=st["eval_tokens"],
                      sampling="sequential", max_positions=limit)
    return calib, evals


def capped_child(args: Any, cap: str) -> tuple[Any, Any, dict[str, int]]:
    """A memory-measuring child's setup: peak sampler started first, ``args.threads`` threads, the model loaded
    in memory (``cap`` 'none') or under ``--max-memory cap``, and ``args.windows`` seeded ``args.data`` windows."""
    peak = start_peak_sampler()
    import torch

    torch.set_num_threads(args.threads)
    from importance.data.sources import load_data
    from importance.models.load import load_model

    lm = load_model(args.model, max_memory=None if cap == "none" else cap)
    windows = load_data(args.data, lm.tokenizer, seq_len=args.seq_len, samples=args.windows, seed=0)
    return lm, windows, peak


def add_reference_args(p: Any) -> None:
    """The reference-setting flags every quality benchmark takes (shared/protocol.md; None: the protocol's)."""
    p.add_argument("--calib-windows", type=int, default=None)
    p.add_argument("--eval-tokens", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
