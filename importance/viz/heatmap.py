"""Heatmaps of importance: layer x component, layer x head grids, before / after / delta, sparsity and bits maps.

Every picture is an [L, X] matrix (layers down the y axis, components or heads across) drawn by ONE helper,
``draw_matrix``, on a ``Scale``: sequential for importance (optionally log, over the positive finite values and at
most ``LOG_DECADES`` below the largest; a signed log scale centred at zero when some scores are negative, as a
second-order removal estimate's are where removing a head helps), diverging and centred at zero for a delta, a
fixed 0..1 for sparsity and for rank percentiles, discrete for bits. NaN cells (a component the layer does not
have, a head that was removed) are left blank on a grey background. Panels of one figure that are compared share
one scale and one colour bar. Other figure modules (``importance.viz.validate``) build on the same pieces:
``draw_matrix``, ``scale_for``, ``add_colorbar``, ``sized_figure``, ``grid_shape``, ``group_labels`` and
``layer_step``.

The figure functions return a ``matplotlib.figure.Figure`` built without pyplot (no display, no global state,
no backend switch; PNGs render through Agg); save with ``save_figure`` (atomic; .png, .svg or .pdf) or
``fig.savefig``. Every heatmap Axes carries what it shows as ``ax.imprune``, a ``Panel`` (the matrix as drawn
[L, X], column labels, title, scale), so tests and notebooks can check a figure through its data, not its pixels.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib import colors
from matplotlib.figure import Figure

from importance.errors import ImpruneError
from importance.scorers import HEAD_SCORERS
from importance.store.cache import atomic_file
from importance.table import AGGREGATIONS, NORMALIZATIONS, ImportanceTable, LayerMap, layer_map_matrix, normalize


def _bundled_fonts() -> None:
    """Register matplotlib's own fonts when its font cache lacks them (a cache built by another matplotlib, e.g. a
    distribution's that uses only system fonts): otherwise every mathtext tick label (10^-2 on log axes) logs a
    'findfont: Font family ... not found' line per missing family."""
    from matplotlib import font_manager

    known = {f.name for f in font_manager.fontManager.ttflist}
    if {"STIXGeneral", "cmr10", "DejaVu Sans Display"} <= known:
        return
    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    for path in sorted(ttf.glob("*.ttf")):
        try:
            font_manager.fontManager.addfont(str(path))
        except (OSError, RuntimeError, ValueError):
            continue


_bundled_fonts()

GRANULARITIES = ("component", "head", "kv_group", "mlp_channel", "expert")
# x-axis order of the issue: attention, then MLP, then everything else (experts, routers), then norms
COMPONENT_ORDER = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down", "mlp.gate")
MAX_LAYER_LABELS = 24
LOG_DECADES = 3.0  # a log scale spans at most this many decades below its maximum (lower cells: darkest colour)
FORMATS = (".png", ".svg", ".pdf")
_BAD = "#d9d9d9"  # NaN / absent cells
_SHORT = {"head": "h", "kv_group": "kv", "mlp_channel": "c", "expert": "e"}
_NORM_WORDS = {"none": "not normalized", "layer": "share of its layer", "component": "share of its component",
               "global": "share of the model"}


# ------------------------------------------------------------------------------------------------ scales

@dataclass(frozen=True)
class Scale:
    """How values become colours. kind: 'sequential' | 'diverging' | 'fraction' | 'rank' | 'bits'.

    'fraction' and 'rank' are fixed 0..1 scales: a share of weights removed (reds), and a rank percentile
    (1 = most important; magma)."""

    kind: str
    vmin: float
    vmax: float
    log: bool = False
    levels: tuple[float, ...] = ()  # bits: the distinct widths
    label: str = ""
    clipped: bool = False  # some values lie below vmin (log scale): the colour bar gets a 'min' arrow
    linthresh: float = 0.0  # a signed log scale (log + diverging): linear within +/- this, log beyond

    def norm(self) -> colors.Normalize:
        if self.kind == "bits":
            lv = list(self.levels)
            edges = [lv[0] - 0.5] + [(a + b) / 2 for a, b in zip(lv, lv[1:])] + [lv[-1] + 0.5]
            return colors.BoundaryNorm(edges, len(lv))
        if self.log and self.kind == "diverging":
            return colors.SymLogNorm(self.linthresh, linscale=0.2, vmin=self.vmin, vmax=self.vmax, base=10)
        if self.log:
            return colors.LogNorm(self.vmin, self.vmax)
        return colors.Normalize(self.vmin, self.vmax)

    def cmap(self) -> colors.Colormap:
        import seaborn as sns

        if self.kind == "bits":
            cmap = colors.ListedColormap(sns.color_palette("crest", max(len(self.levels), 1)))
        else:
            name = {"sequential": "viridis", "diverging": "vlag", "fraction": "Reds", "rank": "magma"}[self.kind]
            cmap = sns.color_palette(name, as_cmap=True) if name == "vlag" else matplotlib.colormaps[name]
        return cmap.with_extremes(bad=_BAD)


def scale_for(matrices: Sequence[np.ndarray], kind: str = "sequential", log: bool = False, label: str = "") -> Scale:
    """One scale covering every finite value of ``matrices`` (positive ones for log); shared by their panels."""
    vals = np.concatenate([np.asarray(m, dtype=float).ravel() for m in matrices]) if matrices else np.zeros(0)
    vals = vals[np.isfinite(vals)]
    if kind in ("fraction", "rank"):
        return Scale(kind, 0.0, 1.0, label=label)
    if kind == "bits":
        levels = tuple(float(v) for v in np.unique(vals)) or (0.0,)
        return Scale(kind, levels[0], levels[-1], levels=levels, label=label)
    if kind == "diverging":
        lim = float(np.abs(vals).max()) if vals.size else 0.0
        lim = lim if lim > 0 else 1.0
        return Scale(kind, -lim, lim, label=label)
    if log and (vals < 0).any():  # signed scores (a removal that helps): a signed log scale centred at zero
        lim = float(np.abs(vals).max())
        return Scale("diverging", -lim, lim, log=True, label=label + " (signed; < 0: removing it helps)",
                     linthresh=lim * 10 ** -LOG_DECADES)
    if log:
        vals = vals[vals > 0]
        lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (1e-6, 1.0)
        hi = hi if hi > lo else lo * 10
        floor = hi * 10 ** -LOG_DECADES
        return Scale(kind, max(lo, floor), hi, log=True, label=label, clipped=lo < floor)
    lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + (abs(lo) or 1.0)
    return Scale(kind, lo, hi, label=label)


# ------------------------------------------------------------------------------------------------ drawing

@dataclass(frozen=True)
class Panel:
    """What one heatmap Axes shows: ``matrix`` [L, X] exactly as coloured (NaN = blank), its labels, its scale."""

    matrix: np.ndarray
    xlabels: tuple[str, ...]
    title: str
    scale: Scale
    meta: dict[str, Any] = field(default_factory=dict)


def layer_step(n_layers: int, max_labels: int = MAX_LAYER_LABELS) -> int:
    """Label every k-th layer so that at most ``max_labels`` layer labels appear."""
    return max(1, math.ceil(n_layers / max_labels))


def group_labels(granularity: str, width: int) -> list[str]:
    """Column labels of a [L, X] matrix of heads, KV groups, channels or experts: h0, h1, ... / kv0, ..."""
    return [f"{_SHORT[granularity]}{j}" for j in range(width)]


def grid_shape(n: int, cols: int) -> tuple[int, int]:
    """(rows, cols) of a grid of ``n`` panels at most ``cols`` wide."""
    cols = max(1, min(cols, n))
    return math.ceil(n / cols), cols


def draw_matrix(ax: Any, m: np.ndarray | torch.Tensor, xlabels: Sequence[str], scale: Scale, title: str = "",
                ylabels: bool = True, annotate: bool = False, xlabel: str = "") -> Any:
    """Draw ``m`` [L, X] on ``ax`` with seaborn; returns the mesh (the mappable for a colour bar).

    Cells that are NaN, or not positive on a (one-signed) log scale, are left blank (grey background); a signed log
    scale (``scale_for`` of values with negatives) draws them in the diverging map's other colour. The plotted matrix,
    labels and scale are kept on ``ax.imprune``.
    """
    import seaborn as sns

    data = np.array(m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else m, dtype=float)  # [L, X]
    if data.ndim != 2:
        raise ValueError(f"draw_matrix needs an [L, X] matrix, got shape {data.shape}")
    shown = data.copy()
    if scale.log and scale.kind != "diverging":
        shown[~(shown > 0)] = np.nan
    n_layers, width = shown.shape
    small = n_layers * width <= 400
    sns.heatmap(shown, ax=ax, mask=~np.isfinite(shown), cmap=scale.cmap(), norm=scale.norm(), cbar=False,
                xticklabels=list(xlabels), yticklabels=layer_step(n_layers) if ylabels else False,
                annot=annotate and small, fmt=".0f" if scale.kind == "bits" else ".2f",
                annot_kws={"fontsize": 6}, linewidths=0)
    ax.set_facecolor(_BAD)
    ax.tick_params(axis="x", labelrotation=90 if width > 4 else 45, labelsize=7 if width > 12 else 8)
    ax.tick_params(axis="y", labelrotation=0, labelsize=7)
    if ylabels:
        ax.set_ylabel("layer")
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.imprune = Panel(shown, tuple(xlabels), title, scale)
    return ax.collections[0]


def add_colorbar(fig: Figure, mesh: Any, axes: Sequence[Any], scale: Scale) -> Any:
    """One colour bar for the panels ``axes`` drawn on ``scale`` (``mesh``: what ``draw_matrix`` returned)."""
    bar = fig.colorbar(mesh, ax=list(axes), label=scale.label, shrink=0.9 if len(axes) == 1 else 0.6,
                       pad=0.02, aspect=30, extend="min" if scale.clipped else "neither")
    if scale.kind == "bits":
        bar.set_ticks(list(scale.levels), labels=[f"{v:g}" for v in scale.levels])
    elif scale.log and scale.kind == "diverging":
        ticks = signed_log_ticks(scale)
        bar.set_ticks(ticks, labels=[f"{t:.0e}".replace("e-0", "e-").replace("e+00", "") if t else "0" for t in ticks])
    return bar


def signed_log_ticks(scale: Scale, per_side: int = 3) -> list[float]:
    """Colour-bar ticks of a signed log scale: 0 and +/- whole decades clear of the linear band around zero.

    matplotlib's default puts a decade inside the narrow linear band, so -1e-3, 0 and 1e-3 overlap; this keeps the
    decades above twice ``linthresh`` and at most ``per_side`` of them (every other one when there are more)."""
    top, bottom = math.floor(math.log10(scale.vmax)), math.floor(math.log10(2 * scale.linthresh))
    decades = [10.0 ** k for k in range(top, bottom - 1, -1) if 10.0 ** k > 2 * scale.linthresh]
    decades = decades[::math.ceil(len(decades) / per_side)] if decades else []
    return [-d for d in decades] + [0.0] + decades[::-1]


def sized_figure(n_layers: int, width: int, rows: int = 1, cols: int = 1, extra: float = 1.4) -> Figure:
    """A figure sized from the matrix shape: about 0.42 in per column and 0.2 in per layer per panel."""
    panel_w = max(1.8, 0.7 + 0.36 * width)
    panel_h = min(max(2.2, 0.6 + 0.19 * n_layers), 11.0 if rows == 1 else 7.0)
    return Figure(figsize=(cols * panel_w + extra, rows * panel_h + 0.9), layout="constrained")


# ------------------------------------------------------------------------------------------------ matrices

def pick_scorer(table: ImportanceTable, scorer: str | None, granularity: str) -> str:
    """``scorer`` checked against the table, or the default: for heads and KV groups the head scorer the
    validation trusts (the first of ``importance.scorers.HEAD_SCORERS`` the table has), else taylor, if the table
    has it at ``granularity``; else the first scorer that has it."""
    if granularity not in GRANULARITIES:
        raise ImpruneError(f"unknown granularity '{granularity}'; use one of {', '.join(GRANULARITIES)}")
    if scorer is None:
        first = list(HEAD_SCORERS) if granularity in ("head", "kv_group") else []
        options = [s for s in [*first, "taylor", *table.scorers] if s in table.scorers and table.has(s, granularity)]
        if not options:
            raise ImpruneError(f"the table has no {granularity} scores (scorers: {', '.join(table.scorers)}); "
                               "score it with taylor, fisher, activation or magnitude")
        return options[0]
    if scorer not in table.scorers:
        raise ImpruneError(f"the table has no scorer '{scorer}'; it has {', '.join(table.scorers)}")
    if not table.has(scorer, granularity):
        raise ImpruneError(f"scorer '{scorer}' has no {granularity} values in this table; pick another --scorer")
    return scorer


def _check_options(aggregation: str, norm: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ImpruneError(f"unknown aggregation '{aggregation}'; use sum or mean")
    if norm not in NORMALIZATIONS:
        raise ImpruneError(f"unknown normalization '{norm}'; use one of {', '.join(NORMALIZATIONS)}")


def order_components(names: Sequence[str], norms: bool = False) -> list[str]:
    """Canonical display order: attention q k v o, MLP up down gate, other components, then norms (if asked)."""
    rank = {c: i for i, c in enumerate(COMPONENT_ORDER)}
    keep = [c for c in names if norms or not c.startswith("norm.")]
    return sorted(keep, key=lambda c: (c.startswith("norm."), rank.get(c, len(rank)), list(names).index(c)))


def matrix(table: ImportanceTable, scorer: str, granularity: str = "component", aggregation: str = "mean",
           norm: str = "none", norms: bool = False) -> tuple[torch.Tensor, list[str]]:
    """The [L, X] matrix a heatmap shows, and its column labels.

    Components are put in display order and norms dropped unless ``norms``; the normalization is applied to
    the columns shown (so 'layer' rows sum to 1 over what is on screen). Heads etc. are labelled h0, h1, ...
    """
    _check_options(aggregation, norm)
    m = table.matrix(scorer, granularity, aggregation)  # [L, X]
    if granularity == "component":
        labels = order_components(table.components, norms)
        m = m[:, [table.components.index(c) for c in labels]]
    else:
        labels = group_labels(granularity, m.shape[1])
    return normalize(m, norm), labels


def describe(table: ImportanceTable) -> tuple[str, str]:
    """(model, data) as written in the table's metadata, for titles."""
    model = table.meta.get("model", {})
    data = table.meta.get("data", {})
    return (str(model.get("spec", "?")) if isinstance(model, dict) else str(model),
            str(data.get("data", "?")) if isinstance(data, dict) else str(data))


def value_label(scorer: str, aggregation: str, norm: str, log: bool = False) -> str:
    agg = "mean per weight" if aggregation == "mean" else "sum over the group"
    return f"{scorer}, {agg}, {_NORM_WORDS[norm]}" + (", log scale" if log else "")


# ------------------------------------------------------------------------------------------------ figures

def grid_figure(tables: Sequence[ImportanceTable], titles: Sequence[str] | None = None, scorer: str | None = None,
                granularity: str = "head", aggregation: str = "mean", norm: str = "none", log: bool = False,
                norms: bool = False, cols: int = 4, title: str | None = None) -> Figure:
    """One panel per table (e.g. one per task, 2 x 4 for eight) on ONE shared colour scale and colour bar.

    ``titles`` default to each table's data (``tasks:math`` -> ``math``).
    """
    if not tables:
        raise ImpruneError("no tables to draw; pass at least one importance table folder")
    names = list(titles) if titles is not None else [_data_title(t) for t in tables]
    if len(names) != len(tables):
        raise ImpruneError(f"{len(names)} titles for {len(tables)} tables; give one title per table")
    scorer = pick_scorer(tables[0], scorer, granularity)
    mats = []
    for t in tables:
        m, labels = matrix(t, pick_scorer(t, scorer, granularity), granularity, aggregation, norm, norms)
        mats.append((m, labels))
    scale = scale_for([m.numpy() for m, _ in mats], "sequential", log, value_label(scorer, aggregation, norm, log))
    n = len(tables)
    rows, cols = grid_shape(n, cols)
    n_layers = max(m.shape[0] for m, _ in mats)
    width = max(m.shape[1] for m, _ in mats)
    fig = sized_figure(n_layers, width, rows, cols)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    mesh = None
    for k, (ax, (m, labels), name) in enumerate(zip(axes, mats, names)):
        mesh = draw_matrix(ax, m, labels, scale, name, ylabels=k % cols == 0,
                           xlabel=granularity.replace("_", " ") if k >= n - cols else "")
    for ax in axes[n:]:
        ax.set_visible(False)
    add_colorbar(fig, mesh, axes[:n], scale)
    model = describe(tables[0])[0]
    data_sets = list(dict.fromkeys(describe(t)[1] for t in tables))
    if title is None:
        what = "layer x component" if granularity == "component" else f"layer x {granularity.replace('_', ' ')}"
        kind = "task probes" if all(d.startswith("tasks:") for d in data_sets) else "data sets"
        data_part = data_sets[0] if len(data_sets) == 1 else f"{len(data_sets)} {kind}"
        title = f"{model}: {what} importance\n{scorer} on {data_part}, {_NORM_WORDS[norm]}"
    fig.suptitle(title, fontsize=10)
    return fig


def component_figure(table: ImportanceTable, scorer: str | None = None, aggregation: str = "mean",
                     norm: str = "layer", log: bool = False, norms: bool = False, title: str | None = None) -> Figure:
    """Layer x component heatmap of one table (norm columns only with ``norms``)."""
    return grid_figure([table], [""], scorer, "component", aggregation, norm, log, norms, 1, title)


def heads_figure(tables: Sequence[ImportanceTable], titles: Sequence[str] | None = None, scorer: str | None = None,
                 aggregation: str = "mean", norm: str = "none", log: bool = False, cols: int = 4,
                 granularity: str = "head", title: str | None = None) -> Figure:
    """Layer x head grid, one panel per table, one shared scale (``granularity='kv_group'`` for KV groups)."""
    return grid_figure(tables, titles, scorer, granularity, aggregation, norm, log, False, cols, title)


def _data_title(table: ImportanceTable) -> str:
    data = describe(table)[1]
    return data.split(":", 1)[1] if data.startswith("tasks:") else data


def _align(before: torch.Tensor, before_labels: list[str], after: torch.Tensor, after_labels: list[str],
           layers_kept: Sequence[int] | None) -> torch.Tensor:
    """``after`` [L', X'] placed in ``before``'s [L, X] layout: rows by ``layers_kept`` (after row i is original
    layer layers_kept[i]), columns by label; NaN where the after model has nothing."""
    rows = list(layers_kept) if layers_kept is not None else list(range(before.shape[0]))
    if len(rows) != after.shape[0] or any(not 0 <= r < before.shape[0] for r in rows):
        raise ImpruneError(f"the tables have {before.shape[0]} and {after.shape[0]} layers; pass layers_kept (from the"
                           " pruned model's imprune.json) to line them up")
    out = torch.full(before.shape, float("nan"))
    for j, lab in enumerate(before_labels):
        if lab in after_labels:
            out[rows, j] = after[:, after_labels.index(lab)]
    return out


def delta(before: torch.Tensor, after: torch.Tensor, log: bool = False) -> torch.Tensor:
    """after - before, or log10(after / before) when ``log`` (NaN where either is not positive)."""
    if not log:
        return after - before
    ok = (before > 0) & (after > 0)
    return torch.where(ok, torch.log10(after.clamp_min(1e-300) / before.clamp_min(1e-300)), float("nan"))


def delta_figure(before: ImportanceTable, after: ImportanceTable, scorer: str | None = None,
                 granularity: str = "component", aggregation: str = "mean", norm: str = "none", log: bool = False,
                 norms: bool = False, titles: Sequence[str] = ("before", "after"),
                 layers_kept: Sequence[int] | None = None) -> Figure:
    """Before and after side by side on one scale, and their difference on a diverging scale centred at zero.

    The difference is after - before, or log10(after / before) with ``log``. After structural pruning the after
    table may have fewer layers / heads: ``layers_kept`` maps its rows back; missing cells stay blank.
    """
    scorer = pick_scorer(before, scorer, granularity)
    b, labels = matrix(before, scorer, granularity, aggregation, norm, norms)
    a_raw, a_labels = matrix(after, pick_scorer(after, scorer, granularity), granularity, aggregation, norm, norms)
    if granularity != "component" and a_raw.shape[1] != b.shape[1]:  # narrower after: pad the columns
        width = max(a_raw.shape[1], b.shape[1])
        pad = lambda m: torch.cat([m, torch.full((m.shape[0], width - m.shape[1]), float("nan"))], 1)  # noqa: E731
        b, a_raw = pad(b), pad(a_raw)
        labels = a_labels = group_labels(granularity, width)
    a = _align(b, labels, a_raw, a_labels, layers_kept)
    d = delta(b, a, log)
    label = value_label(scorer, aggregation, norm, log)
    shared = scale_for([b.numpy(), a.numpy()], "sequential", log, label)
    dscale = scale_for([d.numpy()], "diverging", label=("log10(after / before)" if log else "after - before"))
    fig = sized_figure(b.shape[0], b.shape[1], 1, 3, extra=2.4)
    axes = fig.subplots(1, 3, squeeze=False)[0]
    mesh = None
    for k, (ax, m, name) in enumerate(zip(axes[:2], (b, a), titles)):
        mesh = draw_matrix(ax, m, labels, shared, name, ylabels=k == 0)
    add_colorbar(fig, mesh, axes[:2], shared)
    dmesh = draw_matrix(axes[2], d, labels, dscale, "difference", ylabels=False)
    add_colorbar(fig, dmesh, axes[2:], dscale)
    model, data = describe(before)
    fig.suptitle(f"{model}: {scorer} importance before / after / difference\non {data}, {_NORM_WORDS[norm]}",
                 fontsize=10)
    return fig


def map_matrix(values: LayerMap, components: Sequence[str] | None = None,
               n_layers: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """A sparsity or bits ``LayerMap`` as [L, C] in display order (norms kept only when the map has them)."""
    if not values:
        raise ImpruneError("the plan has an empty map; nothing to draw")
    present = list(dict.fromkeys(c for row in values.values() for c in row))
    comps = order_components(components if components is not None else present, norms=True)
    comps = [c for c in comps if not c.startswith("norm.") or c in present]
    n = n_layers if n_layers is not None else max(int(k) for k in values) + 1
    return layer_map_matrix(values, comps, n), comps


def plan_map(record: dict[str, Any]) -> tuple[str, LayerMap]:
    """('sparsity' | 'bits', the LayerMap) of a pruning or quantization record (imprune.json)."""
    for kind in ("sparsity", "bits"):
        if isinstance(record.get(kind), dict) and record[kind]:
            return kind, record[kind]
    raise ImpruneError("the plan has neither a 'sparsity' nor a 'bits' map; pass the imprune.json of a pruned or "
                       "quantized model")


def plan_scorer(record: dict[str, Any], table: ImportanceTable) -> str | None:
    """The table scorer a plan (imprune.json record, or one step of it) was made from: the signal of its
    allocation (the last step that names one) or a quantization plan's sensitivity ('fisher: sum F ...'),
    when ``table`` has it per component; None otherwise."""
    steps = record.get("steps") if isinstance(record.get("steps"), list) else [record]
    names = [a.get("signal") for st in steps if isinstance(st, dict) and isinstance(a := st.get("allocation"), dict)]
    if isinstance(record.get("sensitivity"), str):
        names.append(record["sensitivity"].split(":")[0])
    found = [n for n in names if isinstance(n, str) and n in table.scorers and table.has(n, "component")]
    return found[-1] if found else None


def layer_map_figure(values: LayerMap, kind: str = "sparsity", table: ImportanceTable | None = None,
                     scorer: str | None = None, aggregation: str = "mean", norm: str = "layer", log: bool = False,
                     title: str | None = None, layers_kept: Sequence[int] | None = None) -> Figure:
    """Sparsity (fraction removed, fixed 0..1) or bits (discrete) per layer x component; with ``table``, the
    importance it came from beside it, same rows and columns."""
    if kind not in ("sparsity", "bits"):
        raise ImpruneError(f"unknown map kind '{kind}'; use sparsity or bits")
    n_layers = table.n_layers if table is not None else None
    m, comps = map_matrix(values, table.components if table is not None else None, n_layers)
    label = "fraction of weights removed" if kind == "sparsity" else "bits per weight"
    scale = scale_for([m.numpy()], "fraction" if kind == "sparsity" else "bits", label=label)
    panels = 1 + (table is not None)
    fig = sized_figure(m.shape[0], m.shape[1], 1, panels, extra=1.6 * panels)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    if table is not None:
        scorer = pick_scorer(table, scorer, "component")
        imp, labels = matrix(table, scorer, "component", aggregation, "none", norms=True)
        imp = normalize(imp[:, [labels.index(c) for c in comps]], norm)  # normalized over the columns shown
        iscale = scale_for([imp.numpy()], "sequential", log, value_label(scorer, aggregation, norm, log))
        add_colorbar(fig, draw_matrix(axes[0], imp, comps, iscale, f"importance ({scorer})"), axes[:1], iscale)
    mesh = draw_matrix(axes[-1], m, comps, scale, kind, ylabels=table is None, annotate=kind == "bits")
    add_colorbar(fig, mesh, axes[-1:], scale)
    if title is None:
        mean = float(torch.nanmean(m)) if torch.isfinite(m).any() else float("nan")
        title = f"{kind} per layer x component\n(mean {mean:.3g}" + (", beside the importance)" if table else ")")
    fig.suptitle(title, fontsize=10)
    return fig


def plan_figure(record: dict[str, Any], table: ImportanceTable | None = None, **kwargs: Any) -> Figure:
    """``layer_map_figure`` of an imprune.json record (its 'sparsity' or 'bits' map)."""
    kind, values = plan_map(record)
    return layer_map_figure(values, kind, table, **kwargs)


# ------------------------------------------------------------------------------------------------ output

def figure_bytes(fig: Figure, fmt: str = "png", dpi: int = 120) -> bytes:
    """The figure rendered to bytes (png, svg or pdf)."""
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi)
    return buf.getvalue()


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Render first, then write ``path`` atomically; the format comes from its suffix (.png, .svg, .pdf)."""
    path = Path(path)
    fmt = path.suffix.lower()
    if fmt not in FORMATS:
        raise ImpruneError(f"cannot write a figure as '{fmt or path.name}'; end the file name in .png, .svg or .pdf")
    data = figure_bytes(fig, fmt[1:], dpi)
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return path
