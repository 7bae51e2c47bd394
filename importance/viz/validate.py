"""Figures that compare rankings: ``imprune validate``'s predicted vs measured scatter plots and the ablation
beside the scorers, and every scorer's layer ranking side by side (``layer_scores_figure``, in the report).

Both functions return a ``matplotlib.figure.Figure`` built without pyplot (no global state, no display; save
with ``fig.savefig``). ``ablation_heatmap_figure`` draws its panels with ``importance.viz.heatmap``'s own pieces
(``draw_matrix`` on a 0..1 'rank' ``Scale``, figure sizing, grid, column labels, thinned layer labels, colour
bar), so it looks like every other heatmap and each panel carries its matrix as ``ax.imprune``.
"""

from __future__ import annotations

import math

import torch
from matplotlib import cm, colors, ticker
from matplotlib.figure import Figure

from importance.scorers import layer_only
from importance.table import ImportanceTable
from importance.validate.faithfulness import paired, rank, values
from importance.viz import heatmap as H

RANK_LABEL = "rank percentile (1 = most important)"


def _panel_scorers(scores: ImportanceTable, granularity: str, truth_scorer: str) -> list[str]:
    return [s for s in scores.scorers if s != truth_scorer and scores.has(s, granularity)]


def _floor(v: torch.Tensor) -> float:
    pos = v[v > 0]
    return float(pos.min()) / 10 if pos.numel() else 1e-6


def scatter_figure(scores: ImportanceTable, truth: ImportanceTable, granularity: str,
                   results: dict | None = None, truth_scorer: str = "ablation") -> Figure:
    """One panel per scorer: predicted group score (x) against measured loss increase (y), both log scaled.

    Colour: the component type at component granularity, the layer (a colour bar) for heads, KV groups and
    layers. Values <= 0 cannot sit on a log axis: they are drawn at a floor (a tenth of the smallest positive
    value) as downward triangles. ``results`` (from ``faithfulness.compare``) puts the correlations in titles.
    """
    names = _panel_scorers(scores, granularity, truth_scorer)
    rows, cols = H.grid_shape(max(len(names), 1), 3)
    fig = Figure(figsize=(4.2 * cols + (1.0 if granularity != "component" else 0), 3.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    comps = truth.components
    palette = {c: cm.tab20(i % 20) for i, c in enumerate(comps)}
    depth = colors.Normalize(0, max(truth.n_layers - 1, 1))
    for ax, scorer in zip(axes, names):
        p, t, index = paired(scores, scorer, truth, truth_scorer, granularity)
        fx, fy = _floor(p), _floor(t)
        x, y = p.clamp_min(fx), t.clamp_min(fy)
        if granularity == "component":
            col = [palette[comps[j]] for j in index[:, 1].tolist()]
        else:
            col = [cm.viridis(depth(i)) for i in index[:, 0].tolist()]
        for sel, marker in ((t > 0, "o"), (t <= 0, "v")):
            if sel.any():
                ax.scatter(x[sel].numpy(), y[sel].numpy(), c=[c for c, s in zip(col, sel.tolist()) if s], s=16,
                           marker=marker, alpha=0.8, edgecolors="none")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _log_ticks(ax.xaxis, x)
        _log_ticks(ax.yaxis, y)
        ax.set_xlabel(f"{scorer} (predicted)")
        ax.set_ylabel("measured loss increase (nats/token)")
        stats = (results or {}).get("scorers", {}).get(scorer)
        title = scorer if stats is None else \
            f"{scorer}: Spearman {stats['spearman']:.2f}, Kendall {stats['kendall']:.2f}"
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    if granularity == "component":
        handles = [axes[0].scatter([], [], color=palette[c], label=c, s=16) for c in comps]
        fig.legend(handles=handles, loc="outside right center", fontsize=8, title="component")
    else:
        fig.colorbar(cm.ScalarMappable(depth, "viridis"), ax=list(axes[:len(names)]), label="layer")
    fig.suptitle(f"{granularity} ablation: measured vs predicted (triangles: measured <= 0, drawn at the floor)",
                 fontsize=11)
    return fig


def _log_ticks(axis, v: torch.Tensor) -> None:
    """On a log axis spanning less than a decade: three labelled ticks instead of crowded minor labels."""
    axis.set_minor_formatter(ticker.NullFormatter())
    lo, hi = float(v.min()), float(v.max())
    if 0 < lo < hi < 10 * lo:
        axis.set_major_locator(ticker.FixedLocator(torch.logspace(math.log10(lo), math.log10(hi), 3).tolist()))
        axis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))


def _percentiles(m: torch.Tensor) -> torch.Tensor:
    """Each finite entry's rank percentile in 0..1 within ``m`` (NaN kept): panels then share one colour scale."""
    out = torch.full(m.shape, float("nan"))
    ok = torch.isfinite(m)
    n = int(ok.sum())
    if n:
        out[ok] = ((rank(m[ok]) - 1) / max(n - 1, 1)).float()
    return out


def ablation_heatmap_figure(scores: ImportanceTable, truth: ImportanceTable, granularity: str,
                            truth_scorer: str = "ablation") -> Figure:
    """The ablation and every scorer side by side in the same [L, X] layout, coloured by rank percentile within
    each panel (1 = most important), so where a scorer's colours differ from the ablation's it misjudges.

    Layer granularity: one panel whose columns are the ablation and the scorers (each column ranked alone).
    Components keep the table's column order (norms included), as ``faithfulness`` compares them.
    """
    names = [truth_scorer] + _panel_scorers(scores, granularity, truth_scorer)
    tables = {truth_scorer: truth, **{s: scores for s in names[1:]}}
    scale = H.scale_for([], "rank", label=RANK_LABEL)
    if granularity == "layer":
        return _ranked_columns({s: values(tables[s], s, "layer") for s in names},
                               "layer ablation beside the scorers' layer scores")
    mats = [_percentiles(values(tables[s], s, granularity, truth.components if granularity == "component" else None))
            for s in names]
    n_layers, width = mats[0].shape
    rows, cols = H.grid_shape(len(names), 5)
    fig = H.sized_figure(n_layers, width, rows, cols)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    labels = truth.components if granularity == "component" else H.group_labels(granularity, width)
    mesh = None
    for k, (ax, name, m) in enumerate(zip(axes, names, mats)):
        mesh = H.draw_matrix(ax, m, labels, scale, name + (" (measured)" if name == truth_scorer else ""),
                             ylabels=k % cols == 0)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    H.add_colorbar(fig, mesh, axes[:len(names)], scale)
    fig.suptitle(f"{granularity} ablation beside the scorers, same layout (each panel ranked alone)", fontsize=11)
    return fig


def layer_scores_figure(table: ImportanceTable) -> Figure:
    """Every scorer's layer ranking side by side (layer-only scorers first): [L, S], each column coloured by its
    rank percentile (1 = most important), so where the scorers would keep and drop different layers shows."""
    names = sorted((s for s in table.scorers if table.has(s, "layer")), key=lambda s: not layer_only(s))
    return _ranked_columns({s: table.layer_scores(s, "sum") for s in names},
                           "layer scores of every scorer (each column ranked alone)")


def _ranked_columns(columns: dict[str, torch.Tensor], title: str) -> Figure:
    """One [L, S] panel: column s is ``columns[s]`` [L] as rank percentiles within itself."""
    scale = H.scale_for([], "rank", label=RANK_LABEL)
    m = torch.stack([_percentiles(v) for v in columns.values()], 1)  # [L, S]
    fig = H.sized_figure(m.shape[0], m.shape[1], extra=1.0 + 0.5 * m.shape[1])  # columns named by scorer
    fig.set_figheight(max(fig.get_figheight(), 4.0))  # room for the rotated names and the colour bar label
    ax = fig.subplots()
    H.add_colorbar(fig, H.draw_matrix(ax, m, list(columns), scale), [ax], scale)
    fig.suptitle(title, fontsize=11)
    return fig
