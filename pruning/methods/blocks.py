"""Sub-block pruning: remove the attention or the MLP of a block on its own (``imprune prune --method blocks``).

Candidates are the residual branches of every block (``importance.arch.branches``: the attention module or the
MLP module with the norms only it reads); a removed branch adds zero to the residual stream, its modules gone
(a parameter-free stand-in), so the model is smaller and does less work. Ranking (``--criterion``):

  removal     measured (default): the mean token NLL increase on the calibration windows (the first
              ``--removal-tokens``, default 2,048, as the ``removal`` layer scorer) when that branch alone adds
              zero; one recorded forward, then one partial forward per branch from its block on
              (``importance.validate.ablation.Replay``, the runner the layer ``removal`` scorer uses)
  gate_fisher one pass (a forward + backward per batch): sum over tokens of (g_t . y_t)^2 / N, y_t the branch's
              output at token t and g_t the gradient of the summed NLL there, i.e. the Fisher of a per-token gate
              on the branch (the layers' ``residual_fisher``, per sub-block: ``CollectConfig.branch_fisher`` of the
              one pass, ``importance.engine.collect``), on all the calibration windows

Budget: ``--sparsity S`` is the fraction of the BLOCK parameters (every block's attention + MLP + norms) to remove,
across both kinds. Branches are taken in ascending score per parameter (an MLP has about three times the
parameters of an attention: on SmolLM2 at 25%, 179.85 perplexity against 266.79 by score alone, whose many cheap
attention sub-blocks removed together collapse) while they fit in what is left of the budget; the last
branch of a kind is never taken, and a budget that could only be met by removing every attention or every MLP is
refused before any work. A block that loses both branches is dropped whole (the same function: x + 0 + 0).

Compensation (``--compensate``, default ``mean``): a removed branch adds its mean output over the calibration tokens
(one constant vector [d], computed once on the dense model, FLAP's bias compensation applied to a whole sub-block)
instead of zero; the measured removal and the iterative rounds measure it that way, so the ranking sees what the
pruned model will compute. On SmolLM2, the same 15 sub-blocks (25%) give 86.55 with their means against 111.05 with
zeros. A block losing both branches then stays as two constants (no block forward: attention and MLP are gone).
``none`` adds zero (the stand-in holds no parameter). ``gate_fisher`` estimates zeroing; with ``mean`` it only
ranks, the removal still adds the means.
``--iterative`` (with removal; BlockPruner's procedure) instead takes them one at a time: each round re-measures the
remaining candidates with the chosen ones already removed (adding zero, or their means) and takes the lowest loss
increase per parameter that fits
(``pruning.methods.iterative.greedy_removal``; ``--iterative-k`` re-measures only the k best of the first round).
After the surgery the calibration NLL of the pruned model is compared with the dense model's with the chosen
branches zeroed: they must agree (a check that the stand-ins compute what was measured), and both go into the
record. The folder reloads with ``importance.models.pruned.load_pruned`` (imprune.json records the removed
branches: no transformers config can describe a block without attention or MLP).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from typing import Any

import torch

from importance.arch.branches import Branch, branch_means, branches, skip_branch_, zeroed
from importance.arch.canonical import ModelMap, model_map
from importance.data.sources import Windows
from importance.errors import ImpruneError
from importance.models.load import LoadedModel
from importance.validate.ablation import Group, Replay
from pruning.methods.iterative import greedy_removal
from pruning.methods.registry import COMPENSATE, ITERATIVE, ITERATIVE_K, PruneContext, PruneResult, arg, register_method
from pruning.methods.structured import check_in_memory, component_sparsity
from pruning.methods.surgery import drop_blocks, param_count

BLOCK_CRITERIA = ("removal", "gate_fisher")


def block_params(mm: ModelMap) -> int:
    """Parameters of every block (attention + MLP + norms): what ``--sparsity`` is a fraction of."""
    return sum(p.numel() for b in mm.blocks for p in b.module.parameters())


def check_blocks(mm: ModelMap, sparsity: float, criterion: str) -> list[Branch]:
    """The candidate branches, or one line saying why this model / budget / criterion cannot be pruned so."""
    if criterion not in BLOCK_CRITERIA:
        raise ImpruneError(f"unknown --criterion '{criterion}' for --method blocks; use one of "
                           f"{', '.join(BLOCK_CRITERIA)}")
    if not 0.0 <= sparsity < 1.0:
        raise ImpruneError(f"--sparsity {sparsity} is outside [0, 1); give the fraction of block parameters to remove")
    cands = branches(mm)
    total = block_params(mm)
    for kind, what in (("attn", "attention"), ("mlp", "MLP")):
        sizes = [b.params for b in cands if b.kind == kind]
        if not sizes:
            raise ImpruneError(f"this model has no {what} sub-blocks left to keep; use --method layers")
        most = (total - min(sizes) - min((b.params for b in cands if b.kind != kind), default=0)) / total
        if sparsity * total > most * total + 0.5:
            raise ImpruneError(f"--sparsity {sparsity:g} would remove every {what} sub-block (one attention and one "
                               f"MLP must stay): at most {int(most * 1000) / 1000:g} of the block parameters can go; "
                               "lower --sparsity")
    return cands


def select_branches(cands: list[Branch], scores: dict[tuple[int, str], float], budget: float) -> list[Branch]:
    """Branches in ascending score per parameter (ties: lower layer, attention first) while they fit in
    ``budget`` parameters; never the last branch of a kind."""
    left = Counter(b.kind for b in cands)
    taken, used = [], 0
    for b in sorted(cands, key=lambda b: (scores[(b.layer, b.kind)] / b.params, b.layer, b.kind)):
        if used + b.params <= budget and left[b.kind] > 1:
            taken.append(b)
            used += b.params
            left[b.kind] -= 1
    return taken


Means = dict[tuple[int, str], torch.Tensor]  # {(layer, kind): [d]} the constants compensated branches add
COMPENSATIONS = ("mean", "none")


def measured_removal(model: Any, mm: ModelMap, cands: list[Branch], windows: Windows, task: str, batch_size: int = 4,
                     progress: bool = False, means: Means | None = None
                     ) -> tuple[dict[tuple[int, str], float], float, int]:
    """{(layer, kind): mean token NLL increase when that branch alone adds zero (or its mean, ``means``)}, the
    base NLL, partial forwards."""
    replay = Replay(model, mm, windows, task, batch_size)
    scores = {}
    for i, b in enumerate(cands):
        scores[(b.layer, b.kind)] = replay.delta(Group(b.layer, b.kind), means)
        if progress:
            print(f"  removal {i + 1}/{len(cands)}: {b.label} {scores[(b.layer, b.kind)]:+.4f} nats", flush=True)
    return scores, replay.base, len(cands)


def gate_fisher(model: Any, mm: ModelMap, cands: list[Branch], windows: Windows, task: str,
                batch_size: int = 4) -> dict[tuple[int, str], float]:
    """{(layer, kind): sum over tokens of (g_t . y_t)^2 / N}: the one-pass gate-Fisher estimate of each branch."""
    from importance.engine.collect import collect
    from importance.engine.stats import CollectConfig

    cfg = CollectConfig(grad=True, activation=False, block_influence=False, branch_fisher=True)
    stats = collect(model, windows, task, cfg, batch_size, progress=False, mm=mm)
    n = max(stats.count("targets"), 1.0)
    return {(b.layer, b.kind): float(stats.get(b.layer, "block", f"{b.kind}_fisher")[0]) / n for b in cands}


def _nll(model: Any, mm: ModelMap, windows: Windows, task: str, batch_size: int, zero: list[Branch],
         means: Means | None = None) -> float:
    """Mean token NLL of ``windows`` with the branches ``zero`` adding zero, or their ``means`` (a full forward)."""
    with contextlib.ExitStack() as stack:
        for b in zero:
            stack.enter_context(zeroed(mm, b, None if means is None else means[(b.layer, b.kind)]))
        return Replay(model, mm, windows, task, batch_size, shortcut=False).base


def remove_branches(mm: ModelMap, chosen: list[Branch], means: Means | None = None
                    ) -> tuple[ModelMap, list[int], list[str]]:
    """Remove ``chosen`` for real: blocks losing both branches are dropped (unless their ``means`` are kept), the
    other branches skipped (adding their mean when ``means`` is given). Returns the new map, the dropped layers
    (old indices) and the config fields changed."""
    per_layer = Counter(b.layer for b in chosen)
    dropped = [] if means is not None else sorted(layer for layer, n in per_layer.items() if n == 2)
    changed: list[str] = []
    if dropped:
        changed = drop_blocks(mm, [i for i in range(mm.n_layers) if i not in dropped])
    new_index = {old: new for new, old in enumerate(i for i in range(mm.n_layers) if i not in dropped)}
    mm = model_map(mm.model)
    for b in chosen:
        if b.layer not in dropped:
            skip_branch_(mm, Branch(new_index[b.layer], b.kind, b.module, b.norms, b.last, b.params),
                         None if means is None else means[(b.layer, b.kind)])
    return model_map(mm.model), dropped, changed


def iterative_branches(model: Any, mm: ModelMap, cands: list[Branch], windows: Windows, task: str, budget: float,
                       k: int | None, batch_size: int, progress: bool, means: Means | None = None
                       ) -> tuple[list[Branch], dict, float, dict]:
    """Sub-blocks chosen one at a time by measured calibration loss (``pruning.methods.iterative.greedy_removal``)
    while they fit in ``budget`` (never the last of a kind): (chosen, first-round scores, base NLL, cost)."""
    by = {(b.layer, b.kind): b for b in cands}
    count = Counter(b.kind for b in cands)

    def fits(chosen: list[Group], g: Group) -> bool:
        used = sum(by[(c.layer, c.granularity)].params for c in chosen)
        same = sum(c.granularity == g.granularity for c in chosen)
        return used + by[(g.layer, g.granularity)].params <= budget and count[g.granularity] - same > 1

    it = greedy_removal(model, mm, windows, task, [Group(b.layer, b.kind) for b in cands], fits, k=k,
                        batch_size=batch_size, progress=progress, size=lambda g: by[(g.layer, g.granularity)].params,
                        means=means)
    scores = {(g.layer, g.granularity): v - it.base_nll for g, v in it.first_round.items()}
    cost = {"iterative": {"order": [g.label for g in it.order], "nll_after_each": it.nll, "k": k,
                          "partial_forwards": it.partial_forwards, "block_forwards": it.block_forwards}}
    return [by[(g.layer, g.granularity)] for g in it.order], scores, it.base_nll, cost


def prune_blocks(lm: LoadedModel, sparsity: float, criterion: str = "removal", windows: Windows | None = None,
                 batch_size: int = 4, progress: bool = False, removal_tokens: int | None = None,
                 iterative: bool = False, k: int | None = None,
                 scores: dict[tuple[int, str], float] | None = None, compensate: str = "mean") -> PruneResult:
    """Remove attention / MLP sub-blocks of ``lm.model`` in place up to ``sparsity`` of the block parameters,
    ranked by ``criterion`` on the calibration ``windows`` (``iterative``: chosen one at a time, re-measured
    after each removal; see the module docstring). ``scores``: a ranking measured before ({(layer, kind): score},
    e.g. the first round of an iterative run on the same data), used instead of measuring again. ``compensate``:
    'mean' (removed branches add their calibration mean) or 'none' (zero)."""
    if compensate == "linear":
        raise ImpruneError("--compensate linear replaces whole blocks (--method layers); for sub-blocks use "
                           "--compensate mean or none")
    if compensate not in COMPENSATIONS:
        raise ImpruneError(f"unknown --compensate '{compensate}'; use one of {', '.join(COMPENSATIONS)}")
    check_in_memory(lm)
    mm = model_map(lm.model)
    cands = check_blocks(mm, sparsity, criterion)
    if iterative and criterion != "removal":
        raise ImpruneError("--iterative re-measures the calibration loss: use it with --criterion removal")
    if windows is None:
        raise ImpruneError("--method blocks ranks sub-blocks on calibration data: pass --data (e.g. austen:train)")
    from importance.scoring import REMOVAL_TOKENS, removal_windows

    measure = removal_windows(windows, removal_tokens or REMOVAL_TOKENS)
    total, params_before = block_params(mm), param_count(lm.model)
    before = {(c.layer, c.name): c.numel for c in mm.components()}
    start = time.perf_counter()
    means = branch_means(lm.model, mm, cands, windows, batch_size) if compensate == "mean" else None
    cost: dict[str, Any] = {}
    chosen: list[Branch] | None = None
    if scores is not None:
        if iterative:
            raise ValueError("scores measured before cannot drive an iterative run")
        base = None
    elif iterative:
        chosen, scores, base, cost = iterative_branches(lm.model, mm, cands, measure, lm.task, sparsity * total, k,
                                                        batch_size, progress, means)
    elif criterion == "removal":
        scores, base, forwards = measured_removal(lm.model, mm, cands, measure, lm.task, batch_size, progress,
                                                  means)
        cost = {"partial_forwards": forwards}
    else:
        scores = gate_fisher(lm.model, mm, cands, windows, lm.task, batch_size)
        base = None
    rank_seconds = time.perf_counter() - start
    if chosen is None:
        chosen = select_branches(cands, scores, sparsity * total)
    planned = _nll(lm.model, mm, measure, lm.task, batch_size, chosen, means)
    mm, dropped, changed = remove_branches(mm, chosen, means)
    after = _nll(lm.model, mm, measure, lm.task, batch_size, [])
    if abs(after - planned) > 1e-4 * max(1.0, abs(planned)):
        raise ImpruneError(f"model type '{mm.model_type}': with the sub-blocks removed the calibration NLL is "
                           f"{after:.6f}, not the {planned:.6f} measured with them replaced; sub-block removal does "
                           "not work for this architecture (use --method layers)")
    kept = 0 if means is None else sum(int(means[(b.layer, b.kind)].numel()) for b in chosen)  # the constants
    removed = sum(b.params for b in chosen) - kept
    kept_layers = [i for i in range(len(mm.blocks) + len(dropped)) if i not in dropped]
    selection = ("one at a time, the lowest re-measured loss increase per parameter that fits" if iterative else
                 "sub-blocks in ascending score per parameter while they fit in the budget")
    record = {"shapes_changed": True,
              "structured": {"criterion": criterion,
                             "selection": selection + " (never the last of a kind); a block losing both is dropped"
                             + (" (kept as its two constants when compensated)" if means is not None else ""),
                             "compensation": {"mean": "a removed sub-block adds its mean output over the "
                                              f"{len(windows)} calibration windows ({kept} parameters)",
                                              "none": "a removed sub-block adds zero"}[compensate],
                             "sub_blocks_removed": [{"layer": b.layer, "kind": b.kind, "params": b.params,
                                                     "score": scores[(b.layer, b.kind)]} for b in chosen],
                             "layers_removed": dropped, "layers_kept": kept_layers, "config_fields_changed": changed,
                             "scores": {f"{layer} {kind}": v for (layer, kind), v in scores.items()},
                             "achieved": removed / total, "block_params": total, "rank_seconds": round(rank_seconds, 2),
                             "calibration_nll": {"dense": base, "planned": planned, "after": after,
                                                 "windows": len(measure), "seq_len": measure.seq_len}, **cost},
              "params_plan": {"before": params_before, "removed": removed, "after": params_before - removed}}
    return PruneResult(record, component_sparsity(before, mm, dict(enumerate(kept_layers))), shapes_changed=True,
                       uniform=False)


_REMOVAL_TOKENS = arg("--removal-tokens", type=int, default=None,
                      help="blocks, layers --iterative: calibration tokens the measured removal runs on "
                           "(default 2048, whole windows)")


def blocks_options(a: Any) -> tuple[str, bool, int | None, str]:
    """(criterion, iterative, k, compensate) from the ``prune`` flags, or one line naming a flag that does not
    apply."""
    for flag, value, default in (("--heads", getattr(a, "heads", None), None),
                                 ("--bias-compensation", getattr(a, "bias_compensation", False), False),
                                 ("--reconstruct", getattr(a, "reconstruct", None), None)):
        if value != default:
            raise ImpruneError(f"{flag} does not apply to --method blocks; drop it")
    criterion, iterative = getattr(a, "criterion", None) or "removal", bool(getattr(a, "iterative", False))
    if getattr(a, "iterative_k", None) is not None and not iterative:
        raise ImpruneError("--iterative-k applies to --iterative only; add --iterative or drop it")
    if iterative and criterion != "removal":
        raise ImpruneError("--iterative re-measures the calibration loss: use it with --criterion removal")
    return criterion, iterative, getattr(a, "iterative_k", None), getattr(a, "compensate", None) or "mean"


@register_method("blocks", "remove attention or MLP sub-blocks on their own under a budget of block parameters, "
                 "ranked by measured removal (or the one-pass gate_fisher)",
                 args=[_REMOVAL_TOKENS, ITERATIVE, ITERATIVE_K, COMPENSATE])
def blocks_method(ctx: PruneContext) -> PruneResult:
    a = ctx.args
    criterion, iterative, k, compensate = blocks_options(a)  # no importance table: the ranking is measured here
    return prune_blocks(ctx.lm, a.sparsity, criterion, ctx.calibration(), a.batch_size, progress=not a.quiet,
                        removal_tokens=getattr(a, "removal_tokens", None), iterative=iterative, k=k,
                        compensate=compensate)
