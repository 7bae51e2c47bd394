"""Causal check of per-task head maps: remove the k heads a task's map ranks highest, measure every task.

For each task i, its map's top ``k`` heads (SUM aggregation, the heads the map says matter most) are removed
together (q rows and o columns zeroed through the canonical views, ``importance.validate.ablation.removed``;
restored bit for bit afterwards) and every task j is measured on the same items as with nothing removed:

  nll_rise[i, j]   answer NLL per token with task i's heads removed - without (nats; the probes' task loss)
  acc_drop[i, j]   accuracy without - with (the multiple-choice acc of ``pruning.eval.tasks``)

The map of task i is task-specific to the extent that its heads hurt task i more than the others: ``specificity``
(i) = damage[i, i] - mean over j != i of damage[i, j]; over all tasks, the diagonal mean against the
off-diagonal mean. Cost: (tasks + 1) x tasks accuracy evaluations of ``limit`` items each.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from importance.arch.canonical import model_map
from importance.errors import ImpruneError
from importance.models.load import LoadedModel
from importance.table import ImportanceTable
from importance.validate.ablation import Group, removed
from importance.validate.faithfulness import values
from pruning.eval.tasks import TaskAccuracy, probe_accuracy


def top_heads(table: ImportanceTable, scorer: str, k: int) -> list[Group]:
    """The ``k`` heads with the highest SUM score (ties: lower layer, then lower head first)."""
    m = values(table, scorer, "head")  # [L, H]
    flat = torch.nan_to_num(m.flatten().double(), nan=float("-inf"))
    finite = int(torch.isfinite(flat).sum())
    if not 1 <= k <= finite:
        raise ImpruneError(f"--validate-heads {k}: the map has {finite} heads; remove between 1 and {finite}")
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))[:k]
    return [Group(i // m.shape[1], "head", i % m.shape[1]) for i in order]


@dataclass(frozen=True)
class CausalMatrix:
    """Rows: whose heads were removed; columns: which task was measured (both in ``tasks`` order)."""

    tasks: tuple[str, ...]
    k: int
    scorer: str
    base: tuple[TaskAccuracy, ...]
    nll_rise: torch.Tensor  # [n, n] float64
    acc_drop: torch.Tensor  # [n, n] float64
    heads: dict[str, list[str]]

    @staticmethod
    def _split(m: torch.Tensor) -> tuple[float, float]:
        n = m.shape[0]
        diag = float(m.diagonal().mean())
        return diag, float((m.sum() - m.diagonal().sum()) / (n * n - n))

    def summary(self) -> dict[str, Any]:
        """Diagonal / off-diagonal means and per-task specificity for both damage measures."""
        out: dict[str, Any] = {}
        n = len(self.tasks)
        for name, m in (("nll_rise", self.nll_rise), ("acc_drop", self.acc_drop)):
            diag, off = self._split(m)
            spec = {t: float(m[i, i] - (m[i].sum() - m[i, i]) / (n - 1)) for i, t in enumerate(self.tasks)}
            out[name] = {"diagonal_mean": diag, "off_diagonal_mean": off, "specificity": spec}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "k": self.k, "scorer": self.scorer, "heads": self.heads,
                "base": [b.to_dict() for b in self.base], "nll_rise": self.nll_rise.tolist(),
                "acc_drop": self.acc_drop.tolist(), "summary": self.summary()}


def causal_matrix(lm: LoadedModel, maps: Mapping[str, ImportanceTable], scorer: str, k: int, limit: int,
                  seed: int = 0, batch_size: int = 16, base: Sequence[TaskAccuracy] | None = None,
                  progress: bool = False) -> CausalMatrix:
    """The matrix of the module docstring; ``base`` (the no-removal accuracies on the same items) is measured when
    not given."""
    tasks = list(maps)
    if len(tasks) < 2:
        raise ImpruneError("the causal check compares a task with the others: probe at least two tasks")
    mm = model_map(lm.model)
    chosen = {t: top_heads(maps[t], scorer, k) for t in tasks}
    base = list(base) if base is not None else probe_accuracy(lm, tasks, limit, seed, batch_size)
    if [b.task for b in base] != tasks:
        raise ValueError("base accuracies must be given for the tasks in the maps' order")
    n = len(tasks)
    nll = torch.zeros(n, n, dtype=torch.float64)
    acc = torch.zeros(n, n, dtype=torch.float64)
    for i, t in enumerate(tasks):
        with contextlib.ExitStack() as stack:
            for group in chosen[t]:
                stack.enter_context(removed(mm, group))
            after = probe_accuracy(lm, tasks, limit, seed, batch_size)
        for j, (b, a) in enumerate(zip(base, after)):
            nll[i, j] = a.answer_nll - b.answer_nll
            acc[i, j] = b.acc - a.acc
        if progress:
            print(f"  heads of {t:<10} removed: answer NLL +{float(nll[i, i]):.3f} on {t}, mean "
                  f"+{float((nll[i].sum() - nll[i, i]) / (n - 1)):.3f} on the others", flush=True)
    return CausalMatrix(tuple(tasks), k, scorer, tuple(base), nll, acc,
                        {t: [g.label for g in chosen[t]] for t in tasks})
