"""Block-by-block processing of a transformer: each block sees the inputs that the blocks before it produce.

``run_blocks`` captures, from ONE forward stopped at the first block, the hidden states and the keyword
arguments that block receives (attention mask, position embeddings, ...), per calibration batch. Then for
l = 0 .. L-1 it hands block l and its current inputs to ``step`` (gather statistics, prune, quantize ...)
and recomputes block l's outputs as the inputs of block l + 1: after ``step`` (sequential: later blocks see
what the already-changed blocks produce) or before it (dense propagation: every block sees the inputs of
the unchanged model, from the same loop).

Nothing here assumes that other blocks are resident: block l is reached only through ``blocks[l]`` (a
sequence, or ``load(l)`` when given) and released through ``release(l)``, so a caller can stream a model
larger than memory one block at a time. ``InputStatistics`` gathers per-module input statistics (sum of
x^2 per channel, and X^T X for second-order methods) from the block forwards, over non-padding tokens only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from importance.data import Windows
from importance.errors import ImpruneError


@dataclass
class BlockInputs:
    """What one block receives, per calibration batch: hidden [B, T, d], the call's other positional and
    keyword arguments, and the token mask [B, T] (True = a real token)."""

    hidden: list[torch.Tensor]
    args: list[tuple[Any, ...]]
    kwargs: list[dict[str, Any]]
    masks: list[torch.Tensor]

    def with_hidden(self, hidden: list[torch.Tensor]) -> BlockInputs:
        return BlockInputs(hidden, self.args, self.kwargs, self.masks)

    @property
    def n_tokens(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks))


class _Stop(Exception):
    """Raised by the capture hook: the rest of the model is not run."""


def _to(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_inputs(model: nn.Module, first_block: nn.Module, windows: Windows, batch_size: int = 4,
                   device: torch.device | str = "cpu") -> BlockInputs:
    """Run ``model`` on ``windows`` up to ``first_block`` and keep what that block receives, per batch."""
    got: dict[str, Any] = {}

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        if args:
            got["hidden"], got["args"] = args[0], args[1:]
        elif "hidden_states" in kwargs:
            got["hidden"], got["args"] = kwargs["hidden_states"], ()
        else:
            raise ImpruneError(f"cannot find the hidden states passed to {type(first_block).__name__}; "
                               "this block type is not supported by the block-by-block runner")
        got["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    inputs = BlockInputs([], [], [], [])
    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    was_training = model.training
    model.eval()
    try:
        for batch in windows.batches(batch_size):
            got.clear()
            with contextlib.suppress(_Stop):
                model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                      use_cache=False)
            if "hidden" not in got:
                raise ImpruneError("the model forward never reached its first block; cannot run block by block")
            kwargs = dict(got["kwargs"])
            kwargs.pop("use_cache", None)
            inputs.hidden.append(got["hidden"].detach())
            inputs.args.append(got["args"])
            inputs.kwargs.append(kwargs)
            inputs.masks.append(batch.attention_mask.to(device).bool())
    finally:
        handle.remove()
        model.train(was_training)
    return inputs


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def block_forward(block: nn.Module, inputs: BlockInputs, stats: InputStatistics | None = None) -> list[torch.Tensor]:
    """Block outputs per batch (hidden [B, T, d]); ``stats`` (if given) sees each batch's token mask."""
    outs = []
    for h, a, kw, m in zip(inputs.hidden, inputs.args, inputs.kwargs, inputs.masks, strict=True):
        if stats is not None:
            stats.mask = m
        outs.append(_output(block(h, *a, **kw)).detach())
    return outs


def run_blocks(model: nn.Module, blocks: Sequence[nn.Module], windows: Windows,
               step: Callable[[int, nn.Module, BlockInputs], None], sequential: bool = True, batch_size: int = 4,
               device: torch.device | str = "cpu", progress: bool = False,
               load: Callable[[int], nn.Module] | None = None, release: Callable[[int], None] | None = None) -> None:
    """Call ``step(l, block, inputs)`` for every block in order (see the module docstring)."""
    if not blocks:
        raise ImpruneError("the model has no blocks to process")
    first = load(0) if load else blocks[0]
    inputs = capture_inputs(model, first, windows, batch_size, device)
    was_training = model.training
    model.eval()
    try:
        for layer in tqdm(range(len(blocks)), desc="blocks", disable=not progress, leave=False):
            block = first if layer == 0 else (load(layer) if load else blocks[layer])
            outs = None if sequential else block_forward(block, inputs)
            step(layer, block, inputs)
            if layer + 1 < len(blocks):
                inputs = inputs.with_hidden(outs if outs is not None else block_forward(block, inputs))
            if release:
                release(layer)
    finally:
        model.train(was_training)


@dataclass
class InputStatistics:
    """Hooks on ``modules`` ({key: module}) summing, over non-padding tokens, x^2 per input channel ([in]) and,
    with ``hessian``, X^T X ([in, in], float64). Use as a context manager around ``block_forward``."""

    modules: dict[str, nn.Module]
    hessian: bool = False
    sq: dict[str, torch.Tensor] = field(default_factory=dict)
    xtx: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    mask: torch.Tensor | None = None
    _handles: list[Any] = field(default_factory=list)

    def _hook(self, key: str) -> Callable[..., None]:
        def fn(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()  # [B, T, in]
            x = x.reshape(-1, x.shape[-1])
            if self.mask is not None and self.mask.numel() == x.shape[0] and not bool(self.mask.all()):
                x = x[self.mask.reshape(-1)]
            sq = x.square().sum(0)  # [in]
            self.sq[key] = self.sq[key] + sq if key in self.sq else sq
            self.tokens[key] = self.tokens.get(key, 0) + x.shape[0]
            if self.hessian:
                xtx = (x.T @ x).double()  # [in, in]
                if key in self.xtx:
                    self.xtx[key] += xtx
                else:
                    self.xtx[key] = xtx

        return fn

    def __enter__(self) -> InputStatistics:
        self._handles = [m.register_forward_pre_hook(self._hook(k)) for k, m in self.modules.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
