"""Block-by-block passes: keep the calibration hidden states, run ONE block at a time over all of them.

The usual pass is batch-major (every batch goes through the whole model). Block-major order needs only
one block's weights at a time plus the hidden states ``[N, T, D]``: with a model whose blocks accelerate
offloaded to disk (``load_model(..., max_memory=...)``), each block is read from disk once and dropped
after, so peak memory is about one block plus the hidden states, not the model. It is also the order
sequential pruning needs (block l sees the outputs of the already-changed blocks before it).

* ``capture_block_inputs(model, mm, windows, batch_size)`` runs the model up to the first block once per
  batch and keeps what that block receives: the hidden states and every keyword argument (position
  embeddings, attention mask, cache position ...), plus the padding mask.
* ``forward_block(module, inputs)`` is one block's outputs for every batch, the inputs left as they are.
* ``run_blocks(mm, inputs, before, after)`` pushes the inputs through each block in turn, calling
  ``before(block)`` / ``after(block)`` around it (hook installation, pruning ...).
* ``collect_blockwise(...)`` is ``importance.engine.collect.collect`` for forward-only scorers (activation,
  magnitude, block_influence) in this order; its ``Statistics`` equal the usual pass's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from importance.arch.canonical import Block, ModelMap, model_map
from importance.data.sources import Windows
from importance.engine.collect import CollectConfig, Statistics, _Pass
from importance.errors import ImpruneError
from importance.models.load import input_device


@dataclass
class BlockInput:
    """What one block receives for one batch: ``hidden`` [B, T, D], its other arguments, ``mask`` [B, T]."""

    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    mask: torch.Tensor


class _Reached(Exception):
    """Raised by the capture hook to stop the forward at the first block."""


@torch.no_grad()
def capture_block_inputs(model: torch.nn.Module, mm: ModelMap, windows: Windows, batch_size: int) -> list[BlockInput]:
    """One forward per batch up to the first block; returns its inputs for every batch."""
    held: dict[str, Any] = {}

    def stop(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        kw = dict(kwargs)
        held["hidden"] = args[0] if args else kw.pop("hidden_states")
        held["args"] = tuple(args[1:])  # BERT passes its attention mask positionally
        held["kwargs"] = kw
        raise _Reached

    device = input_device(model)
    handle = mm.blocks[0].module.register_forward_pre_hook(stop, with_kwargs=True)
    out: list[BlockInput] = []
    try:
        for batch in windows.batches(batch_size):
            batch = batch.to(device)
            try:
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            except _Reached:
                pass
            else:
                raise ImpruneError("the forward never reached the first block; block-by-block mode cannot be used "
                                   "with this model")
            out.append(BlockInput(held.pop("hidden"), held.pop("args"), held.pop("kwargs"),
                                  batch.attention_mask.float()))
    finally:
        handle.remove()
    return out


@torch.no_grad()
def forward_block(module: torch.nn.Module, inputs: list[BlockInput],
                  on_batch: Callable[[BlockInput], Any] | None = None) -> list[torch.Tensor]:
    """``module``'s output hidden states [B, T, D] for every batch of ``inputs`` (which stay unchanged)."""
    outs = []
    for item in inputs:
        if on_batch:
            on_batch(item)
        y = module(item.hidden, *item.args, **item.kwargs)
        outs.append(y[0] if isinstance(y, tuple) else y)
    return outs


@torch.no_grad()
def run_blocks(mm: ModelMap, inputs: list[BlockInput], before: Callable[[Block], Any] | None = None,
               after: Callable[[Block], Any] | None = None, on_batch: Callable[[BlockInput], Any] | None = None,
               progress: bool = True) -> list[BlockInput]:
    """Push ``inputs`` through every block in order (in place: each entry ends as the last block's output)."""
    bar = tqdm(total=len(mm.blocks), desc="blocks", unit="block", disable=not progress, leave=False)
    try:
        for block in mm.blocks:
            if before:
                before(block)
            try:
                for item, y in zip(inputs, forward_block(block.module, inputs, on_batch), strict=True):
                    item.hidden = y
            finally:
                if after:
                    after(block)
            bar.update(1)
    finally:
        bar.close()
    return inputs


_FORWARD_ONLY = CollectConfig(grad=False)


def collect_blockwise(model: torch.nn.Module, windows: Windows, cfg: CollectConfig = _FORWARD_ONLY,
                      batch_size: int = 4, progress: bool = True, mm: ModelMap | None = None) -> Statistics:
    """Forward-only statistics in block-major order (the same sums as ``collect``)."""
    if cfg.grad:
        raise ImpruneError("block-by-block mode runs forward only: use the scorers activation, magnitude and "
                           "block_influence (taylor, fisher and residual_fisher need the usual pass)")
    mm = mm or model_map(model)
    stats = Statistics(meta={"collect": {**cfg.__dict__, "blockwise": True}, "batch_size": batch_size})
    run = _Pass(mm, cfg, stats)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        inputs = capture_block_inputs(model, mm, windows, batch_size)
        for item in inputs:
            stats.add("-|run|sequences", torch.tensor(float(item.mask.shape[0])))
            stats.add("-|run|tokens", item.mask.sum())
            stats.add("-|run|batches", torch.tensor(1.0))
        handles: list[Any] = []

        def before(block: Block) -> None:
            handles.extend(run.install(layers={block.index}))

        def after(block: Block) -> None:
            for h in handles:
                h.remove()
            handles.clear()

        def on_batch(item: BlockInput) -> None:
            run.mask, run.all_valid, run._last_x = item.mask, bool(item.mask.all()), None

        run_blocks(mm, inputs, before, after, on_batch, progress)
    finally:
        run._last_x = None
        model.train(was_training)
    stats.meta["seconds"] = time.perf_counter() - start
    return stats
