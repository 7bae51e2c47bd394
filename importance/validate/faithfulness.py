"""How well each scorer predicts the measured ablation: rank correlations and the overlap of what a pruner removes.

For one granularity, the groups present in both the scorer's table and the ablation table (finite values) are
paired: predicted = the scorer's group score (SUM aggregation: the scorer's estimate for removing the whole
group), measured = the ablation's loss increase. Reported per scorer:

  spearman         Pearson correlation of the ranks, tied values sharing their average rank
  kendall          Kendall's tau-b: (concordant - discordant) / sqrt((n0 - ties_x) (n0 - ties_y)), n0 = n(n-1)/2
  bottom_overlap   |bottom k by prediction  AND  bottom k by measurement| / k, k = round(fraction * n) (at least
                   1): the share of what a pruner would remove (the least important ``fraction``) that the
                   measurement also puts there; a random ranking scores about ``fraction`` on average
  n                the number of paired groups

Everything is written in torch (no scipy): ranks by sorting, tau-b by comparing all pairs in row chunks, O(n^2)
time but O(chunk * n) memory, which is instant for the few hundred heads or components of a model.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from importance.errors import ImpruneError
from importance.scorers import layer_only_names
from importance.table import ImportanceTable

BOTTOM_FRACTION = 0.25


def _pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = torch.as_tensor(x, dtype=torch.float64).flatten(), torch.as_tensor(y, dtype=torch.float64).flatten()
    if x.shape != y.shape:
        raise ImpruneError(f"cannot correlate {x.numel()} values with {y.numel()} values; pair them first")
    return x, y


def rank(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n (float64); tied values share the average of the ranks they span."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    n = x.numel()
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    # runs of equal values: their start positions and lengths in sorted order
    new_run = torch.ones(n, dtype=torch.bool)
    new_run[1:] = sorted_x[1:] != sorted_x[:-1]
    run_id = torch.cumsum(new_run.long(), 0) - 1
    starts = torch.nonzero(new_run).flatten().double()
    lengths = torch.bincount(run_id).double()
    avg = starts + (lengths + 1) / 2  # 1-based average rank of each run
    out = torch.empty(n, dtype=torch.float64)
    out[order] = avg[run_id]
    return out


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation with average ranks for ties; NaN when either side is constant or n < 2."""
    x, y = _pair(x, y)
    if x.numel() < 2:
        return float("nan")
    rx, ry = rank(x), rank(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx * rx).sum()) * float((ry * ry).sum()))
    return float((rx * ry).sum()) / denom if denom > 0 else float("nan")


def kendall_tau_b(x: torch.Tensor, y: torch.Tensor, chunk: int = 512) -> float:
    """Kendall's tau-b (ties in either variable handled); NaN when either side is constant or n < 2."""
    x, y = _pair(x, y)
    n = x.numel()
    if n < 2:
        return float("nan")
    s = ties_x = ties_y = 0  # sums over ordered pairs (i, j), i != j: each unordered pair counted twice
    for i in range(0, n, chunk):
        dx = torch.sign(x[i:i + chunk, None] - x[None, :])  # [c, n]
        dy = torch.sign(y[i:i + chunk, None] - y[None, :])
        s += int((dx * dy).sum())
        ties_x += int((dx == 0).sum()) - min(chunk, n - i)  # minus the diagonal
        ties_y += int((dy == 0).sum()) - min(chunk, n - i)
    n0 = n * (n - 1)
    denom = math.sqrt(float(n0 - ties_x) * float(n0 - ties_y))
    return s / denom if denom > 0 else float("nan")


def bottom_overlap(predicted: torch.Tensor, measured: torch.Tensor, fraction: float = BOTTOM_FRACTION) -> float:
    """Share of the ``fraction`` least important groups by prediction that are also among the least by measurement.

    Ties at the cut are broken by position (a stable sort), the same way for both sides.
    """
    p, m = _pair(predicted, measured)
    if not 0 < fraction <= 1:
        raise ImpruneError(f"bottom fraction must be in (0, 1], got {fraction}")
    if p.numel() == 0:
        return float("nan")
    k = max(1, round(fraction * p.numel()))
    low_p = set(torch.argsort(p, stable=True)[:k].tolist())
    low_m = set(torch.argsort(m, stable=True)[:k].tolist())
    return len(low_p & low_m) / k


def agreement(predicted: torch.Tensor, measured: torch.Tensor, fraction: float = BOTTOM_FRACTION) -> dict[str, Any]:
    """Every statistic of the module docstring for one scorer (values already paired, finite)."""
    return {"spearman": spearman(predicted, measured), "kendall": kendall_tau_b(predicted, measured),
            "bottom_overlap": bottom_overlap(predicted, measured, fraction),
            "n": int(torch.as_tensor(predicted).numel())}


# ----------------------------------------------------------------------------------------- tables

def values(table: ImportanceTable, scorer: str, granularity: str, components: list[str] | None = None) -> torch.Tensor:
    """A scorer's SUM-aggregated values at ``granularity`` as [L] (layer) or [L, X]; component columns are
    reordered to ``components`` (NaN where the table has none) so two tables line up by name."""
    if granularity == "layer":
        return table.layer_scores(scorer, "sum")
    m = table.matrix(scorer, granularity, "sum")
    if granularity != "component" or components is None:
        return m
    out = torch.full((m.shape[0], len(components)), float("nan"))
    for j, name in enumerate(components):
        if name in table.components:
            out[:, j] = m[:, table.components.index(name)]
    return out


def paired(scores: ImportanceTable, scorer: str, truth: ImportanceTable, truth_scorer: str,
           granularity: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(predicted [n], measured [n], index [n, 2] = (layer, column)) over groups finite in both tables."""
    t = values(truth, truth_scorer, granularity)
    p = values(scores, scorer, granularity, truth.components if granularity == "component" else None)
    if p.dim() == 2 and p.shape[1] != t.shape[1]:  # head widths differ only when a model was pruned unevenly
        width = min(p.shape[1], t.shape[1])
        p, t = p[:, :width], t[:, :width]
    if p.shape != t.shape:
        raise ImpruneError(f"the score table ({tuple(p.shape)}) and the ablation ({tuple(t.shape)}) describe "
                           "different models; score and validate the same model")
    ok = torch.isfinite(p) & torch.isfinite(t)
    index = torch.nonzero(ok) if ok.dim() == 2 else torch.stack([torch.nonzero(ok).flatten(),
                                                                 torch.zeros(int(ok.sum()), dtype=torch.long)], 1)
    return p[ok], t[ok], index


def compare(scores: ImportanceTable, truth: ImportanceTable, granularity: str, truth_scorer: str = "ablation",
            fraction: float = BOTTOM_FRACTION) -> dict[str, Any]:
    """Agreement of every scorer of ``scores`` that has ``granularity`` with the ablation at that granularity:
    ``{"n": groups, "best": scorer with the highest Spearman, "scorers": {name: agreement(...)}}``."""
    if not truth.has(truth_scorer, granularity):
        raise ImpruneError(f"the ablation table has no '{granularity}' measurement; run validate with "
                           f"--granularity {granularity}")
    out: dict[str, Any] = {}
    n = 0
    for scorer in scores.scorers:
        if scorer == truth_scorer or not scores.has(scorer, granularity):
            continue
        p, t, _ = paired(scores, scorer, truth, truth_scorer, granularity)
        out[scorer] = agreement(p, t, fraction)
        n = max(n, out[scorer]["n"])
    if not out:
        raise ImpruneError(f"no scorer in the score table has '{granularity}' values; score with taylor, fisher, "
                           f"activation or magnitude ({', '.join(layer_only_names())} are layer-only)")
    finite = {k: v["spearman"] for k, v in out.items() if v["spearman"] == v["spearman"]}
    best = max(finite, key=finite.__getitem__) if finite else None
    return {"n": n, "best": best, "bottom_fraction": fraction, "scorers": out}
