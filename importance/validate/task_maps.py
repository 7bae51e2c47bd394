"""Are per-task head maps task-specific? Split-half reliability of each task's map against its similarity to the
other tasks' maps.

Each task's items are split into two interleaved halves A and B (``importance.scoring.score_parts``), each scored
alone. On the flattened layer x head map (SUM aggregation, heads finite in both maps):

  reliability(i)   Spearman(A_i, B_i): how well the map reproduces itself on other items of the same task
  similarity(i)    mean over the other tasks j of (Spearman(A_i, B_j) + Spearman(B_i, A_j)) / 2: how well it
                   predicts another task's map, from half-size maps too, so both numbers carry the same noise
  specific(i)      reliability(i) > similarity(i); a map that is no more like itself than like the others shows
                   structure the tasks share (which heads matter for any text), not a task-specific one

``cross`` is the whole [tasks x tasks] matrix: reliability on the diagonal, similarity terms off it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from importance.errors import ImpruneError
from importance.table import ImportanceTable
from importance.validate.faithfulness import spearman, values


@dataclass(frozen=True)
class MapAgreement:
    """One task's map: ``reliability`` (half vs half), ``similarity`` (mean to the other tasks), ``specific``."""

    task: str
    reliability: float
    similarity: float
    specific: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def head_vector(table: ImportanceTable, scorer: str) -> torch.Tensor:
    """The table's [L, H] head map (SUM aggregation) flattened to [L * H] (NaN where a layer has fewer heads)."""
    return values(table, scorer, "head").flatten()


def map_spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman of two flattened maps over the heads finite in both."""
    ok = torch.isfinite(a) & torch.isfinite(b)
    if int(ok.sum()) < 3:
        raise ImpruneError("the head maps share fewer than 3 heads; score the same model for every task")
    return spearman(a[ok], b[ok])


def map_agreement(halves: Mapping[str, tuple[ImportanceTable, ImportanceTable]],
                  scorer: str) -> tuple[list[MapAgreement], torch.Tensor]:
    """Per task (in the order given) its agreement, and the [n, n] cross matrix of the module docstring."""
    names = list(halves)
    if len(names) < 2:
        raise ImpruneError("task specificity compares a task's map with the others': probe at least two tasks")
    vec = {t: (head_vector(a, scorer), head_vector(b, scorer)) for t, (a, b) in halves.items()}
    n = len(names)
    cross = torch.zeros(n, n, dtype=torch.float64)
    for i, ti in enumerate(names):
        for j, tj in enumerate(names):
            if i == j:
                cross[i, j] = map_spearman(vec[ti][0], vec[ti][1])
            elif j > i:
                cross[i, j] = cross[j, i] = (map_spearman(vec[ti][0], vec[tj][1])
                                             + map_spearman(vec[ti][1], vec[tj][0])) / 2
    out = []
    for i, t in enumerate(names):
        rel = float(cross[i, i])
        sim = float((cross[i].sum() - cross[i, i]) / (n - 1))
        out.append(MapAgreement(t, rel, sim, rel > sim))
    return out, cross
