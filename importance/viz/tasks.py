"""Figures of the per-task probes: the head-map grid with each task's accuracy and map reliability (a map that
is no more like itself than like the other tasks' maps is marked), and the causal matrix of head removal.

Both build on ``importance.viz.heatmap`` (``heads_figure``, ``draw_matrix``, ``scale_for``, ``add_colorbar``) and
keep what they show on ``ax.imprune`` (the task grid adds ``meta`` = the task's numbers and its mark).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from importance.table import ImportanceTable
from importance.viz.heatmap import add_colorbar, draw_matrix, heads_figure, scale_for

SHARED_MARK = "shared structure, not task-specific"
_MARK_COLOUR = "#b2182b"


def task_grid_figure(tables: Sequence[ImportanceTable], names: Sequence[str], scorer: str,
                     panels: Mapping[str, Mapping[str, Any]], aggregation: str = "mean", norm: str = "global",
                     log: bool = True) -> Figure:
    """``heads_figure`` of the tasks on one shared scale, each panel titled with its task's ``acc`` (and
    ``chance``), split-half ``reliability`` and mean ``similarity`` to the others; a panel whose ``specific`` is
    False gets ``SHARED_MARK`` in red. ``panels[task]`` may lack any of these keys (then it is not shown)."""
    titles = []
    for name in names:
        p = panels.get(name, {})
        lines = [name + (f"  acc {p['acc']:.2f} (chance {p['chance']:.2f})" if "acc" in p else "")]
        if "reliability" in p:
            lines.append(f"split-half {p['reliability']:.2f} vs others {p['similarity']:.2f}")
            if not p.get("specific", True):
                lines.append(SHARED_MARK)
        titles.append("\n".join(lines))
    fig = heads_figure(tables, titles, scorer, aggregation, norm, log)
    for ax, name in zip(fig.axes, names):
        if not hasattr(ax, "imprune"):
            continue
        ax.imprune.meta.update({"task": name, **panels.get(name, {})})
        if panels.get(name, {}).get("specific", True) is False:
            ax.title.set_color(_MARK_COLOUR)
    return fig


def causal_figure(nll_rise: torch.Tensor, acc_drop: torch.Tensor, tasks: Sequence[str], k: int, scorer: str,
                  model: str = "") -> Figure:
    """Two [tasks x tasks] panels (rows: whose top-``k`` heads were removed; columns: the task measured), answer
    NLL increase and accuracy drop, each on a diverging scale centred at zero, cells annotated."""
    n = len(tasks)
    fig = Figure(figsize=(2 * (1.6 + 0.6 * n) + 2.4, 2.2 + 0.45 * n), layout="constrained")
    axes = fig.subplots(1, 2, squeeze=False)[0]
    for k_ax, (ax, m, label) in enumerate(zip(axes, (nll_rise, acc_drop),
                                             ("answer NLL increase (nats / token)", "accuracy drop"))):
        data = np.asarray(torch.as_tensor(m, dtype=torch.float64).numpy())
        scale = scale_for([data], "diverging", label=label)
        mesh = draw_matrix(ax, data, list(tasks), scale, label, ylabels=False, annotate=True,
                           xlabel="task measured")
        ax.set_yticks(np.arange(len(tasks)) + 0.5, list(tasks), rotation=0, fontsize=7)
        ax.set_ylabel(f"top {k} heads of this task removed" if k_ax == 0 else "")
        diag = float(np.mean(np.diag(data)))
        off = float((data.sum() - np.trace(data)) / max(data.size - len(tasks), 1))
        ax.imprune.meta.update({"diagonal_mean": diag, "off_diagonal_mean": off, "rows": list(tasks)})
        ax.set_title(f"{label}\ndiagonal mean {diag:.3f}, off-diagonal {off:.3f}", fontsize=9)
        add_colorbar(fig, mesh, [ax], scale)
    fig.suptitle(f"{model + ': ' if model else ''}causal check of the task head maps ({scorer})\nremove the top {k} "
                 "heads of one task's map, measure every task", fontsize=10)
    return fig
