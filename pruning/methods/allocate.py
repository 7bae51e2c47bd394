"""Allocation: how much of each layer (x component) to remove so that the whole removes exactly the target.

  uniform     every unit gets the target ratio.
  importance  ratios spread by importance inside a band: r_k = clip(target - band * s_k + c, lo, hi), where
              s_k in [-1, 1] is the unit's importance per parameter mapped linearly ('linear'), on a log scale
              ('log') or by rank ('rank'), lo/hi = [target - band, target + band] within [0, 1), and the shift
              c is found by bisection so that the size-weighted mean of the ratios equals the target (it exists
              because the target lies inside [lo, hi] and the mean is monotone in c). More important -> lower.
  global      one threshold over the element scores of every unit: the ratio of a unit is the fraction of its
              elements below the threshold (``global_ratios``).

Ratios are turned into whole element counts by largest-remainder rounding (``element_counts``), so the sum
over all units is exactly round(target x total) and each unit is within one element of its own ratio.

``allocate(table, scorer, target, ...)`` applies this to the layer x component grid of an ``ImportanceTable``
and returns a ``LayerMap`` ({layer: {component: ratio}}), the shared format of sparsity maps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from importance.errors import ImpruneError
from importance.table import ImportanceTable, LayerMap

METHODS = ("uniform", "importance", "global")
TRANSFORMS = ("linear", "log", "rank")
GRANULARITIES = ("layer", "component")
_MAX_RATIO = 1.0 - 1e-6  # a ratio stays below 1: something of every unit survives


def check_target(target: float, band: float = 0.0) -> None:
    if not 0.0 <= target < 1.0:
        raise ImpruneError(f"sparsity {target} is outside [0, 1); give the fraction to remove, e.g. 0.5")
    if not 0.0 <= band < 1.0:
        raise ImpruneError(f"--band {band} is outside [0, 1); give the largest deviation from the target, e.g. 0.1")


def uniform_ratios(sizes: torch.Tensor, target: float) -> torch.Tensor:
    """[K] ratios, all equal to ``target``."""
    check_target(target)
    return torch.full(sizes.shape, float(target), dtype=torch.float64)


def signal(importance: torch.Tensor, transform: str = "log") -> torch.Tensor:
    """Importance [K] -> [-1, 1] (0 everywhere when all are equal); higher importance -> higher signal."""
    if transform not in TRANSFORMS:
        raise ImpruneError(f"unknown importance transform '{transform}'; use one of {', '.join(TRANSFORMS)}")
    x = importance.double()
    if not torch.isfinite(x).all():
        raise ImpruneError("the importance values contain NaN or infinity; score the model again")
    if transform == "rank":
        order = torch.argsort(x, stable=True)
        x = torch.empty_like(x).scatter_(0, order, torch.arange(len(x), dtype=torch.float64))
    elif transform == "log":
        pos = x[x > 0]
        floor = pos.min() if len(pos) else torch.tensor(1.0, dtype=torch.float64)
        x = x.clamp_min(floor).log()
    span = x.max() - x.min() if len(x) else x.new_zeros(())
    if span <= 0:
        return torch.zeros_like(x)
    return 2.0 * (x - x.min()) / span - 1.0


def importance_ratios(importance: torch.Tensor, sizes: torch.Tensor, target: float, band: float = 0.1,
                      transform: str = "log") -> torch.Tensor:
    """[K] ratios in [target - band, target + band] ∩ [0, 1): lower for more important units (importance per
    parameter), the ``sizes``-weighted mean equal to ``target`` to float precision."""
    check_target(target, band)
    if importance.shape != sizes.shape or importance.dim() != 1:
        raise ImpruneError(f"importance {tuple(importance.shape)} and sizes {tuple(sizes.shape)} must be two "
                           "vectors of the same length")
    w = sizes.double()
    if (w < 0).any() or w.sum() <= 0:
        raise ImpruneError("unit sizes must be non-negative with a positive total")
    lo, hi = max(0.0, target - band), min(target + band, _MAX_RATIO)
    base = target - band * signal(importance, transform)

    def mean(c: float) -> float:
        return float((w * (base + c).clamp(lo, hi)).sum() / w.sum())

    a, b = lo - float(base.max()), hi - float(base.min())  # mean(a) = lo <= target <= hi = mean(b)
    for _ in range(200):
        mid = 0.5 * (a + b)
        if mean(mid) < target:
            a = mid
        else:
            b = mid
        if b - a < 1e-15:
            break
    return (base + 0.5 * (a + b)).clamp(lo, hi)


def global_ratios(scores: Sequence[torch.Tensor], target: float) -> torch.Tensor:
    """One threshold over all elements of all units: [K] fraction of each unit's elements that fall below it.

    Exactly round(target x total) elements fall below (ties broken by unit order, then element order)."""
    check_target(target)
    sizes = torch.tensor([s.numel() for s in scores], dtype=torch.long)
    total = int(sizes.sum())
    k = round(target * total)
    if k == 0:
        return torch.zeros(len(scores), dtype=torch.float64)
    flat = torch.cat([s.detach().float().flatten() for s in scores])
    order = torch.argsort(flat, stable=True)[:k]
    unit = torch.repeat_interleave(torch.arange(len(scores)), sizes)
    counts = torch.bincount(unit[order], minlength=len(scores))
    return counts.double() / sizes.double()


def element_counts(ratios: torch.Tensor, sizes: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Whole elements to remove per unit [K] (long): floor(r x n) plus one for the largest remainders, so that
    the sum is ``total`` (default round(sum r x n)) and each unit is within one element of r x n."""
    exact = ratios.double() * sizes.double()
    base = exact.floor()
    want = round(float(exact.sum())) if total is None else int(total)
    extra = int(want - base.sum())
    rem = exact - base
    if extra > 0:
        order = torch.argsort(-rem, stable=True)
        order = order[base[order] < sizes[order].double()][:extra]
        base[order] += 1
    return base.long()


def split_counts(total: int, sizes: Sequence[int]) -> list[int]:
    """Split ``total`` removals over groups of ``sizes`` as evenly as proportions allow (largest remainder)."""
    s = torch.tensor(list(sizes), dtype=torch.float64)
    if total == 0 or s.sum() == 0:
        return [0] * len(s)
    return element_counts(torch.full_like(s, total / float(s.sum())), s, total).tolist()


def allocate(table: ImportanceTable | None, scorer: str | None, target: float, method: str = "uniform",
             band: float = 0.1, components: Sequence[str] | None = None, granularity: str = "layer",
             transform: str = "log", sizes: torch.Tensor | None = None,
             importance: torch.Tensor | None = None) -> LayerMap:
    """Ratios per layer x component for the selected ``components`` as a ``LayerMap``.

    ``importance`` [L, C] (per parameter, NaN where absent) overrides the table's ``scorer`` 'mean' component
    matrix; ``sizes`` [L, C] are parameter counts (default: the table's counts). 'layer' granularity gives
    every component of a layer the same ratio (importance: the layer's size-weighted mean); 'component' gives
    each layer x component its own. ``global`` needs element scores: use ``global_ratios``.
    """
    if method not in ("uniform", "importance"):
        raise ImpruneError(f"allocation '{method}' is not a table allocation; use uniform or importance "
                           "(global: pruning.methods.allocate.global_ratios over element scores)")
    if granularity not in GRANULARITIES:
        raise ImpruneError(f"unknown allocation granularity '{granularity}'; use layer or component")
    check_target(target, band)
    if table is None and (sizes is None or components is None):
        raise ImpruneError("allocate needs an importance table, or sizes and components")
    names = list(table.components) if table is not None else list(components or [])
    comps = list(components) if components is not None else names
    missing = [c for c in comps if c not in names]
    if missing or not comps:
        raise ImpruneError(f"components {', '.join(missing) or '(none)'} are not in the importance table; "
                           f"choose from {', '.join(names)}")
    cols = [names.index(c) for c in comps]
    if sizes is None:
        sizes = table.tensors["count/component"][:, cols]  # type: ignore[union-attr]
    sizes = torch.nan_to_num(sizes.double(), nan=0.0)
    if method == "importance" and importance is None:
        if table is None or scorer is None or scorer not in table.scorers:
            have = ", ".join(table.scorers) if table is not None else "no table"
            raise ImpruneError(f"importance allocation needs scores for '{scorer}' (the table has {have}); "
                               "pass --scores DIR or pick --alloc-scorer from the table")
        importance = table.matrix(scorer, "component", aggregation="mean")[:, cols]
    present = sizes > 0
    ratios = torch.zeros_like(sizes)
    if method == "uniform":
        ratios[present] = target
    elif granularity == "component":
        imp = importance.double()[present]  # type: ignore[union-attr]
        ratios[present] = importance_ratios(torch.nan_to_num(imp, nan=0.0), sizes[present], target, band, transform)
    else:
        imp = torch.nan_to_num(importance.double(), nan=0.0)  # type: ignore[union-attr]
        layer_size = sizes.sum(1)
        layer_imp = (imp * sizes).sum(1) / layer_size.clamp_min(1.0)
        keep = layer_size > 0
        r = torch.zeros_like(layer_size)
        r[keep] = importance_ratios(layer_imp[keep], layer_size[keep], target, band, transform)
        ratios = torch.where(present, r[:, None].expand_as(sizes), ratios)
    return {layer: {c: float(ratios[layer, j]) for j, c in enumerate(comps) if present[layer, j]}
            for layer in range(sizes.shape[0])}
