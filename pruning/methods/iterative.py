"""Iterative measured removal (SLEB / BlockPruner-style): ``imprune prune --method layers --criterion removal
--iterative`` (whole blocks) and ``--method blocks --iterative`` (attention / MLP sub-blocks).

One-shot ``removal`` ranks every block by the calibration loss increase of bypassing it ALONE and removes the
n lowest together; their effects interact. Here the blocks leave one at a time: each round measures, with the
blocks already chosen bypassed, the mean token NLL of the calibration windows with each remaining candidate
also bypassed, and removes the candidate with the lowest loss (ties: lower index). ``k`` (``--iterative-k``)
is the cheaper variant: after the first round (a full one-pass ranking), only the k best candidates of that
ranking still left are re-measured. Each measurement replays the recorded outputs of the blocks before the
candidate (``importance.validate.ablation.Replay``: every round records the current model once, then runs
blocks l .. L-1 plus the head for candidate l), so the cost is reported in partial forwards and in block
forwards (block-forward equivalents per window batch, the head not counted). Needs the model in memory.
``greedy_removal`` runs the same rounds over any removable groups (``importance.validate.ablation.Group``:
layers, or sub-blocks 'attn' / 'mlp'), until a number of rounds or until no candidate fits a budget.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from importance.arch.canonical import ModelMap
from importance.data.sources import Windows
from importance.errors import ImpruneError
from importance.validate.ablation import Group, Replay, removed


@dataclass
class IterativeResult:
    """The groups in the order they were removed (layers: block indices), the calibration NLL after each removal
    and the cost."""

    order: list = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    base_nll: float = 0.0
    partial_forwards: int = 0
    block_forwards: int = 0  # summed blocks computed by the partial forwards, per batch of windows
    first_round: dict = field(default_factory=dict)  # one-pass ranking: {group: NLL with it removed}


@contextlib.contextmanager
def all_removed(mm: ModelMap, groups: list[Group], means: Mapping[tuple[int, str], Any] | None = None
                ) -> Iterator[None]:
    """Every group of ``groups`` removed (layers bypassed, sub-blocks adding zero, or their ``means``) inside
    the context."""
    with contextlib.ExitStack() as stack:
        for group in groups:
            stack.enter_context(removed(mm, group, means))
        yield


def greedy_removal(model: object, mm: ModelMap, windows: Windows, task: str, candidates: list[Group],
                   fits: Callable[[list[Group], Group], bool], rounds: int | None = None, k: int | None = None,
                   batch_size: int = 4, progress: bool = False,
                   size: Callable[[Group], float] | None = None,
                   means: Mapping[tuple[int, str], Any] | None = None) -> IterativeResult:
    """Remove ``candidates`` one at a time by measured calibration loss (see the module docstring) for ``rounds``
    rounds, or until no candidate left ``fits`` (given the groups already chosen). ``size``: each round takes the
    lowest loss increase per unit of size (e.g. parameters) instead of the lowest loss. ``means``: the constants
    removed sub-blocks add instead of zero (``importance.validate.ablation.removed``)."""
    def key(losses: dict[Group, float], base: float):
        return lambda g: ((losses[g] - base) / (size(g) if size else 1.0), g.layer, g.granularity)

    if k is not None and k < 1:
        raise ImpruneError(f"--iterative-k {k} must be at least 1 (or leave it out to re-measure every candidate)")
    res = IterativeResult()
    ranking: list[Group] = []
    while rounds is None or len(res.order) < rounds:
        left = [g for g in candidates if g not in res.order and fits(res.order, g)]
        if not left:
            break
        with all_removed(mm, res.order, means):
            replay = Replay(model, mm, windows, task, batch_size)
            if not res.order:
                res.base_nll = replay.base
            cands = left if k is None or not res.order else [g for g in ranking if g in left][:k]
            losses = {}
            for group in cands:
                with removed(mm, group, means):
                    losses[group] = replay.nll(group.layer)
                res.partial_forwards += 1
                res.block_forwards += (mm.n_layers - group.layer if replay.shortcut else mm.n_layers) * \
                    len(replay.batches)
        if not res.order:
            res.first_round = losses
            ranking = sorted(losses, key=key(losses, replay.base))
        best = min(losses, key=key(losses, replay.base))
        res.order.append(best)
        res.nll.append(losses[best])
        if progress:
            print(f"  iterative removal {len(res.order)}: {best.label}, calibration NLL {losses[best]:.4f}", flush=True)
    return res


def iterative_removal(model: object, mm: ModelMap, windows: Windows, task: str, n: int, k: int | None = None,
                      batch_size: int = 4, progress: bool = False,
                      means: Mapping[tuple[int, str], Any] | None = None) -> IterativeResult:
    """Choose ``n`` blocks greedily by measured calibration loss (``order`` and ``first_round`` by block index);
    ``means``: a removed block adds its sub-blocks' mean outputs (a compensated removal)."""
    if n >= mm.n_layers:
        raise ImpruneError(f"removing {n} of {mm.n_layers} layers would remove every layer; keep at least one")
    res = greedy_removal(model, mm, windows, task, [Group(i, "layer") for i in range(mm.n_layers)],
                         lambda _chosen, _g: True, n, k, batch_size, progress, means=means)
    res.order = [g.layer for g in res.order]
    res.first_round = {g.layer: v for g, v in res.first_round.items()}
    return res
