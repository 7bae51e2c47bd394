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
attention, one more block forward.

``select='obs'`` keeps how many units leave each layer but re-chooses WHICH, with the re-fit in mind: in block
l, on the very statistics the re-fit then uses, the units whose removal the least-squares fit recovers best
(``pruning.second_order.core.obs_select``, greedy with Hessian downdates): whole KV groups where the plan
removes KV groups (their query heads' o columns), the same number of query heads from every KV group where
it removes heads per group, single channels of ``mlp.down``; the greedy's summed cost is reported as
'<consumer> obs' (the output error plus the damping term, so above the 'fitted' one). Everything is reached
through the canonical map (``attn.o`` / ``mlp.down`` views: Conv1D and fused layouts are handled there), and
structured pruning keeps the whole model in memory.
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
from pruning.second_order.core import obs_select, output_error, solve_kept_columns
from pruning.second_order.sequential import InputStatistics, run_sequential

CONSUMERS = {"heads": "attn.o", "channels": "mlp.down"}
SELECTIONS = ("fisher", "obs")  # the plan's ranking as it is, or the OBS choice with the same counts
Cut = tuple[list[int], list[int], list[int]]  # (query heads, KV heads, MLP channels) of one layer


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
def cut_and_refit(lm: LoadedModel, cuts: dict[int, Cut], windows: Windows | None, batch_size: int = 4,
                  damp: float = 0.01, progress: bool = False,
                  select: str = "fisher") -> tuple[dict[int, dict[str, float]], dict[int, Cut]]:
    """Cut ``cuts`` ({layer: (heads, kv_heads, channels)}) block by block, re-fitting each consumer first;
    with ``select='obs'`` only the counts of ``cuts`` are kept (see the module docstring). Returns
    ({layer: {'attn.o plain', 'attn.o fitted', ...: output error}}, {layer: the cut made}); the config is left
    to the caller."""
    if select not in SELECTIONS:
        raise ImpruneError(f"unknown --select '{select}'; use one of {', '.join(SELECTIONS)}")
    if windows is None:
        raise ImpruneError("--reconstruct needs calibration data: pass --data (e.g. austen:train), or drop it "
                           "with --no-reconstruct")
    if not 0 < damp < 1:
        raise ImpruneError(f"--damp {damp} is outside (0, 1); e.g. 0.01")
    model = lm.model
    mm = model_map(model)
    report: dict[int, dict[str, float]] = {}
    made: dict[int, Cut] = {}

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
        if select == "obs" and heads:
            heads, kv = _obs_heads(block, heads, kv, _xtx(block, "attn.o", st), damp, errs)
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
            if select == "obs":
                channels = _obs_channels(block, len(channels), _xtx(block, "mlp.down", st2), damp, errs)
            keep = kept_columns(block, [], channels)
            errs.update(_refit(block, "mlp.down", keep["mlp.down"], st2, damp))
            cut_block(model_map(model), layer, (), (), channels)
        made[layer] = (heads, kv, channels)

    run_sequential(model, mm, windows, step, sequential=True, batch_size=batch_size, progress=progress,
                   observe=observe)
    return report, made


def _xtx(block: Block, name: str, st: InputStatistics | None) -> tuple[torch.Tensor, int]:
    """X^T X [in, in] and token count of ``name``'s calibration inputs in ``block``, or a one-line error."""
    if st is None or name not in st.xtx:
        raise ImpruneError(f"layer {block.index}: no calibration statistics reached its {name} (no real tokens?)")
    return st.xtx[name], st.tokens[name]


def _refit(block: Block, name: str, keep: torch.Tensor, st: InputStatistics | None, damp: float) -> dict[str, float]:
    xtx, n = _xtx(block, name, st)
    errs = refit_(block.components[name], keep, xtx, n, damp)
    return {f"{name} {k}": v for k, v in errs.items()}


def _obs_heads(block: Block, heads: list[int], kv: list[int], stats: tuple[torch.Tensor, int], damp: float,
               errs: dict[str, float]) -> tuple[list[int], list[int]]:
    """The OBS choice of as many attention units as the plan removes: KV groups (all their query heads'
    o columns) when it removes KV groups, else the same number of query heads from every KV group."""
    d, h, n_kv = block.head_dim, block.n_heads, block.n_kv_heads
    g = h // n_kv
    cols = torch.arange(h * d)  # attn.o input columns, head-major
    w = block.components["attn.o"].weight
    if kv:  # whole KV groups (also without GQA: one head per group)
        picked, cost = obs_select(w, *stats, cols.view(n_kv, g * d), len(kv), damp=damp)
        kv = sorted(picked)
        heads = [q for j in kv for q in range(j * g, (j + 1) * g)]
    else:  # --gqa per-group: every KV group loses len(heads) / n_kv of its query heads
        picked, cost = obs_select(w, *stats, cols.view(h, d), len(heads) // n_kv, torch.arange(h) // g, damp)
        heads = sorted(picked)
    errs["attn.o obs"] = cost
    return heads, kv


def _obs_channels(block: Block, count: int, stats: tuple[torch.Tensor, int], damp: float,
                  errs: dict[str, float]) -> list[int]:
    """The OBS choice of ``count`` MLP channels (single ``mlp.down`` columns)."""
    n = block.components["mlp.down"].shape[1]
    picked, cost = obs_select(block.components["mlp.down"].weight, *stats, torch.arange(n).view(n, 1), count,
                              damp=damp)
    errs["mlp.down obs"] = cost
    return sorted(picked)
