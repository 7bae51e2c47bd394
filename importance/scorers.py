"""Scorers: pure functions of the collected ``Statistics`` (and the weights), one registry.

N = number of predicted (loss) tokens; g_b = gradient of the summed token NLL of sequence b, so
sum_b g_b / N is the gradient of the mean token NLL. For a group G of parameters (an output channel with
its bias, a head = its q rows + o columns, a KV group = k/v rows + its query heads, an MLP channel =
gate row + up row + down column, an expert, a component, a whole block):

  magnitude         element |w|                               group  sum over G of |w|
  activation        element |w_ij| * ||x_j||_2 (Wanda)        group  sum over G of the element scores
                    (norm weights: ||y_j||_2 = |w_j| ||x_hat_j||_2); raw input/output channel norms kept too
  taylor            element |w * sum_b g_b| / N               group  |sum_b sum_{p in G} w_p g_b,p| / N
                    = first-order change of the mean NLL when the group is set to zero
  fisher            element sum_b g_b^2 / N                   group  sum_b (sum_{p in G} w_p g_b,p)^2 / N
                    (empirical Fisher diagonal; ``obd``: w^2 F / 2)   = the Fisher of a mask on the group
  block_influence   layer  mean over tokens of 1 - cos(block input, block output)
  residual_fisher   layer  sum_b sum_t (g_bt . delta_bt)^2 / N, delta_bt = block output - block input at token t
                    and g_bt the gradient of sequence b's summed NLL there: the Fisher of a separate gate on the
                    block's residual update at every token, summed over tokens (a second-order estimate of the
                    loss change when the whole update is removed, without cross-token cancellation)
  removal           layer  measured: mean token NLL increase on (the first ``removal_tokens`` of) the calibration
                    windows when the block is bypassed (output = input); the perplexity criterion of depth
                    pruning, L partial forwards with the cached-input replay of ``importance.validate.ablation``

  token_fisher      head / KV group / MLP channel only: sum_b sum_t (g_bt . y_bt)^2 / N, y_bt the group's slice of
                    the attn.o (mlp.down) input at token t and g_bt the gradient there: the Fisher of a separate gate
                    on the group's output at every token (``importance.engine.gates``); a KV group gates its query
                    heads together
  token_second_order  head / KV group / MLP channel only: the second-order Taylor estimate of the mean-NLL change
                    when the group's gates a_bt go from 1 to 0 (removal: da = -1 at every token),
                        dL ~= sum_bt [ -dL/da_bt + 1/2 d2L/da_bt^2 ] = ( -sum_bt p_bt + 1/2 sum_bt p_bt^2 ) / N
                           = -taylor_gate + token_fisher / 2,   p_bt = g_bt . y_bt
                    with L = sum_b L_b / N the mean token NLL (L_b sequence b's summed NLL), so dL/da_bt = p_bt / N,
                    and the Hessian diagonal d2L/da_bt^2 ~= (dL_b/da_bt)^2 / N: the empirical Fisher of the
                    per-sequence losses, carrying the same 1/N as the mean (not 1/N^2); cross-token Hessian terms
                    are dropped (the per-token gates are independent). The first term is Taylor's signed gradient of
                    one gate shared by all tokens (noisy on its own: it cancels), the second OBD's w^2 F / 2 at w = 1
  head_removal      head only: measured mean token NLL increase on (the first ``removal_tokens`` of) the
                    calibration windows when the head's attn.o input columns are zeroed alone (the head removal of
                    ``importance.validate.ablation``, one partial forward from the head's layer per head)

b runs over sequences (or over batches with ``fisher_unit='batch'``; residual_fisher is always per token).
Layer-only scorers (kind 'layer') have no element, channel, head or component values; group-only scorers (kind
'group') have head / KV-group / MLP-channel values and nothing else. ``removal`` and ``head_removal`` are measured
(``MEASURED``: the granularity each one ablates after the pass), the others are read off the pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from importance.arch.canonical import Block, Component, ModelMap
from importance.engine.stats import Statistics

GROUPS = ("head", "kv_group", "mlp_channel", "expert")
# The head scorers that predict measured head removal best, best first (scripts/bench_layer_draws.py --granularity
# head, SmolLM2, five held-out draws of 1,024 tokens: head_removal on 2,048 calibration tokens 0.748-0.786 (270
# partial forwards, ~11x the one pass), token_second_order 0.708-0.779, token_fisher 0.607-0.701, fisher
# 0.534-0.607, taylor 0.18-0.24; draw against draw 0.70-0.77): head heatmaps draw the first one a table has by
# default (a table scored with the default scorers has fisher, not the per-token gates); ``HEAD_SCORER``, the
# first one the one pass gives, is what `imprune probe` scores and draws by default.
HEAD_SCORERS = ("head_removal", "token_second_order", "token_fisher", "fisher")
# The measured scorers and the granularity each ablates on the calibration windows after the pass.
MEASURED = {"removal": "layer", "head_removal": "head"}
HEAD_SCORER = next(s for s in HEAD_SCORERS if s not in MEASURED)
# Group scorers read off the per-token gate sums (``importance.engine.gates``): they switch them on in the pass.
TOKEN_GATE_SCORERS = ("token_fisher", "token_second_order")


def head_scorer(available: list[str] | tuple[str, ...]) -> str | None:
    """The first of ``HEAD_SCORERS`` among ``available`` (None: none is)."""
    return next((s for s in HEAD_SCORERS if s in available), None)


@dataclass(frozen=True)
class Scorer:
    """A registered scorer: ``kind`` 'additive' (sum of element scores), 'mask' (folded group sums), 'layer' or
    'group' (per-token group sums only)."""

    name: str
    kind: str
    needs_grad: bool
    needs_activation: bool
    estimator: str


SCORERS: dict[str, Scorer] = {}
_ELEMENT_FNS: dict[str, Callable[..., torch.Tensor]] = {}
_LAYER_FNS: dict[str, Callable[..., float]] = {}
_GROUP_FNS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {}


def register_scorer(name: str, kind: str, estimator: str, needs_grad: bool = False, needs_activation: bool = False):
    """Register ``fn`` under ``name``: for kind 'additive' / 'mask' an element function ``fn(ctx, comp) -> Tensor``
    (shape of the weight); for kind 'layer' a layer function ``fn(ctx, block) -> float``; for kind 'group' a group
    function ``fn(ctx, block) -> {group: Tensor}`` (the groups the statistics have)."""

    def add(fn: Callable[..., Any]) -> Callable[..., Any]:
        SCORERS[name] = Scorer(name, kind, needs_grad, needs_activation, estimator)
        {"layer": _LAYER_FNS, "group": _GROUP_FNS}.get(kind, _ELEMENT_FNS)[name] = fn
        return fn

    return add


def layer_only(name: str) -> bool:
    """True for scorers that score whole layers only (no element, channel, head or component values)."""
    return name in SCORERS and SCORERS[name].kind == "layer"


def layer_only_names() -> list[str]:
    return [n for n, s in SCORERS.items() if s.kind == "layer"]


@dataclass
class Context:
    stats: Statistics
    mm: ModelMap
    obd: bool = False

    @property
    def n_targets(self) -> float:
        return max(self.stats.count("targets"), 1.0)

    def stat(self, comp: Component, name: str) -> torch.Tensor:
        t = self.stats.get(comp.layer, comp.name, name)
        if t is None:
            raise KeyError(f"statistic {name} missing for layer {comp.layer} {comp.name}")
        return t


def _w(comp: Component) -> torch.Tensor:
    return comp.weight.detach().float().cpu()


@register_scorer("magnitude", "additive", "element |w|; group: sum of |w| over the group")
def _magnitude(ctx: Context, comp: Component) -> torch.Tensor:
    return _w(comp).abs()


@register_scorer("activation", "additive", "element |w_ij| * ||x_j||_2 over calibration tokens (Wanda); "
                 "norm weights ||y_j||_2; group: sum over the group", needs_activation=True)
def _activation(ctx: Context, comp: Component) -> torch.Tensor:
    if comp.kind == "norm":
        return ctx.stat(comp, "out_sq").sqrt()
    norms = ctx.stat(comp, "in_sq").sqrt()  # [in] or [E, in] for experts
    return _w(comp).abs() * norms.unsqueeze(-2)


@register_scorer("taylor", "mask", "element |w * g| / N with g the gradient summed over the calibration set; "
                 "group |sum over the group of w * g| / N (first-order loss change on removal)", needs_grad=True)
def _taylor(ctx: Context, comp: Component) -> torch.Tensor:
    return (_w(comp) * ctx.stat(comp, "grad")).abs() / ctx.n_targets


@register_scorer("fisher", "mask", "element sum_b g_b^2 / N (empirical Fisher; OBD option w^2 F / 2); group "
                 "sum_b (sum over the group of w * g_b)^2 / N (Fisher of a group mask)", needs_grad=True)
def _fisher(ctx: Context, comp: Component) -> torch.Tensor:
    f = ctx.stat(comp, "grad_sq") / ctx.n_targets
    return _w(comp).square() * f / 2 if ctx.obd else f


def _block_stat(ctx: Context, block: Block, stat: str, what: str) -> torch.Tensor:
    t = ctx.stats.get(block.index, "block", stat)
    if t is None:
        raise KeyError(f"{what} statistics missing for layer {block.index}")
    return t


@register_scorer("block_influence", "layer", "layer: mean over tokens of 1 - cos(block input, block output)",
                 needs_activation=True)
def _block_influence(ctx: Context, block: Block) -> float:
    total = _block_stat(ctx, block, "influence", "block influence")
    count = _block_stat(ctx, block, "influence_tokens", "block influence")
    return float(total[0] / count[0].clamp_min(1))


@register_scorer("residual_fisher", "layer", "layer: sum over sequences b and tokens t of (g_bt . delta_bt)^2 / N, "
                 "delta = block output - block input (Fisher of per-token gates on the block's residual update)",
                 needs_grad=True)
def _residual_fisher(ctx: Context, block: Block) -> float:
    return float(_block_stat(ctx, block, "residual_fisher", "residual Fisher")[0]) / ctx.n_targets


@register_scorer("removal", "layer", "layer: measured mean token NLL increase on the calibration windows when the "
                 "block is bypassed (output = input)")
def _removal(ctx: Context, block: Block) -> float:
    tokens = max(ctx.stats.count("removal_tokens"), 1.0)
    return float(_block_stat(ctx, block, "removal", "removal")[0]) / tokens


def _group_stats(ctx: Context, block: Block, stat: str) -> dict[str, torch.Tensor]:
    return {g: t for g in GROUPS if (t := ctx.stats.get(block.index, g, stat)) is not None}


@register_scorer("token_fisher", "group", "head / KV group / MLP channel: sum over sequences b and tokens t of "
                 "(g_bt . y_bt)^2 / N, y_bt the group's slice of the attn.o / mlp.down input (Fisher of a "
                 "separate gate on the group's output at every token)", needs_grad=True)
def _token_fisher(ctx: Context, block: Block) -> dict[str, torch.Tensor]:
    return {g: t / ctx.n_targets for g, t in _group_stats(ctx, block, "tok_sq").items()}


@register_scorer("token_second_order", "group", "head / KV group / MLP channel: (-sum_bt p_bt + 1/2 sum_bt "
                 "p_bt^2) / N with p_bt = g_bt . y_bt the per-token gate gradient: second-order Taylor estimate "
                 "of the mean NLL change when the group's output is zeroed (gate 1 -> 0, Hessian diagonal by the "
                 "per-token gate Fisher)", needs_grad=True)
def _token_second_order(ctx: Context, block: Block) -> dict[str, torch.Tensor]:
    signed = _group_stats(ctx, block, "tok")
    return {g: (t / 2 - signed[g]) / ctx.n_targets for g, t in _group_stats(ctx, block, "tok_sq").items()
            if g in signed}


@register_scorer("head_removal", "group", "head: measured mean token NLL increase on the calibration windows when "
                 "the head's output (its attn.o input columns) is zeroed alone")
def _head_removal(ctx: Context, block: Block) -> dict[str, torch.Tensor]:
    tokens = max(ctx.stats.count("removal_tokens"), 1.0)
    t = ctx.stats.get(block.index, "head", "removal")
    return {} if t is None else {"head": t / tokens}


def element_scores(name: str, ctx: Context, comp: Component) -> torch.Tensor:
    return _ELEMENT_FNS[name](ctx, comp)


# ----------------------------------------------------------------------------------------- groups

def _mask_value(name: str, ctx: Context, wg: torch.Tensor | None, wg_sq: torch.Tensor | None) -> torch.Tensor:
    if wg is None or wg_sq is None:
        raise KeyError("gradient statistics missing: score with a gradient pass")
    return (wg.abs() if name == "taylor" else wg_sq) / ctx.n_targets


def rows(name: str, ctx: Context, comp: Component) -> torch.Tensor:
    """Score of each output row (channel) of ``comp``: [out] ([E, out] for experts, [d] for norms)."""
    if SCORERS[name].kind == "mask":
        return _mask_value(name, ctx, ctx.stat(comp, "row_wg"), ctx.stat(comp, "row_wg_sq"))
    e = element_scores(name, ctx, comp)
    return e if comp.kind == "norm" else e.sum(-1)


def cols(name: str, ctx: Context, comp: Component) -> torch.Tensor:
    """Score of each input column of ``comp`` (attn.o heads, mlp.down channels): [in]."""
    if SCORERS[name].kind == "mask":
        return _mask_value(name, ctx, ctx.stat(comp, "col_wg"), ctx.stat(comp, "col_wg_sq"))
    return element_scores(name, ctx, comp).sum(-2)


def component(name: str, ctx: Context, comp: Component) -> float:
    if SCORERS[name].kind == "mask":
        return float(_mask_value(name, ctx, ctx.stat(comp, "comp_wg"), ctx.stat(comp, "comp_wg_sq"))[0])
    return float(element_scores(name, ctx, comp).sum())


def _heads(v: torch.Tensor, head_dim: int) -> torch.Tensor:
    return v.reshape(-1, head_dim).sum(-1)


def groups(name: str, ctx: Context, block: Block) -> dict[str, torch.Tensor]:
    """Per-block group scores: 'head' [H], 'kv_group' [Hkv], 'mlp_channel' [I], 'expert' [E] (present ones)."""
    c = block.components
    out: dict[str, torch.Tensor] = {}
    if SCORERS[name].kind == "group":
        return _GROUP_FNS[name](ctx, block)
    if SCORERS[name].kind == "mask":
        for g in GROUPS:
            wg = ctx.stats.get(block.index, g, "wg")
            if wg is not None:
                out[g] = _mask_value(name, ctx, wg, ctx.stats.get(block.index, g, "wg_sq"))
        return out
    if "attn.q" in c and "attn.o" in c:
        q, o = c["attn.q"], c["attn.o"]  # per-component head widths (MLA: q, k and v differ)
        out["head"] = _heads(rows(name, ctx, q), q.head_dim) + _heads(cols(name, ctx, o), o.head_dim)
        if "attn.gate" in c:  # the heads' output gate rows go with them
            out["head"] = out["head"] + _heads(rows(name, ctx, c["attn.gate"]), c["attn.gate"].head_dim)
    if "attn.k" in c and "attn.v" in c and "head" in out:
        k, v = c["attn.k"], c["attn.v"]
        kv = _heads(rows(name, ctx, k), k.head_dim) + _heads(rows(name, ctx, v), v.head_dim)
        out["kv_group"] = kv + out["head"].reshape(block.n_kv_heads, -1).sum(-1)
    if "mlp.up" in c and "mlp.down" in c:
        mlp = rows(name, ctx, c["mlp.up"]) + cols(name, ctx, c["mlp.down"])
        out["mlp_channel"] = mlp + rows(name, ctx, c["mlp.gate"]) if "mlp.gate" in c else mlp
    experts = [x for x in c.values() if x.kind == "experts"]
    if experts:
        out["expert"] = sum(rows(name, ctx, x).sum(-1) for x in experts)
        if "mlp.router" in c:
            out["expert"] = out["expert"] + rows(name, ctx, c["mlp.router"])
    return out


def layer(name: str, ctx: Context, block: Block) -> float:
    if name in _LAYER_FNS:
        return _LAYER_FNS[name](ctx, block)
    if SCORERS[name].kind == "mask":
        if not block.components:  # a hybrid's block with nothing mapped (a state-space mixer alone): no gate
            return 0.0
        return float(_mask_value(name, ctx, ctx.stats.get(block.index, "layer", "wg"),
                                 ctx.stats.get(block.index, "layer", "wg_sq"))[0])
    return sum(component(name, ctx, comp) for comp in block.components.values())


def group_counts(block: Block) -> dict[str, torch.Tensor]:
    """Number of weights in each group of ``block`` (for 'mean' aggregation), by arithmetic on shapes."""
    c = block.components
    out: dict[str, torch.Tensor] = {}
    if "attn.q" in c and "attn.o" in c:
        q, o = c["attn.q"], c["attn.o"]
        per_head = q.head_dim * q.shape[1] + o.shape[0] * o.head_dim
        per_head += c["attn.gate"].head_dim * c["attn.gate"].shape[1] if "attn.gate" in c else 0
        out["head"] = torch.full((block.n_heads,), float(per_head))
    if "attn.k" in c and "attn.v" in c and "head" in out:
        per_group = c["attn.k"].head_dim * c["attn.k"].shape[1] + c["attn.v"].head_dim * c["attn.v"].shape[1]
        out["kv_group"] = per_group + out["head"].reshape(block.n_kv_heads, -1).sum(-1)
    if "mlp.up" in c and "mlp.down" in c:
        per_channel = c["mlp.up"].shape[1] + c["mlp.down"].shape[0] + (c["mlp.gate"].shape[1] if "mlp.gate" in c else 0)
        out["mlp_channel"] = torch.full((block.intermediate,), float(per_channel))
    experts = [x for x in c.values() if x.kind == "experts"]
    if experts:
        per_expert = sum(x.shape[1] * x.shape[2] for x in experts)
        per_expert += c["mlp.router"].shape[1] if "mlp.router" in c else 0
        out["expert"] = torch.full((block.n_experts,), float(per_expert))
    return out
