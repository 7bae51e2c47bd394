"""Depth pruning: remove whole blocks with the lowest layer score (``imprune prune --method layers``).

Criteria: block_influence (lowest 1 - cos), residual_fisher (the per-token Fisher of the block's update; the
default), removal (the measured calibration loss increase when the block alone is bypassed), taylor / fisher
(the mask score of the block's parameters). The config's layer count and per-layer lists follow the cut.
``--iterative`` (with removal) re-measures after every removal (``pruning.methods.iterative``; ``--iterative-k``
re-measures only the k best of the first round's ranking).

``--compensate mean``: a removed block adds its attention's and MLP's mean outputs over the calibration tokens
instead of nothing (one [d] constant per sub-block, computed once on the dense model; the iterative rounds measure
it that way, a table's ranking was measured without it). The block then stays as those two constants (its
attention and MLP are gone, ``pruning.methods.blocks.remove_branches``), so the folder reloads through imprune's
loader; with ``none`` (the default) blocks are dropped and the config's layer count follows the cut (plain
transformers reloads it). ``--compensate linear``: the layers are chosen as with ``mean``, then each removed block
becomes a fitted map ``x + x W^T + b`` ([d, d] + [d] parameters: ``pruning.methods.standins``), fitted block by
block against the dense model's stream; the folder reloads through imprune's loader.
"""

from __future__ import annotations

from typing import Any

from importance.arch.branches import branch_means, branches
from importance.arch.canonical import model_map
from importance.data.sources import Windows
from importance.errors import ImpruneError
from importance.models.load import LoadedModel
from importance.table import ImportanceTable
from pruning.methods.blocks import remove_branches
from pruning.methods.checks import layers_count
from pruning.methods.iterative import iterative_removal
from pruning.methods.registry import (
    COMPENSATE,
    ITERATIVE,
    ITERATIVE_K,
    PruneContext,
    PruneResult,
    register_method,
    table_for,
)
from pruning.methods.standins import fit_linear_blocks
from pruning.methods.structured import STRUCTURED_FLAGS, check_in_memory, component_sparsity
from pruning.methods.surgery import drop_blocks, param_count

LAYER_COMPENSATIONS = ("mean", "linear", "none")


def layers_to_remove(table: ImportanceTable, criterion: str, n: int) -> list[int]:
    """The ``n`` layers with the lowest layer score (ties: lower index first)."""
    scores = table.layer_scores(criterion)
    if n >= table.n_layers:
        raise ImpruneError(f"removing {n} of {table.n_layers} layers would remove every layer; keep at least one")
    return sorted(sorted(range(table.n_layers), key=lambda i: (float(scores[i]), i))[:n])


def prune_layers(lm: LoadedModel, sparsity: float, criterion: str = "residual_fisher",
                 table: ImportanceTable | None = None, windows: Windows | None = None, batch_size: int = 4,
                 progress: bool = False, iterative: bool = False, k: int | None = None,
                 compensate: str = "none", removal_tokens: int | None = None) -> PruneResult:
    """Remove round(sparsity x layers) whole blocks with the lowest ``criterion`` layer score (``iterative``:
    chosen one at a time by measured calibration loss, ``pruning.methods.iterative``; ``compensate='mean'``: each
    removed block adds its sub-blocks' calibration means, module docstring; ``removal_tokens``: the calibration
    tokens the iterative rounds measure on, default 2,048)."""
    check_in_memory(lm)
    mm = model_map(lm.model)
    n = layers_count(mm.n_layers, sparsity, criterion)
    extra: dict[str, Any] = {}
    if compensate not in LAYER_COMPENSATIONS:
        raise ImpruneError(f"unknown --compensate '{compensate}'; use one of {', '.join(LAYER_COMPENSATIONS)}")
    means = None
    if compensate in ("mean", "linear"):  # linear: the choice measured with the means, then fitted maps
        if windows is None:
            raise ImpruneError(f"--compensate {compensate} fits each removed block's stand-in on calibration data: "
                               "pass --data")
        try:
            subs = branches(mm)
        except ImpruneError as err:  # its reason, with this method's way out
            raise ImpruneError(f"--compensate {compensate} keeps a removed block as stand-ins of its sub-blocks, which "
                               f"this model cannot: {err}; use --compensate none") from None
        means = branch_means(lm.model, mm, subs, windows, batch_size)
    if iterative:
        if criterion != "removal":
            raise ImpruneError("--iterative re-measures the calibration loss: use it with --criterion removal")
        if windows is None:
            raise ImpruneError("--iterative needs calibration data: pass --data (e.g. austen:train)")
        from importance.scoring import removal_windows

        measure = removal_windows(windows) if removal_tokens is None else removal_windows(windows, removal_tokens)
        it = iterative_removal(lm.model, mm, measure, lm.task, n, k, batch_size, progress, means)
        removed = sorted(it.order)
        scores_list = [it.first_round.get(i, float("nan")) - it.base_nll for i in range(mm.n_layers)]
        extra = {"iterative": {"order": it.order, "nll_after_each": it.nll, "base_nll": it.base_nll, "k": k,
                               "partial_forwards": it.partial_forwards, "block_forwards": it.block_forwards}}
    else:
        table = table_for(lm, table, criterion, windows, batch_size, progress)
        removed = layers_to_remove(table, criterion, n)
        scores_list = table.layer_scores(criterion).tolist()
    keep = [i for i in range(mm.n_layers) if i not in removed]
    before = {(c.layer, c.name): c.numel for c in mm.components()}
    params_before = param_count(lm.model)
    keep_map = {i: i for i in range(mm.n_layers)}  # new block index -> original (stand-ins keep their place)
    if compensate == "linear":
        fits = fit_linear_blocks(lm.model, mm, windows, removed, batch_size, progress=progress)
        after, changed = model_map(lm.model), []
        d = int(next(iter(means.values())).numel())
        extra["compensation"] = f"each removed block is a linear stand-in x + x W^T + b ([{d}, {d}] + [{d}]) fitted " \
                                f"by damped least squares on {len(windows)} calibration windows against the dense " \
                                "model's stream after it, block by block (the block list is unchanged)"
        extra["stand_in_fit"] = {str(i): {"relative_residual": f["residual_energy"] / max(f["target_energy"], 1e-30),
                                          "tokens": f["tokens"]} for i, f in fits.items()}
    elif means is None:
        changed = drop_blocks(mm, keep)
        after = model_map(lm.model)
        keep_map = dict(enumerate(keep))
    else:  # each removed block becomes its two constants (the block list and the config stay)
        gone = [b for b in subs if b.layer in removed]
        after, _, changed = remove_branches(mm, gone, means)
        extra["compensation"] = f"each removed block adds its sub-blocks' mean outputs over {len(windows)} " \
                                "calibration windows (kept as constants; the block list is unchanged)"
    # counted after the surgery: stand-ins keep their constants or maps, and a norm both branches shared stays
    planned = params_before - param_count(lm.model)
    record = {"shapes_changed": True,
              "structured": {"criterion": criterion, "layers_removed": removed,
                             "layers_kept": list(keep_map.values()),  # the pruned model's blocks, original index
                             "layer_scores": scores_list, "config_fields_changed": changed,
                             "achieved": len(removed) / len(scores_list), **extra},
              "params_plan": {"before": params_before, "removed": planned, "after": params_before - planned}}
    return PruneResult(record, component_sparsity(before, after, keep_map), shapes_changed=True, uniform=True)


def layers_criterion(a: Any) -> str:
    """The ``--method layers`` criterion (default residual_fisher); head / bias flags do not apply."""
    for flag, value, default in (("--heads", a.heads, None), ("--bias-compensation", a.bias_compensation, False),
                                 ("--reconstruct", getattr(a, "reconstruct", None), None)):
        if value != default:
            raise ImpruneError(f"{flag} does not apply to --method layers; drop it")
    return getattr(a, "criterion", None) or "residual_fisher"


@register_method("layers", "remove whole layers by their layer scores (block_influence, residual_fisher, removal, "
                 "taylor, fisher ...)", args=[*STRUCTURED_FLAGS, ITERATIVE, ITERATIVE_K, COMPENSATE])
def layers_method(ctx: PruneContext) -> PruneResult:
    a = ctx.args
    criterion = layers_criterion(a)
    iterative = bool(getattr(a, "iterative", False))
    if getattr(a, "iterative_k", None) is not None and not iterative:
        raise ImpruneError("--iterative-k applies to --iterative only; add --iterative or drop it")
    compensate = getattr(a, "compensate", None) or "none"
    windows = ctx.calibration() if ctx.table is None or iterative or compensate != "none" else None
    return prune_layers(ctx.lm, a.sparsity, criterion, ctx.table, windows, a.batch_size, progress=not a.quiet,
                        iterative=iterative, k=getattr(a, "iterative_k", None), compensate=compensate,
                        removal_tokens=getattr(a, "removal_tokens", None))
