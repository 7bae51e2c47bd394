"""Dry checks of a pruning step against a model, before any work: what a method can reach, criteria, N:M.

One rule for every structured method (heads, channels, width, layers): units are whole (a KV group, one
query head per group, one channel, one block) and every layer keeps at least one of each, so a method can
remove at most some fraction ``most`` of what it acts on. A ``--sparsity`` that would need more than
``most`` plus half a unit (i.e. rounding to whole units would take one that must stay) is refused with one
line naming ``most``; anything up to that rounds to whole units as before. ``check_step`` runs the same
checks a method runs before its work, from the model map and the flags alone: ``imprune prune`` calls it
right after loading the model, ``imprune run`` for every recipe step before its first stage.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from importance.arch.canonical import ModelMap
from importance.errors import ImpruneError

if TYPE_CHECKING:
    from pruning.methods.structured import StructuredConfig


@dataclass(frozen=True)
class Limits:
    """``most``: the largest fraction removable; ``fine`` / ``coarse``: the smallest / largest unit, as a
    fraction of its layer's part; ``why``: what must stay."""

    most: float
    fine: float
    coarse: float
    why: str


def check_reachable(sparsity: float, most: float, unit: float, method: str, why: str) -> None:
    """Refuse a target more than half a ``unit`` above ``most`` (see the module docstring)."""
    if sparsity > most + unit / 2 + 1e-9:
        hint = f"pass --sparsity {math.floor(most * 1000) / 1000:g} or less" if most > 0 else "use another method"
        raise ImpruneError(f"--sparsity {sparsity:g} is more than --method {method} can remove from this model: the "
                           f"most is {most:.3f} ({why}); {hint}")


def structured_limits(mm: ModelMap, part: str, gqa: str) -> Limits:
    """What heads / channels / width can remove from ``mm`` (the units ``pruning.methods.structured`` would rank)."""
    from pruning.methods.units import attention_units, channel_units, part_params

    total = removable = 0
    fractions: list[float] = []
    keeps: list[str] = []
    for b in mm.blocks:
        size = part_params(b, part)
        if not size:
            continue
        units = []
        if part in ("heads", "width") and b.n_heads:
            units += attention_units(b, torch.zeros(b.n_heads), None, gqa)
            g = b.n_heads // max(b.n_kv_heads, 1)
            keeps.append(f"one of its {g} query heads per KV group" if gqa == "per-group" and g > 1 else
                         f"one of its {b.n_kv_heads} KV groups")
        if part in ("channels", "width") and b.intermediate:
            units += channel_units(b, torch.zeros(b.intermediate))
            keeps.append("one MLP channel")
        total += size
        removable += sum(u.params for u in units)
        fractions += [u.params / size for u in units]
    why = "every layer keeps " + " and ".join(dict.fromkeys(keeps)) if keeps else "it has nothing to remove"
    return Limits(removable / max(total, 1), min(fractions, default=1.0), max(fractions, default=1.0), why)


def check_structured(mm: ModelMap, cfg: StructuredConfig) -> Limits | None:
    """The heads / channels / width checks before any scoring; the limits, or None when ``--heads`` decides."""
    from pruning.methods.structured import _keep_heads_count

    if cfg.keep_heads is not None:  # a bad head count fails before any scoring
        for b in mm.blocks:
            if b.n_heads:
                _keep_heads_count(b, cfg.keep_heads, cfg.gqa)
        return None
    lim = structured_limits(mm, cfg.part, cfg.gqa)
    check_reachable(cfg.sparsity, lim.most, lim.fine, cfg.part, lim.why)
    return lim


def check_plan(achieved: float, cfg: StructuredConfig, lim: Limits | None) -> None:
    """A plan more than one (largest) unit off its target is refused before anything is cut."""
    if lim is not None and abs(achieved - cfg.sparsity) > lim.coarse + 1e-9:
        hint = "lower --sparsity or --band, or use --allocation uniform" if cfg.allocation == "importance" else \
            f"pass --sparsity {math.floor(achieved * 1000) / 1000:g}"
        raise ImpruneError(f"--method {cfg.part} --sparsity {cfg.sparsity:g} would remove {achieved:.3f} of this "
                           f"model, more than one unit off (some layers cannot lose their share in whole units); "
                           f"{hint}")


def layers_count(n_layers: int, sparsity: float, criterion: str) -> int:
    """How many of ``n_layers`` blocks ``--method layers --sparsity`` removes, or one line saying why not."""
    from pruning.methods.structured import LAYER_CRITERIA

    if not 0.0 <= sparsity < 1.0:
        raise ImpruneError(f"sparsity {sparsity} is outside [0, 1); give the fraction of layers to remove")
    if criterion not in LAYER_CRITERIA:
        raise ImpruneError(f"unknown --criterion '{criterion}'; use one of {', '.join(LAYER_CRITERIA)}")
    check_reachable(sparsity, (n_layers - 1) / n_layers, 1 / n_layers, "layers",
                    f"whole layers: it removes all {n_layers} layers, and one must stay")
    return min(round(sparsity * n_layers), n_layers - 1)


def check_step(mm: ModelMap, method: str, args: argparse.Namespace) -> None:
    """Every check ``method`` makes before its work, from the model map and its flags (no data, no scores)."""
    from pruning.methods import structured as S

    if method in S.PARTS:
        check_structured(mm, S.config_from_args(args, method))
    elif method == "layers":
        from pruning.methods.depth import layers_criterion

        layers_count(mm.n_layers, args.sparsity, layers_criterion(args))
    elif method == "blocks":
        from pruning.methods.blocks import blocks_options, check_blocks

        if getattr(args, "scores", None):
            raise ImpruneError("--method blocks measures its own ranking on --data; drop --scores")
        check_blocks(mm, args.sparsity, blocks_options(args)[0])
    elif method in ("unstructured", "nm"):
        from pruning.methods.unstructured import config_from_args, select_components

        cfg = config_from_args(args, method)
        comps = select_components(mm, cfg.components)
        check_nm_inputs(comps, cfg.nm)


def check_nm_inputs(comps: list[Any], nm: tuple[int, int] | None) -> None:
    """N:M groups run along each row's inputs, so every pruned linear needs a multiple of M of them."""
    bad = [c for c in comps if nm and c.shape[1] % nm[1]]
    if bad:
        raise ImpruneError(f"{bad[0].layer}|{bad[0].name} has {bad[0].shape[1]} inputs, not a multiple of "
                           f"M={nm[1]}; pick another M or fewer --components")
