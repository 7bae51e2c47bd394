"""Iterative measured layer removal (SLEB-style): ``imprune prune --method layers --criterion removal --iterative``.

One-shot ``removal`` ranks every block by the calibration loss increase of bypassing it ALONE and removes the
n lowest together; their effects interact. Here the blocks leave one at a time: each round measures, with the
blocks already chosen bypassed, the mean token NLL of the calibration windows with each remaining candidate
also bypassed, and removes the candidate with the lowest loss (ties: lower index). ``k`` (``--iterative-k``)
is the cheaper variant: after the first round (a full one-pass ranking), only the k best candidates of that
ranking still left are re-measured. Each measurement replays the recorded outputs of the blocks before the
candidate (``importance.validate.ablation.Replay``: every round records the current model once, then runs
blocks l .. L-1 plus the head for candidate l), so the cost is reported in partial forwards and in block
forwards (block-forward equivalents per window batch, the head not counted). Needs the model in memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from importance.arch.canonical import ModelMap
from importance.data.sources import Windows
from importance.errors import ImpruneError
from importance.validate.ablation import Group, Replay, removed


@dataclass
class IterativeResult:
    """The blocks in the order they were removed, the calibration NLL after each removal and the cost."""

    order: list[int] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    base_nll: float = 0.0
    partial_forwards: int = 0
    block_forwards: int = 0  # summed blocks computed by the partial forwards, per batch of windows
    first_round: dict[int, float] = field(default_factory=dict)  # one-pass ranking: {layer: NLL with it bypassed}


@contextlib.contextmanager
def bypassed(mm: ModelMap, layers: list[int]) -> Iterator[None]:
    """Blocks ``layers`` bypassed (output = input) inside the context."""
    with contextlib.ExitStack() as stack:
        for layer in layers:
            stack.enter_context(removed(mm, Group(layer, "layer")))
        yield


def iterative_removal(model: object, mm: ModelMap, windows: Windows, task: str, n: int, k: int | None = None,
                      batch_size: int = 4, progress: bool = False) -> IterativeResult:
    """Choose ``n`` blocks greedily by measured calibration loss (see the module docstring)."""
    if n >= mm.n_layers:
        raise ImpruneError(f"removing {n} of {mm.n_layers} layers would remove every layer; keep at least one")
    if k is not None and k < 1:
        raise ImpruneError(f"--iterative-k {k} must be at least 1 (or leave it out to re-measure every candidate)")
    res = IterativeResult()
    ranking: list[int] = []
    for round_ in range(n):
        with bypassed(mm, res.order):
            replay = Replay(model, mm, windows, task, batch_size)
            if round_ == 0:
                res.base_nll = replay.base
            left = [i for i in range(mm.n_layers) if i not in res.order]
            cands = left if k is None or round_ == 0 else [i for i in ranking if i in left][:k]
            losses = {}
            for layer in cands:
                with removed(mm, Group(layer, "layer")):
                    losses[layer] = replay.nll(layer)
                res.partial_forwards += 1
                res.block_forwards += (mm.n_layers - layer if replay.shortcut else mm.n_layers) * len(replay.batches)
        if round_ == 0:
            res.first_round = losses
            ranking = sorted(losses, key=lambda i: (losses[i], i))
        best = min(losses, key=lambda i: (losses[i], i))
        res.order.append(best)
        res.nll.append(losses[best])
        if progress:
            print(f"  iterative removal {round_ + 1}/{n}: layer {best}, calibration NLL {losses[best]:.4f}", flush=True)
    return res
