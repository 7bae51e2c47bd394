"""Unstructured and N:M pruning by importance: ``imprune prune --method unstructured | nm`` and a Python API.

Criteria (element scores of a weight W [out, in]; lowest go first):
  magnitude  |W|                                    (no data)
  wanda      |W| * ||x||_2, x the layer's input over the calibration tokens (``in_sq`` = sum x^2)
  taylor     |W * g|, g the gradient of the summed token NLL       (one gradient pass on the dense model)
  fisher     W^2 * sum_b g_b^2 (the OBD saliency, up to a constant) (same pass, per-sequence gradients)
  sparsegpt  second-order: masks by w^2 / [H^-1]_jj^2 and the remaining weights updated (``second_order.sparsegpt``)

Comparison groups (``scope``): each output row removes the same share (Wanda's default), each matrix, or one
threshold over every selected matrix (``global``, the same as ``--allocation global`` with matrix scope).
N:M: in every run of M consecutive inputs of a row, N weights stay. Counts are exact: a matrix with ratio r
loses round(r x numel) weights (whole-model totals by largest remainder, see ``pruning.methods.allocate``), spread
over its rows (row scope) or SparseGPT blocks as evenly as whole elements allow; ties go by position.

Sequential mode (``second_order.sequential``): wanda and sparsegpt gather block l's statistics on the inputs that
the already-pruned blocks 0..l-1 produce (on by default for sparsegpt, where it matters; off for wanda,
where it changes little). Taylor and fisher use one gradient pass on the dense model; magnitude no data.

Allocation (``--allocation``): uniform, importance (``pruning.methods.allocate.allocate`` over a layer x component
signal: a table scorer, by default fisher on a log scale, scored on the fly when no table is given; or
``owl``, the share of Wanda scores above 5x their layer mean), or global. Masks are applied through
``Component.update_weight_``, so fused and transposed layouts are handled by the arch layer; the saved
folder holds plain dense safetensors with zeros.

Offloaded models (``load_model(..., max_memory=...)``, ``imprune prune --max-memory``): weights are read from
and written back to accelerate's CPU / disk copies (``Component.update_weight_``), one matrix at a time; the
sequential pass gathers and prunes block l before it reads block l + 1, so about one block is resident. The
masks (and SparseGPT's updated weights) are those of the in-memory run, and ``save_model`` writes them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from importance.arch.canonical import LINEAR_NAMES, Component, ModelMap, model_map
from importance.data.sources import Windows
from importance.engine.collect import CollectConfig, Statistics, collect
from importance.errors import ImpruneError
from importance.models.load import LoadedModel
from importance.table import ImportanceTable, LayerMap, layer_map
from pruning.methods import allocate as A
from pruning.methods.checks import check_nm_inputs
from pruning.methods.masks import lowest_mask, nm_mask, parse_nm
from pruning.methods.registry import (
    ALLOCATION,
    BAND,
    CRITERION,
    DAMP,
    PruneContext,
    PruneResult,
    arg,
    register_method,
    table_for,
)
from pruning.second_order.sequential import InputStatistics, run_sequential
from pruning.second_order.sparsegpt import sparsegpt

SCOPES = ("row", "matrix", "global")
OWL_M = 5.0  # an "outlier" Wanda score is above OWL_M x the mean of its layer


@dataclass(frozen=True)
class Criterion:
    """``data``: 'none' | 'activation' (input statistics) | 'gradient'; ``fn(W [out, in], extra) -> scores``."""

    name: str
    data: str
    fn: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor] | None
    scope: str = "row"
    sequential: bool = False


CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str, data: str, scope: str = "row", sequential: bool = False):
    def add(fn: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor] | None):
        CRITERIA[name] = Criterion(name, data, fn, scope, sequential)
        return fn

    return add


@register_criterion("magnitude", "none", scope="matrix")
def magnitude_scores(w: torch.Tensor, extra: dict[str, torch.Tensor]) -> torch.Tensor:
    return w.abs()


@register_criterion("wanda", "activation")
def wanda_scores(w: torch.Tensor, extra: dict[str, torch.Tensor]) -> torch.Tensor:
    return w.abs() * extra["in_sq"].sqrt()[None, :]  # [out, in] * [1, in]


@register_criterion("taylor", "gradient")
def taylor_scores(w: torch.Tensor, extra: dict[str, torch.Tensor]) -> torch.Tensor:
    return (w * extra["grad"]).abs()


@register_criterion("fisher", "gradient")
def fisher_scores(w: torch.Tensor, extra: dict[str, torch.Tensor]) -> torch.Tensor:
    return w.square() * extra["grad_sq"]


register_criterion("sparsegpt", "activation", scope="matrix", sequential=True)(None)
CRITERIA["activation"] = CRITERIA["wanda"]  # the table's name for Wanda's metric


@dataclass(frozen=True)
class UnstructuredConfig:
    """One pruning recipe. ``scope`` / ``sequential`` None = the criterion's default; ``nm`` = (N, M)."""

    sparsity: float
    criterion: str = "wanda"
    scope: str | None = None
    nm: tuple[int, int] | None = None
    allocation: str = "uniform"
    band: float = 0.1
    components: tuple[str, ...] | None = None
    sequential: bool | None = None
    alloc_scorer: str | None = None
    alloc_granularity: str = "layer"
    alloc_transform: str | None = None
    blocksize: int = 128
    damp: float = 0.01

    def validate(self) -> None:
        A.check_target(self.sparsity, self.band)
        if self.criterion not in CRITERIA:
            raise ImpruneError(f"unknown --criterion '{self.criterion}'; use one of "
                               "magnitude, wanda, taylor, fisher, sparsegpt")
        if self.scope is not None and self.scope not in SCOPES:
            raise ImpruneError(f"unknown --scope '{self.scope}'; use row, matrix or global")
        if self.allocation not in A.METHODS:
            raise ImpruneError(f"unknown --allocation '{self.allocation}'; use uniform, importance or global")
        if self.scope == "global" and self.allocation == "importance":
            raise ImpruneError("--scope global is one threshold over all matrices; it cannot take --allocation "
                               "importance (use --scope row or matrix)")
        if self.nm is not None:
            n, m = self.nm
            if not 0 < n < m:
                raise ImpruneError(f"--nm {n}:{m} is no N:M pattern: it needs 0 < N < M, e.g. 2:4")
            if abs((1 - n / m) - self.sparsity) > 1e-9:
                raise ImpruneError(f"--sparsity {self.sparsity} does not match {n}:{m}, which removes "
                                   f"{1 - n / m:g}; pass --sparsity {1 - n / m:g}")
            if self.allocation != "uniform" or self.scope not in (None, "row"):
                raise ImpruneError("N:M keeps N of every M weights in every row of every selected matrix; drop "
                                   "--allocation/--scope (or use --method unstructured)")
        if self.blocksize < 1 or not 0 < self.damp < 1:
            raise ImpruneError("--blocksize must be >= 1 and --damp in (0, 1), e.g. 128 and 0.01")

    @property
    def effective_scope(self) -> str:
        return self.scope or CRITERIA[self.criterion].scope

    @property
    def effective_sequential(self) -> bool:
        seq = CRITERIA[self.criterion].sequential if self.sequential is None else self.sequential
        return seq and CRITERIA[self.criterion].data == "activation"


# ----------------------------------------------------------------------------------------- masks


# ----------------------------------------------------------------------------------------- selection

def select_components(mm: ModelMap, names: tuple[str, ...] | list[str] | None = None) -> list[Component]:
    """The linear components to prune (default: every canonical linear of every block, routers excluded)."""
    present = [n for n in mm.component_names() if n in LINEAR_NAMES]
    wanted = list(names) if names else present
    if not wanted:
        raise ImpruneError("no components selected; pass --components all or a list such as attn.q,mlp.up")
    unknown = [n for n in wanted if n not in present]
    if unknown:
        raise ImpruneError(f"component(s) {', '.join(unknown)} are not prunable linears of this model; choose from "
                           f"{', '.join(present)} or 'all'")
    return [c for c in mm.components() if c.name in wanted and c.kind == "linear"]


def parse_components(text: str | None) -> tuple[str, ...] | None:
    if text is None or text.strip() == "all":
        return None
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise ImpruneError("--components is empty; pass 'all' or a list such as attn.q,mlp.up")
    return names


def _key(comp: Component) -> tuple[int, str]:
    return comp.layer, comp.name


# ----------------------------------------------------------------------------------------- statistics

def _gradient_stats(lm: LoadedModel, windows: Windows, batch_size: int, progress: bool) -> Statistics:
    cfg = CollectConfig(grad=True, elements=True, activation=False, block_influence=False)
    return collect(lm.model, windows, lm.task, cfg, batch_size=batch_size, progress=progress)


def _activation_stats(lm: LoadedModel, windows: Windows, batch_size: int, progress: bool) -> Statistics:
    cfg = CollectConfig(grad=False, elements=False, activation=True, block_influence=False)
    return collect(lm.model, windows, lm.task, cfg, batch_size=batch_size, progress=progress)


def owl_importance(comps: list[Component], stats: Statistics, n_layers: int, m: float = OWL_M) -> torch.Tensor:
    """Per layer [L]: the share of Wanda scores (over the layer's selected linears) above m x their mean."""
    out = torch.zeros(n_layers, dtype=torch.float64)
    for layer in range(n_layers):
        scores = [wanda_scores(c.weight.float(), {"in_sq": stats.get(c.layer, c.name, "in_sq")}).flatten()
                  for c in comps if c.layer == layer]
        if scores:
            s = torch.cat(scores)
            out[layer] = float((s > m * s.mean()).double().mean())
    return out


# ----------------------------------------------------------------------------------------- allocation

def plan_ratios(lm: LoadedModel, cfg: UnstructuredConfig, comps: list[Component], table: ImportanceTable | None,
                windows: Callable[[], Windows], batch_size: int, progress: bool,
                element_scores: Callable[[], list[torch.Tensor]]) -> tuple[LayerMap, dict[str, Any]]:
    """The target ratio of every selected component ({layer: {component: r}}) and how it was chosen."""
    target = cfg.sparsity
    allocation = "global" if cfg.scope == "global" else cfg.allocation
    if cfg.nm is not None or allocation == "uniform":
        return layer_map((_key(c), target) for c in comps), {"method": "uniform"}
    if allocation == "global":
        r = A.global_ratios(element_scores(), target)
        ratios = layer_map(zip(map(_key, comps), r.tolist(), strict=True))
        basis = "wanda" if cfg.criterion == "sparsegpt" else cfg.criterion
        return ratios, {"method": "global", "scores": basis}
    mm_names = list(dict.fromkeys(c.name for c in comps))
    n_layers = max(c.layer for c in comps) + 1
    sizes = torch.zeros(n_layers, len(mm_names), dtype=torch.float64)
    for c in comps:
        sizes[c.layer, mm_names.index(c.name)] = c.numel
    scorer = cfg.alloc_scorer or default_signal(table)
    transform = cfg.alloc_transform or ("linear" if scorer == "owl" else "log")
    if scorer == "owl":
        imp = owl_importance(comps, _activation_stats(lm, windows(), batch_size, progress), n_layers)
        importance = imp[:, None].expand_as(sizes).clone()
        granularity = "layer"
    else:
        table = table_for(lm, table, scorer, windows, batch_size, progress, "pick --alloc-scorer from those, or owl")
        cols = [table.components.index(n) for n in mm_names]
        if table.has(scorer, "component"):
            importance = table.matrix(scorer, "component", aggregation="mean")[:n_layers, cols].double()
        else:  # a layer-only scorer (block_influence)
            importance = table.layer_scores(scorer)[:n_layers, None].double().expand_as(sizes).clone()
        granularity = cfg.alloc_granularity
    ratios = A.allocate(None, None, target, "importance", cfg.band, mm_names, granularity, transform, sizes,
                        importance)
    return ratios, {"method": "importance", "signal": scorer, "granularity": granularity, "transform": transform,
                    "band": cfg.band, "importance": importance[:, 0 if granularity == "layer" else slice(None)]
                    .tolist()}


def default_signal(table: ImportanceTable | None) -> str:
    """fisher (measured best on SmolLM2 at 50%: Wanda 75.9 uniform -> 71.3 guided, where owl gave 80.1), else the
    table's first group scorer."""
    if table is None or "fisher" in table.scorers:
        return "fisher"
    return next((s for s in table.scorers if table.has(s, "component")), table.scorers[0])


# ----------------------------------------------------------------------------------------- pruning

def _prune_component(comp: Component, cfg: UnstructuredConfig, count: int, extra: dict[str, torch.Tensor]) -> None:
    """Zero exactly ``count`` weights of ``comp`` (or N:M), by the criterion; SparseGPT also updates the rest."""
    if count == 0 and cfg.nm is None:
        return  # ratio 0: the weights stay exactly as they are (SparseGPT would still re-round them)
    w = comp.weight.detach().float()  # [out, in]
    scope = "row" if cfg.effective_scope == "row" else "matrix"
    if cfg.criterion == "sparsegpt":
        blocks = [min(cfg.blocksize, w.shape[1] - i) for i in range(0, w.shape[1], cfg.blocksize)]
        per_block = A.split_counts(count, [b * w.shape[0] for b in blocks])
        starts = {i * cfg.blocksize: k for i, k in enumerate(per_block)}

        def choose(sal: torch.Tensor, start: int) -> torch.Tensor:
            return lowest_mask(sal, starts[start], scope)

        new = sparsegpt(w, extra["xtx"], int(extra["tokens"]), None if cfg.nm else choose, cfg.nm,
                        cfg.blocksize, cfg.damp)
        comp.update_weight_(lambda old: new.to(old.dtype))
        return
    scores = CRITERIA[cfg.criterion].fn(w, extra)  # type: ignore[misc]
    mask = nm_mask(scores, *cfg.nm) if cfg.nm else lowest_mask(scores, count, scope)
    comp.update_weight_(lambda old: old.masked_fill(mask.to(old.device), 0))


def _extra(comp: Component, stats: Statistics | None) -> dict[str, torch.Tensor]:
    if stats is None:
        return {}
    return {k: v for k in ("in_sq", "grad", "grad_sq") if (v := stats.get(comp.layer, comp.name, k)) is not None}


def prune_unstructured(lm: LoadedModel, cfg: UnstructuredConfig, table: ImportanceTable | None = None,
                       windows: Windows | Callable[[], Windows] | None = None, batch_size: int = 4,
                       progress: bool = False) -> PruneResult:
    """Zero weights of ``lm.model`` in place by ``cfg`` (see the module docstring) and record what was done."""
    cfg.validate()
    mm = model_map(lm.model)
    comps = select_components(mm, cfg.components)
    crit = CRITERIA[cfg.criterion]
    check_nm_inputs(comps, cfg.nm)

    def get_windows() -> Windows:
        w = windows() if callable(windows) else windows
        if w is None:
            raise ImpruneError(f"--criterion {cfg.criterion} / this allocation needs calibration data")
        return w

    if crit.data != "none" or cfg.allocation != "uniform" or cfg.scope == "global":
        get_windows()  # fail early, before any statistics pass
    dense: dict[str, Statistics] = {}

    def stats(kind: str) -> Statistics:
        if kind not in dense:
            fn = _gradient_stats if kind == "gradient" else _activation_stats
            dense[kind] = fn(lm, get_windows(), batch_size, progress)
        return dense[kind]

    def element_scores() -> list[torch.Tensor]:
        basis = CRITERIA["wanda" if crit.fn is None else cfg.criterion]
        st = stats(basis.data) if basis.data != "none" else None
        return [basis.fn(c.weight.float(), _extra(c, st)) for c in comps]  # type: ignore[misc]

    ratios, how = plan_ratios(lm, cfg, comps, table, get_windows, batch_size, progress, element_scores)
    sizes = torch.tensor([c.numel for c in comps], dtype=torch.float64)
    target_r = torch.tensor([ratios[c.layer][c.name] for c in comps], dtype=torch.float64)
    total = round(cfg.sparsity * float(sizes.sum()))  # allocations keep the size-weighted mean at the target
    counts = dict(zip(map(_key, comps), A.element_counts(target_r, sizes, total).tolist(), strict=True))

    if crit.data == "activation" and (cfg.effective_sequential or crit.fn is None):
        _run_blockwise(lm, mm, comps, cfg, counts, get_windows(), batch_size, progress)
    else:
        st = stats(crit.data) if crit.data != "none" else None
        for c in comps:
            _prune_component(c, cfg, counts[_key(c)], _extra(c, st))
    return _result(cfg, comps, ratios, how)


def _run_blockwise(lm: LoadedModel, mm: ModelMap, comps: list[Component], cfg: UnstructuredConfig,
                   counts: dict[tuple[int, str], int], windows: Windows, batch_size: int, progress: bool) -> None:
    by_layer: dict[int, list[Component]] = {}
    for c in comps:
        by_layer.setdefault(c.layer, []).append(c)

    def observe(layer: int, block: torch.nn.Module) -> InputStatistics | None:
        modules = {str(id(c.module)): c.module for c in by_layer.get(layer, [])}  # fused q/k/v: one module
        return InputStatistics(modules, hessian=cfg.criterion == "sparsegpt") if modules else None

    def step(layer: int, block: torch.nn.Module, inputs: Any, st: InputStatistics | None) -> None:
        if st is None:
            return
        for c in by_layer[layer]:
            k = str(id(c.module))
            extra = {"in_sq": st.sq[k], "tokens": torch.tensor(st.tokens[k])}
            if k in st.xtx:
                extra["xtx"] = st.xtx[k]
            _prune_component(c, cfg, counts[_key(c)], extra)

    run_sequential(lm.model, mm, windows, step, sequential=cfg.effective_sequential, batch_size=batch_size,
                   progress=progress, observe=observe)


def achieved(comps: list[Component]) -> dict[tuple[int, str], float]:
    """Fraction of exact zeros per (layer, component)."""
    return {_key(c): float((c.weight == 0).double().mean()) for c in comps}


def _result(cfg: UnstructuredConfig, comps: list[Component], ratios: LayerMap, how: dict[str, Any]) -> PruneResult:
    got = achieved(comps)
    sparsity = layer_map(got.items())
    sizes = {_key(c): c.numel for c in comps}
    zeros = sum(got[k] * n for k, n in sizes.items())
    total = sum(sizes.values())
    recipe = {**asdict(cfg), "scope": cfg.effective_scope if not cfg.nm else "nm",
              "sequential": cfg.effective_sequential, "components": sorted({c.name for c in comps})}
    record = {"unstructured": recipe,
              "allocation": {**how, "ratios": {str(k): v for k, v in ratios.items()}},
              "achieved": {"overall": zeros / total, "pruned_params": total,
                           "modules": {f"{c.layer}|{c.name}": got[_key(c)] for c in comps}},
              "note": "zeros are stored in dense tensors: no speed or memory gain on dense kernels"}
    return PruneResult(record, sparsity, shapes_changed=False, uniform=True)


def to_semi_structured_(model: torch.nn.Module) -> int:
    """Swap every plain linear whose weight is exactly 2:4 sparse for PyTorch's semi-structured sparse tensor
    (CUDA, float16 / bfloat16; the model must already be on the GPU). Returns the number swapped.

    For inference only; save the dense model with zeros (what ``imprune prune`` writes), not this one."""
    if not torch.cuda.is_available():
        raise ImpruneError("2:4 semi-structured kernels need a CUDA GPU; on CPU the pruned model runs as dense "
                           "weights with zeros")
    from torch.sparse import to_sparse_semi_structured

    swapped = 0
    for c in select_components(model_map(model)):
        w = c.module.weight
        if c.rows is not None or c.transposed or w.device.type != "cuda":
            continue
        if ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all() and w.shape[1] % 4 == 0:
            c.module.weight = torch.nn.Parameter(to_sparse_semi_structured(w.detach()), requires_grad=False)
            swapped += 1
    return swapped


# ----------------------------------------------------------------------------------------- CLI methods

_SCOPE = arg("--scope", default=None, help="comparison group: row (each output row loses the same share; default "
             "for wanda/taylor/fisher) | matrix (default for magnitude/sparsegpt) | global (one threshold)")
_NM = arg("--nm", default=None, help="--method nm: pattern N:M, e.g. 2:4 or 4:8 (default: from --sparsity, M=4)")
_COMPONENTS = arg("--components", default="all", help="linears to prune: all or a list such as attn.q,mlp.up")
_SEQUENTIAL = arg("--sequential", action=argparse.BooleanOptionalAction, default=None,
                  help="gather each block's statistics after pruning the blocks before it (default: on for "
                       "sparsegpt, off for wanda)")
_ALLOC_SCORER = arg("--alloc-scorer", default=None, help="--allocation importance signal: a table scorer (fisher, "
                    "the default; taylor, activation, magnitude, block_influence) or owl (Wanda outlier share)")
_ALLOC_GRAN = arg("--alloc-granularity", default="layer", choices=list(A.GRANULARITIES),
                  help="one ratio per layer, or per layer x component")
_ALLOC_TRANSFORM = arg("--alloc-transform", default=None, choices=list(A.TRANSFORMS),
                       help="map the importance signal to the band linearly, on a log scale or by rank")
_BLOCKSIZE = arg("--blocksize", type=int, default=128, help="sparsegpt: columns per lazy-update block")
_DAMP = DAMP
_FLAGS = [CRITERION, _SCOPE, _NM, ALLOCATION, BAND, _COMPONENTS, _SEQUENTIAL, _ALLOC_SCORER, _ALLOC_GRAN,
          _ALLOC_TRANSFORM, _BLOCKSIZE, _DAMP]


def config_from_args(a: Any, method: str) -> UnstructuredConfig:
    nm = parse_nm(getattr(a, "nm", None))
    if method == "nm" and nm is None:
        m = 4
        n = round(m * (1 - a.sparsity))
        if abs(n / m - (1 - a.sparsity)) > 1e-9:
            raise ImpruneError(f"--sparsity {a.sparsity} is no N:4 pattern; pass --nm N:M (e.g. --nm 2:4)")
        nm = (n, m)
    if method == "unstructured" and nm is not None:
        raise ImpruneError("--nm belongs to --method nm; drop it or switch method")
    cfg = UnstructuredConfig(
        sparsity=a.sparsity, criterion=getattr(a, "criterion", None) or "wanda", scope=getattr(a, "scope", None),
        nm=nm, allocation=getattr(a, "allocation", "uniform"), band=getattr(a, "band", 0.1),
        components=parse_components(getattr(a, "components", None)), sequential=getattr(a, "sequential", None),
        alloc_scorer=getattr(a, "alloc_scorer", None), alloc_granularity=getattr(a, "alloc_granularity", "layer"),
        alloc_transform=getattr(a, "alloc_transform", None), blocksize=getattr(a, "blocksize", 128),
        damp=getattr(a, "damp", 0.01))
    cfg.validate()
    return cfg


def _run(ctx: PruneContext, method: str) -> PruneResult:
    cfg = config_from_args(ctx.args, method)
    select_components(model_map(ctx.lm.model), cfg.components)  # a bad selection fails before any data is read
    return prune_unstructured(ctx.lm, cfg, ctx.table, ctx.calibration, ctx.args.batch_size,
                              progress=not ctx.args.quiet)


@register_method("unstructured", "zero individual weights by magnitude, wanda, taylor, fisher or sparsegpt",
                 args=_FLAGS, offload=True)
def unstructured_method(ctx: PruneContext) -> PruneResult:
    return _run(ctx, "unstructured")


@register_method("nm", "N:M semi-structured sparsity (2:4, 4:8, ...) by the same criteria", args=_FLAGS,
                 offload=True)
def nm_method(ctx: PruneContext) -> PruneResult:
    return _run(ctx, "nm")
