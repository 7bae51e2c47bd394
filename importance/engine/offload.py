"""Weights that accelerate offloaded (``device_map`` with a memory cap): read them, write them, run without the hook.

accelerate keeps an offloaded module's parameters on the meta device and a copy in its hook's weights map
(CPU tensors, or memory-mapped files on disk) that it loads for each forward. ``importance.arch.canonical.Component``
reads and writes weights through these functions, so scorers and pruners never see the difference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from importance.errors import ImpruneError

__all__ = ["bare_forward", "is_offloaded", "offloaded_weight", "return_freed_memory", "write_offloaded_"]

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h)


def return_freed_memory(threshold: int = 64 * 1024) -> bool:
    """Ask glibc to serve allocations above ``threshold`` bytes with their own mappings, so that the memory of a
    block's weights, loaded for one forward and dropped after, goes back to the system at once instead of
    staying in the heap (measured on SmolLM2 pruned block by block under a cap: peak 898 -> 482 MB). The same
    as starting Python with ``MALLOC_MMAP_THRESHOLD_=65536``. No-op (False) where glibc is not the allocator."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def bare_forward(module: nn.Module) -> Iterator[nn.Module]:
    """Call ``module`` without accelerate's offload hook (which would reload the weights we pass)."""
    old = getattr(module, "_old_forward", None)
    if old is None or "forward" not in vars(module):
        yield module
        return
    wrapped = module.forward
    module.forward = old
    try:
        yield module
    finally:
        module.forward = wrapped


def _offload_map(module: nn.Module, param: str) -> Any:
    """The weights map of the accelerate hook that offloads ``module.<param>`` (None: not offloaded)."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or [hook]:
        weights = getattr(h, "weights_map", None) if getattr(h, "offload", False) else None
        if weights is not None and param in weights:
            return weights
    return None


def is_offloaded(model: nn.Module) -> bool:
    """True when accelerate keeps some of ``model``'s parameters offloaded (meta here, a copy in a hook)."""
    return any(p.device.type == "meta" for p in model.parameters()) and \
        any(hasattr(m, "_hf_hook") for m in model.modules())


def _not_loaded(path: str) -> ImpruneError:
    return ImpruneError(f"the weights of {path} are not loaded (meta tensors) and no offload copy was found; load the "
                        "model with importance.load_model(..., max_memory=...) or without device_map")


def offloaded_weight(module: nn.Module, param: str, path: str) -> torch.Tensor:
    """The CPU / disk copy of an offloaded parameter (accelerate keeps it in the module hook's weights map).

    A CPU copy is accelerate's own tensor (in-place changes stick); a disk copy is read afresh on every call,
    so changes must be stored back with ``write_offloaded_``."""
    weights = _offload_map(module, param)
    if weights is None:
        raise _not_loaded(path)
    return weights[param]


def write_offloaded_(module: nn.Module, param: str, value: torch.Tensor, path: str) -> None:
    """Make ``value`` the offloaded copy of ``module.<param>``, so accelerate's next load of it (forward,
    ``offloaded_weight``, ``save_pretrained``) sees it.

    CPU copies (a plain tensor in the weights map) are overwritten in place. A disk copy is rewritten with
    accelerate's ``offload_weight`` as ``<key>.dat`` in the loader's own offload folder and its index entry
    repointed there: the entry may point into the model folder's safetensors, which are never written.
    """
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, offload_weight

    weights, key = _offload_map(module, param), param
    if weights is None:
        raise _not_loaded(path)
    while isinstance(weights, PrefixedDataset):  # accelerate prefixes the model-wide map per module
        key, weights = weights.prefix + key, weights.dataset
    if isinstance(weights, OffloadedWeightsLoader):
        if key in weights.state_dict:  # offloaded to CPU memory
            weights = weights.state_dict
        elif key in weights.index:
            if weights.save_folder is None:
                raise ImpruneError(f"cannot store the changed weights of {path}: the model's disk offload has no "
                                   "folder of its own; load it with importance.load_model(..., max_memory=...)")
            offload_weight(value.detach(), key, weights.save_folder, weights.index)
            return
    current = weights.get(key)
    if not isinstance(current, torch.Tensor) or current.shape != value.shape:
        raise ImpruneError(f"cannot store the changed weights of {path} in accelerate's offload map "
                           f"({type(weights).__name__}); load the model without device_map to change it")
    if current is not value:
        current.copy_(value)
