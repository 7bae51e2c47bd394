"""Sequential (block-by-block) pruning passes over the calibration data, on ``importance.engine.blockwise``.

``run_sequential`` captures, from ONE forward per batch stopped at the first block, what that block
receives (``importance.engine.blockwise.capture_block_inputs``). Then for l = 0 .. L-1 it runs block l over its
current inputs with the hooks of ``observe(l, block)`` installed (an ``InputStatistics``: sums of x^2 per input
channel, and X^T X for second-order methods, over non-padding tokens), hands the block and those statistics
to ``step`` (prune ...), and makes block l's outputs the inputs of block l + 1: recomputed after ``step``
(sequential: later blocks see what the already-pruned blocks produce), or the outputs of the statistics pass
itself (dense propagation: every block sees the inputs of the unchanged model, one forward per block).
Blocks are reached only through the model map, so a model whose blocks accelerate offloaded to disk is
streamed one block at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from importance.arch.canonical import ModelMap
from importance.data.sources import Windows
from importance.engine.blockwise import BlockInput, capture_block_inputs, forward_block
from importance.errors import ImpruneError

Step = Callable[[int, nn.Module, list[BlockInput], "InputStatistics | None"], None]
Observe = Callable[[int, nn.Module], "InputStatistics | None"]


@torch.no_grad()
def run_sequential(model: nn.Module, mm: ModelMap, windows: Windows, step: Step, sequential: bool = True,
                   batch_size: int = 4, progress: bool = False, observe: Observe | None = None) -> None:
    """Call ``step(l, block, inputs, stats)`` for every block in order (see the module docstring); ``stats`` is
    what ``observe(l, block)`` returned, filled by block l's forward over ``inputs``, or None."""
    if not mm.blocks:
        raise ImpruneError("the model has no blocks to process")
    was_training = model.training
    model.eval()
    try:
        inputs = capture_block_inputs(model, mm, windows, batch_size)
        last = len(mm.blocks) - 1
        for block in tqdm(mm.blocks, desc="blocks", disable=not progress, leave=False):
            stats = observe(block.index, block.module) if observe else None
            outs = None
            if stats is not None or (not sequential and block.index < last):  # statistics / dense outputs
                with contextlib.nullcontext() if stats is None else stats:
                    outs = forward_block(block.module, inputs, stats.see if stats is not None else None)
            step(block.index, block.module, inputs, stats)
            if block.index < last:
                if sequential:
                    outs = forward_block(block.module, inputs)  # what the changed block produces
                for item, y in zip(inputs, outs, strict=True):
                    item.hidden = y
    finally:
        model.train(was_training)


@dataclass
class InputStatistics:
    """Hooks on ``modules`` ({key: module}) summing, over non-padding tokens, x^2 per input channel ([in]) and,
    with ``hessian``, X^T X ([in, in], float64). Installed as a context manager around a block forward."""

    modules: dict[str, nn.Module]
    hessian: bool = False
    sq: dict[str, torch.Tensor] = field(default_factory=dict)
    xtx: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    mask: torch.Tensor | None = None  # [B, T] bool, True = a real token
    _handles: list[Any] = field(default_factory=list)
    _last: tuple | None = None  # (tag, input, sums) of the last hook call

    def _hook(self, key: str) -> Callable[..., None]:
        def fn(_module: nn.Module, args: tuple) -> None:
            sq, n, xtx = self._sums(args[0])
            self.sq[key] = self.sq[key] + sq if key in self.sq else sq
            self.tokens[key] = self.tokens.get(key, 0) + n
            if self.hessian:
                if key in self.xtx:
                    self.xtx[key] += xtx
                else:
                    self.xtx[key] = xtx.clone()  # its own sum: the computed X^T X may be shared

        return fn

    def _sums(self, inp: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """x^2 per channel [in], token count and X^T X [in, in] (float64) of one call's input; modules fed the
        very same tensor (q / k / v, gate / up) share one computation (the inputs' identity and version)."""
        tag = (id(inp), inp._version, None if self.mask is None else id(self.mask))
        if self._last is not None and self._last[0] == tag and self._last[1] is inp:
            return self._last[2]
        x = inp.detach().float()  # [B, T, in]
        x = x.reshape(-1, x.shape[-1])  # [B*T, in]
        if self.mask is not None and self.mask.numel() == x.shape[0] and not bool(self.mask.all()):
            x = x[self.mask.reshape(-1).to(x.device)]
        sums = (x.square().sum(0), x.shape[0], (x.T @ x).double() if self.hessian else None)
        self._last = (tag, inp, sums)
        return sums

    def see(self, item: BlockInput) -> None:
        """Before each batch of a block forward: its padding mask, so the hooks count real tokens only."""
        self.mask = item.mask.bool()

    def __enter__(self) -> InputStatistics:
        self._handles = [m.register_forward_pre_hook(self._hook(k)) for k, m in self.modules.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._last = None
