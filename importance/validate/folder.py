"""The folder ``imprune validate`` writes (``TABLE/validation/`` by default, where ``imprune report`` looks):
``validation.json`` (schema ``imprune.validation/1``), the measured ablation table, the scatter plots and the
ablation heatmap, written in one atomic step; and the plain-text agreement table the command prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from importance.store.meta import write_json
from importance.store.outputs import publish
from importance.table import ImportanceTable
from importance.validate.ablation import SCORER

SCHEMA = "imprune.validation/1"


VALIDATION_DIR = "validation"  # default output: SCORES/validation, where `imprune report` looks


def top_groups(result: Any, granularity: str, k: int = 5) -> list[list[Any]]:
    pairs = sorted(zip(result.groups[granularity], result.values[granularity].tolist()), key=lambda x: -x[1])
    return [[g.label, round(v, 5)] for g, v in pairs[:k]]


def write_validation(out: Path, doc: dict[str, Any], scores: ImportanceTable, truth: ImportanceTable,
                     granularity: str, overwrite: bool = False) -> Path:
    """Write the folder described in the module docstring atomically (an existing one is replaced only
    with ``overwrite``, and only once the new one is complete)."""
    from importance.viz.validate import ablation_heatmap_figure, scatter_figure

    out = Path(out)
    with publish(out, overwrite=overwrite) as tmp:  # a unique temporary sibling, swapped in when complete
        truth.save(tmp / doc["ablation_table"])
        for gran, res in doc["granularities"].items():
            fig = scatter_figure(scores, truth, gran, res, SCORER)
            fig.savefig(tmp / f"scatter_{gran}.png", dpi=110)
        ablation_heatmap_figure(scores, truth, granularity, SCORER).savefig(tmp / "ablation_heatmap.png", dpi=110)
        write_json(tmp / "validation.json", doc)
    return out


def format_agreement(agreement: dict[str, dict[str, Any]]) -> str:
    """A plain-text table: one row per granularity x scorer, the best scorer of each granularity starred."""
    lines = [f"{'granularity':<12} {'scorer':<16} {'n':>4} {'Spearman':>9} {'Kendall':>8} {'bottom overlap':>15}"]
    for gran, res in agreement.items():
        for scorer, s in res["scorers"].items():
            star = " *" if scorer == res["best"] else ""
            lines.append(f"{gran:<12} {scorer:<16} {s['n']:>4} {s['spearman']:>9.3f} {s['kendall']:>8.3f} "
                         f"{s['bottom_overlap']:>15.3f}{star}")
    return "\n".join(lines)
