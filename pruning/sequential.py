"""Sequential (block-by-block) pruning passes over the calibration data, on ``importance.blockwise``.

``run_sequential`` captures, from ONE forward per batch stopped at the first block, what that block
receives (``importance.blockwise.capture_block_inputs``). Then for l = 0 .. L-1 it hands block l and its
current inputs to ``step`` (gather statistics, prune ...) and recomputes block l's outputs as the inputs of
block l + 1: after ``step`` (sequential: later blocks see what the already-pruned blocks produce) or before
it (dense propagation: every block sees the inputs of the unchanged model, from the same loop). Blocks are
reached only through the model map, so a model whose blocks accelerate offloaded to disk is streamed one
block at a time.

``InputStatistics`` gathers per-module input statistics (sum of x^2 per input channel, and X^T X for
second-order methods) from the block forwards, over non-padding tokens only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from importance.arch import ModelMap
from importance.blockwise import BlockInput, capture_block_inputs, forward_block
from importance.data import Windows
from importance.errors import ImpruneError

Step = Callable[[int, nn.Module, list[BlockInput]], None]


@torch.no_grad()
def run_sequential(model: nn.Module, mm: ModelMap, windows: Windows, step: Step, sequential: bool = True,
                   batch_size: int = 4, progress: bool = False) -> None:
    """Call ``step(l, block, inputs)`` for every block in order (see the module docstring)."""
    if not mm.blocks:
        raise ImpruneError("the model has no blocks to process")
    was_training = model.training
    model.eval()
    try:
        inputs = capture_block_inputs(model, mm, windows, batch_size)
        last = len(mm.blocks) - 1
        for block in tqdm(mm.blocks, desc="blocks", disable=not progress, leave=False):
            dense_out = None if sequential or block.index == last else forward_block(block.module, inputs)
            step(block.index, block.module, inputs)
            if block.index < last:
                outs = dense_out if dense_out is not None else forward_block(block.module, inputs)
                for item, y in zip(inputs, outs, strict=True):
                    item.hidden = y
    finally:
        model.train(was_training)


@dataclass
class InputStatistics:
    """Hooks on ``modules`` ({key: module}) summing, over non-padding tokens, x^2 per input channel ([in]) and,
    with ``hessian``, X^T X ([in, in], float64). Use as a context manager around ``gather``."""

    modules: dict[str, nn.Module]
    hessian: bool = False
    sq: dict[str, torch.Tensor] = field(default_factory=dict)
    xtx: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    mask: torch.Tensor | None = None  # [B, T] bool, True = a real token
    _handles: list[Any] = field(default_factory=list)

    def _hook(self, key: str) -> Callable[..., None]:
        def fn(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()  # [B, T, in]
            x = x.reshape(-1, x.shape[-1])  # [B*T, in]
            if self.mask is not None and self.mask.numel() == x.shape[0] and not bool(self.mask.all()):
                x = x[self.mask.reshape(-1).to(x.device)]
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

    def gather(self, block: nn.Module, inputs: list[BlockInput]) -> None:
        """Run ``block`` over ``inputs`` (outputs dropped) so the hooks see every batch with its mask."""

        def on_batch(item: BlockInput) -> None:
            self.mask = item.mask.bool()

        forward_block(block, inputs, on_batch)

    def __enter__(self) -> InputStatistics:
        self._handles = [m.register_forward_pre_hook(self._hook(k)) for k, m in self.modules.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
