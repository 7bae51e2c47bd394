"""Width reconstruction: after heads / KV groups / MLP channels leave a block, re-fit what consumes them.

Removing query heads removes input columns of the attention output projection (``attn.o``), removing MLP
channels removes input columns of ``mlp.down``; the kept heads' / channels' own outputs do not change (heads
and channels are independent), so the kept columns K of the consumer W [out, in] can be re-solved so that the
block's output moves as little as possible on the calibration inputs X [n, in] of that consumer:

    W_K' = argmin ||X W^T - X_K W_K'^T||^2  =  W H[:, K] H[K, K]^-1,   H = X^T X

(the structured optimal-brain-surgeon update), damped as SparseGPT damps its Hessian
(``pruning.second_order.core.solve_kept_columns``). The blocks are visited in order by the sequential runner
(``pruning.second_order.sequential.run_sequential``): block l's statistics come from its DENSE weights run on
the outputs of the already-pruned blocks 0 .. l-1. Within a block the attention goes first; when the block
also loses MLP channels, the MLP's statistics are then gathered again behind the cut (and re-fitted)
attention, one more block forward. Everything is reached through the canonical map (``attn.o`` / ``mlp.down``
views: Conv1D and fused layouts are handled there), and structured pruning keeps the whole model in memory.
"""

from __future__ import annotations

import torch
from torch import nn

from importance.arch.canonical import Block, Component, model_map
from importance.data.sources import Windows
from importance.engine.blockwise import BlockInput, forward_block
from importance.errors import ImpruneError
from importance.models.load import LoadedModel
from pruning.methods.surgery import cut_block
from pruning.second_order.core import output_error, solve_kept_columns
from pruning.second_order.sequential import InputStatistics, run_sequential

CONSUMERS = {"heads": "attn.o", "channels": "mlp.down"}


def kept_columns(block: Block, heads: list[int], channels: list[int]) -> dict[str, torch.Tensor]:
    """{consumer component: kept input columns [k]} for the heads / channels that leave ``block``."""
    out: dict[str, torch.Tensor] = {}
    if heads:
        d, n = block.head_dim, block.components["attn.o"].shape[1]
        dropped = {h * d + i for h in heads for i in range(d)}
        out["attn.o"] = torch.tensor([j for j in range(n) if j not in dropped], dtype=torch.long)
    if channels:
        n = block.components["mlp.down"].shape[1]
        gone = set(channels)
        out["mlp.down"] = torch.tensor([j for j in range(n) if j not in gone], dtype=torch.long)
    return out


@torch.no_grad()
def refit_(comp: Component, keep: torch.Tensor, xtx: torch.Tensor, n_tokens: int, damp: float) -> dict[str, float]:
    """Overwrite the kept columns ``keep`` of ``comp``'s weight with their least-squares values (the removed
    columns are left for the cut); returns the consumer's output error sum ||X dW^T||^2 with and without it."""
    w = comp.weight.detach().float()  # [out, in]
    new = solve_kept_columns(w, xtx, n_tokens, keep, damp)  # [out, k]
    plain = w.clone()
    gone = torch.ones(w.shape[1], dtype=torch.bool)
    gone[keep] = False
    plain[:, gone] = 0.0
    fitted = plain.clone()
    fitted[:, keep] = new
    errors = {"plain": output_error(w - plain, xtx), "fitted": output_error(w - fitted, xtx)}
    comp.update_weight_(lambda cur: cur.index_copy(1, keep.to(cur.device), new.to(cur.dtype).to(cur.device)))
    return errors


def _stats(block: Block, names: list[str]) -> InputStatistics | None:
    mods: dict[str, nn.Module] = {n: block.components[n].module for n in names if n in block.components}
    return InputStatistics(mods, hessian=True) if mods else None


@torch.no_grad()
def cut_and_refit(lm: LoadedModel, cuts: dict[int, tuple[list[int], list[int], list[int]]], windows: Windows | None,
                  batch_size: int = 4, damp: float = 0.01, progress: bool = False) -> dict[int, dict[str, float]]:
    """Cut ``cuts`` ({layer: (heads, kv_heads, channels)}) block by block, re-fitting each consumer first (see
    the module docstring). Returns {layer: {'attn.o plain', 'attn.o fitted', ...: output error}}; the config
    is left to the caller."""
    if windows is None:
        raise ImpruneError("--reconstruct needs calibration data: pass --data (e.g. austen:train), or drop it "
                           "with --no-reconstruct")
    if not 0 < damp < 1:
        raise ImpruneError(f"--damp {damp} is outside (0, 1); e.g. 0.01")
    model = lm.model
    mm = model_map(model)
    report: dict[int, dict[str, float]] = {}

    def observe(layer: int, module: nn.Module) -> InputStatistics | None:
        heads, _kv, channels = cuts.get(layer, ([], [], []))
        names = ["attn.o"] if heads else []
        names += ["mlp.down"] if channels and not heads else []  # behind a cut attention: gathered again
        return _stats(mm.blocks[layer], names) if names else None

    def step(layer: int, module: nn.Module, inputs: list[BlockInput], st: InputStatistics | None) -> None:
        heads, kv, channels = cuts.get(layer, ([], [], []))
        if not (heads or kv or channels):
            return
        block = mm.blocks[layer]  # not cut yet: its geometry is the dense one
        errs = report.setdefault(layer, {})
        keep = kept_columns(block, heads, [])
        if heads:
            errs.update(_refit(block, "attn.o", keep["attn.o"], st, damp))
        if heads or kv:
            cut_block(mm, layer, heads, kv, ())
        if channels:
            block = model_map(model).blocks[layer]
            st2 = st
            if heads:  # the MLP now sees what the cut attention gives
                st2 = _stats(block, ["mlp.down"])
                with st2:
                    forward_block(module, inputs, st2.see)
            keep = kept_columns(block, [], channels)
            errs.update(_refit(block, "mlp.down", keep["mlp.down"], st2, damp))
            cut_block(model_map(model), layer, (), (), channels)

    run_sequential(model, mm, windows, step, sequential=True, batch_size=batch_size, progress=progress,
                   observe=observe)
    return report


def _refit(block: Block, name: str, keep: torch.Tensor, st: InputStatistics | None, damp: float) -> dict[str, float]:
    if st is None or name not in st.xtx:
        raise ImpruneError(f"layer {block.index}: no calibration statistics reached its {name} (no real tokens?)")
    errs = refit_(block.components[name], keep, st.xtx[name], st.tokens[name], damp)
    return {f"{name} {k}": v for k, v in errs.items()}
