"""Registry of pruning methods behind ``imprune prune --method NAME``.

A method is a function ``fn(ctx: PruneContext) -> PruneResult`` that changes ``ctx.lm.model`` in place,
registered with ``@register_method(name, args=[...])``; its extra CLI flags are declared with it (flags
shared by several methods must be declared identically). The ``prune`` command does everything around it:
validation, loading, evaluation before/after, and writing the output folder.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from importance.data.sources import Windows
from importance.errors import ImpruneError
from importance.models.load import LoadedModel
from importance.table import ImportanceTable

Arg = tuple[tuple[str, ...], dict[str, Any]]


@dataclass
class PruneContext:
    """What a method gets: the model, the parsed flags, the importance table (if given or scored), and
    ``calibration()`` which loads the calibration windows on first use."""

    lm: LoadedModel
    args: argparse.Namespace
    table: ImportanceTable | None
    calibration: Callable[[], Windows]


@dataclass
class PruneResult:
    """``record`` goes into imprune.json (recipe, allocation, removed ids, achieved sparsity ...).

    ``sparsity`` is the fraction removed per layer x component as ``{layer: {component: fraction}}`` (what
    the sparsity heatmap draws); ``shapes_changed`` marks physical removal; ``uniform`` is False when
    layers ended with different widths (the folder then needs ``importance.models.pruned.load_pruned``).
    """

    record: dict[str, Any]
    sparsity: dict[int, dict[str, float]] = field(default_factory=dict)
    shapes_changed: bool = False
    uniform: bool = True


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    args: tuple[Arg, ...]
    fn: Callable[[PruneContext], PruneResult]
    needs_table: bool = False
    offload: bool = False  # works on a model accelerate offloaded (``--max-memory``): weights change in place


METHODS: dict[str, Method] = {}

# flags that several methods share, declared once here so every method spells them the same way;
# each method checks the values it accepts (e.g. block_influence only ranks whole layers)
CRITERION: Arg = (("--criterion",), dict(
    default=None,
    help="ranking: magnitude | wanda | activation | taylor | fisher | sparsegpt (unstructured, nm); "
         "taylor | fisher | activation | magnitude (structured; default fisher); layers also "
         "residual_fisher | removal | block_influence (default residual_fisher); blocks removal | gate_fisher "
         "(default removal)"))
ALLOCATION: Arg = (("--allocation",), dict(
    default="uniform",
    help="per-layer x component ratios: uniform | importance (bounded by --band around the target) | "
         "global (one threshold, unstructured only)"))
BAND: Arg = (("--band",), dict(type=float, default=0.1,
                               help="largest per-layer deviation from the target ratio (--allocation importance)"))
COMPENSATE: Arg = (("--compensate",), dict(
    choices=("mean", "linear", "none"), default=None,
    help="blocks / layers: what a removed sub-block or layer adds: its mean output over the calibration tokens "
         "(mean; the default for blocks), for layers also a fitted linear map of the block input (linear: "
         "x + x W^T + b, d*d + d parameters a block), or nothing (none; the default for layers, whose folder then "
         "reloads in plain transformers)"))
ITERATIVE: Arg = (("--iterative",), dict(
    action="store_true", help="layers with --criterion removal, blocks: remove one layer / sub-block at a time, "
                              "re-measuring the calibration loss of the remaining candidates after each removal"))
ITERATIVE_K: Arg = (("--iterative-k",), dict(
    type=int, default=None, help="--iterative: re-measure only the k best candidates of the first round's ranking"))
DAMP: Arg = (("--damp",), dict(type=float, default=0.01,
                               help="second-order dampening (sparsegpt; structured --reconstruct), as a fraction of "
                                    "mean(diag H)"))


def register_method(name: str, help: str, args: Sequence[Arg] = (), needs_table: bool = False,
                    offload: bool = False):
    def add(fn: Callable[[PruneContext], PruneResult]) -> Callable[[PruneContext], PruneResult]:
        METHODS[name] = Method(name, help, tuple(args), fn, needs_table, offload)
        return fn

    return add


def method_sparsity(method: str, sparsity: float | None, nm: str | None, where: str = "",
                    flags: tuple[str, str] = ("--sparsity", "--nm")) -> float:
    """The sparsity a step runs at: as given, or for ``--method nm`` taken from ``--nm N:M`` (1 - N/M) when
    it is not given (both given must agree: the method checks that). One rule for `prune` and recipes."""
    if sparsity is None and method == "nm" and nm is not None:
        from pruning.methods.masks import parse_nm

        n, m = parse_nm(str(nm))
        if not 0 < n < m:
            raise ImpruneError(f"{where}N:M pattern {n}:{m} needs 0 < N < M, e.g. 2:4")
        return 1 - n / m
    if sparsity is None:
        raise ImpruneError(f"{where}{flags[0]} is missing: give the fraction to remove, e.g. 0.5"
                           + (f", or the pattern as {flags[1]} 2:4" if method == "nm" else ""))
    return float(sparsity)


def table_for(lm: LoadedModel, table: ImportanceTable | None, scorer: str,
              windows: Windows | Callable[[], Windows] | None, batch_size: int, progress: bool,
              hint: str = "") -> ImportanceTable:
    """``table`` when it has ``scorer`` (else a one-line error ending in ``hint``); without a table, ``scorer``
    scored now on the calibration ``windows`` (or what ``windows()`` returns)."""
    if table is not None:
        if scorer not in table.scorers:
            raise ImpruneError(f"the --scores table has no '{scorer}' scores (it has {', '.join(table.scorers)}); "
                               + (hint or f"score with --scorers {scorer} or pick another --criterion"))
        return table
    w = windows() if callable(windows) else windows
    if w is None:
        raise ImpruneError("no importance table and no calibration windows to score with; pass --scores or --data")
    from importance.scoring import parse_scorers, score

    return score(lm, w, parse_scorers(scorer), batch_size=batch_size, progress=progress)


Arg = tuple[tuple[str, ...], dict[str, Any]]


def arg(*flags: str, **kwargs: Any) -> Arg:
    return flags, kwargs


METHOD_MODULES = ("pruning.methods.unstructured", "pruning.methods.structured", "pruning.methods.depth",
                  "pruning.methods.blocks")


def load_methods() -> None:
    for mod in METHOD_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name != mod:
                raise
