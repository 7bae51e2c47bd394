"""Validating the width estimate: predicted vs measured loss increase of ONE linear quantized alone.

For a sample of units and widths, the prediction is what the knapsack of ``pruning.quant.bits`` uses for a GPTQ
plan (``pruning.quant.gptq_model.gptq_errors``: the output error after compensation, per row weighted by the
table's Fisher). The measurement writes the very same GPTQ result (dense calibration statistics) into that one
unit, every other weight dense, and takes the mean token NLL increase on held-out windows. The baseline is the
estimate before error compensation (``pruning.quant.bits.unit_errors`` with ``fisher``: sum F (w - RTN_b(w))^2
on the round-to-nearest grid), measured against the same numbers. Spearman (``importance.validate.faithfulness``)
over every (unit, width) pair ("pooled": what the knapsack compares) and within each width across units (where
only the estimate, not the width, can order them).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch

from importance.data.sources import Windows
from importance.errors import ImpruneError
from importance.table import ImportanceTable
from importance.validate.faithfulness import spearman
from pruning.eval.perplexity import perplexity
from pruning.quant.bits import QuantUnit, unit_errors
from pruning.quant.gptq_model import GPTQConfig, _weight, gptq_errors
from pruning.second_order.gptq import Quantized


def sample_units(units: list[QuantUnit], n: int, seed: int = 0) -> list[QuantUnit]:
    """``n`` units drawn (seeded) so that every component kind appears: a round-robin over the components, each
    kind's units shuffled; returned in model order."""
    if n < 1:
        raise ImpruneError(f"--validate-units {n} must be at least 1")
    rng = random.Random(seed)
    kinds: dict[tuple[str, ...], list[QuantUnit]] = {}
    for u in units:
        kinds.setdefault(u.components, []).append(u)
    for us in kinds.values():
        rng.shuffle(us)
    picked: list[QuantUnit] = []
    while len(picked) < min(n, len(units)):
        for us in kinds.values():
            if us and len(picked) < n:
                picked.append(us.pop())
    order = {u.name: i for i, u in enumerate(units)}
    return sorted(picked, key=lambda u: order[u.name])


@torch.no_grad()
def check_estimate(lm: Any, units: list[QuantUnit], widths: tuple[int, ...], calib: Windows, evalw: Windows,
                   cfg: GPTQConfig, table: ImportanceTable, batch_size: int = 4,
                   on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Rows {unit, layer, components, bits, predicted, rtn_fisher, measured} and the Spearman correlations
    (module docstring); ``lm.model`` is left as it was. ``on_row(partial result)`` after every measured row."""
    model = lm.model
    kept: dict[str, dict[int, torch.Tensor]] = {}

    def keep(u: QuantUnit, b: int, q: Quantized) -> None:
        kept.setdefault(u.name, {})[b] = q.weight.clone()  # [out, in]

    predicted, how = gptq_errors(model, units, widths, calib, cfg, table, batch_size, on_result=keep)
    baseline, _ = unit_errors(model, units, widths, table, "fisher")
    dense = perplexity(model, evalw, lm.task, batch_size, progress=False).nll
    rows = []
    for u in units:
        view = _weight(model, u)
        orig = view.detach().clone()
        try:
            for b in widths:
                view.copy_(kept[u.name][b].to(view.dtype))
                nll = perplexity(model, evalw, lm.task, batch_size, progress=False).nll
                rows.append({"unit": u.name, "layer": u.layer, "components": list(u.components), "bits": b,
                             "predicted": predicted[u.name][b], "rtn_fisher": baseline[u.name][b],
                             "measured": nll - dense})
                if on_row is not None:
                    on_row({"estimator": how, "dense_nll": dense, "rows": list(rows),
                            **correlations(rows, widths)})
        finally:
            view.copy_(orig)
    return {"estimator": how, "dense_nll": dense, "rows": rows, **correlations(rows, widths)}


def correlations(rows: list[dict[str, Any]], widths: tuple[int, ...]) -> dict[str, Any]:
    """Pooled and per-width Spearman of ``predicted`` and ``rtn_fisher`` against ``measured``."""
    def rho(rs: list[dict[str, Any]], key: str) -> float:
        return spearman(torch.tensor([r[key] for r in rs], dtype=torch.float64),
                        torch.tensor([r["measured"] for r in rs], dtype=torch.float64))

    out: dict[str, Any] = {}
    for key, name in (("predicted", "spearman"), ("rtn_fisher", "spearman_rtn_fisher")):
        per = {b: rho([r for r in rows if r["bits"] == b], key) for b in widths}
        out[name] = {"pooled": rho(rows, key), "per_width": per,
                     "per_width_mean": sum(per.values()) / len(per)}
    return out
