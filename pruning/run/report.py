"""The HTML report of a run or of one importance table: a single self-contained page.

Everything is inside the one file: PNG figures base64-embedded, inline CSS, no external URL, so it opens in
any browser, offline, and can be mailed or attached as a CI artifact. All text from files is HTML-escaped.

Run directory layout it reads (what ``imprune run`` writes; see ``pruning.run.pipeline``)::

    RUN_DIR/metrics.json        optional: {"perplexity": {"before": {Perplexity.to_dict()}, ["pruned": ...,]
                                "after": {...}}, "heal": {"curve": [...], ...} or null, "params", "memory",
                                "timings", "settings"} (other keys are listed as they are)
    RUN_DIR/scores_before/      ImportanceTable folder (of the dense model)
    RUN_DIR/scores_after/       optional ImportanceTable folder (of the pruned / quantized model)
    RUN_DIR/model/imprune.json  optional: a pruning record ("sparsity": LayerMap with string layer keys,
                                "layers_kept" when layers were removed) or a quantization record ("bits": LayerMap)
    RUN_DIR/figures/            where ``write_run_outputs`` puts the PNGs it embeds
    RUN_DIR/scores_before/validation/
                                optional: what ``imprune validate --scores RUN_DIR/scores_before`` writes
                                (validation.json, schema ``imprune.validation/1`` in ``pruning.cli.validate``,
                                and its PNGs)

RUN_DIR may also be a single table folder (table.json + table.safetensors): the page then shows that table
alone, and its validation from TABLE/validation/ when there is one. ``compare`` (``--compare TABLE``) replaces
scores_after as the second table of before / after / delta.

Page: the headline (perplexity and mean probe accuracy before / after, parameters, non-zeros, weight bytes,
speed where measured) and the figure a reader wants first (the plan's sparsity / bits map, else before / after,
else the component heatmap), then metrics when present, the layer x component and layer x head heatmaps, every
scorer's layer ranking side by side, before / after / difference when there is a second table, the healing loss curve,
the sparsity or bits map beside the importance it came from, and the top and bottom components and heads
as tables. With a validation folder, a section "Does the importance predict removal?": one row per scorer with
its Spearman, Kendall and bottom-fraction overlap against the measured loss increase at the validated granularity
and its layer-level Spearman, the best scorer highlighted, the held-out data and the measurement's noise ceiling,
and the validation's own scatter and ablation heatmap PNGs (embedded as written, not redrawn). A validation.json
that is not valid JSON, has another schema, lacks the agreement numbers or names a figure outside its folder
stops the report with a one-line ``ImpruneError``; a figure file that is missing is noted on the page. A small
inline script records script errors and whether every image decoded on ``<body>`` (``data-images``,
``data-decoded``, ``data-errors``): the browser test reads them, and anyone can check a page the same way.
The settings close the page.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from importance.errors import ImpruneError
from importance.store.cache import atomic_file
from importance.store.outputs import publish
from importance.table import ImportanceTable
from importance.viz import heatmap as H
from importance.viz.validate import layer_scores_figure
from pruning.run.page import esc, figure_html, fmt, kv_table, read_json
from pruning.run.report_validation import Validation, _validation_section, load_validation

FIGURE_DPI = 110
TOP_K = 10


@dataclass(frozen=True)
class Run:
    """What a report shows: one or two tables, and whatever metrics and plan the run folder holds."""

    root: Path
    before: ImportanceTable
    after: ImportanceTable | None = None
    after_label: str = "after"
    metrics: dict[str, Any] | None = None
    record: dict[str, Any] | None = None
    is_run: bool = True
    validation: Validation | None = None
    layers_kept: tuple[int, ...] | None = None  # the original layer of each row of ``after`` (layers removed)


def _is_table(folder: Path) -> bool:
    return (folder / "table.json").is_file() and (folder / "table.safetensors").is_file()


def _looks_like_table(folder: Path) -> bool:
    """Either table file is there (a missing other one is then named by ``ImportanceTable.load``)."""
    return (folder / "table.json").is_file() or (folder / "table.safetensors").is_file()


_RERUN = "rerun `imprune run` on the folder (it redoes what is damaged) or remove the file"
_COMPARE_FIX = "compare two tables of one model (before `imprune prune` and after it)"


def _check_run(run: Run, compare: str | Path | None, after_record: dict[str, Any] | None) -> Run:
    """The tables and the plan of a report describe one model (``importance.models.identity``); returns ``run`` with
    the after table's layers_kept."""
    from dataclasses import replace

    from importance.models.identity import check_plan, check_plan_map, check_same_model, table_facts

    first = table_facts(run.before, f"table '{run.root / 'scores_before' if run.is_run else run.root}'")
    plan = f"'{run.root / 'model' / 'imprune.json'}'"
    if run.record is not None:
        check_plan_map(run.record, plan, _RERUN)
    kept = None
    if run.after is not None:
        where = f"--compare '{compare}'" if compare is not None else f"table '{run.root / 'scores_after'}'"
        kept = check_same_model(first, table_facts(run.after, where, after_record), _COMPARE_FIX, derived=True)
    if run.record is not None:
        check_plan(run.record, plan, first, _RERUN)
    return replace(run, layers_kept=kept)


def load_run(path: str | Path, compare: str | Path | None = None) -> Run:
    """A run folder (see the module docstring) or a single table folder, plus an optional second table."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ImpruneError(f"'{root}' is not a folder; pass an `imprune run` folder or an importance table folder")
    other = ImportanceTable.load(Path(compare).expanduser()) if compare is not None else None
    other_label = Path(compare).name if compare is not None else "after"
    if _looks_like_table(root):
        return _check_run(Run(root, ImportanceTable.load(root), other, other_label, is_run=False,
                              validation=load_validation(root)), compare, None)
    if not (root / "scores_before").is_dir():
        raise ImpruneError(f"'{root}' holds neither a table nor scores_before/; pass an `imprune run` folder or a "
                           "folder written by `imprune score`")
    before = ImportanceTable.load(root / "scores_before")
    record = read_json(root / "model" / "imprune.json", _RERUN)
    metrics = read_json(root / "metrics.json", _RERUN)
    after = other
    if after is None and (root / "scores_after").is_dir():
        after = ImportanceTable.load(root / "scores_after")
    run = Run(root, before, after, other_label, metrics, record, validation=load_validation(root / "scores_before"))
    return _check_run(run, compare, record if compare is None else None)


# ------------------------------------------------------------------------------------------------ validation

# ------------------------------------------------------------------------------------------------ figures

def run_figures(run: Run, scorer: str | None = None) -> dict[str, tuple[str, Any]]:
    """{file stem: (caption, Figure)} in page order. Importance is drawn as the mean per weight on a log scale
    (it spans decades across layers and components); the difference is log10(after / before)."""
    figs: dict[str, tuple[str, Any]] = {}
    t = run.before
    comp_scorer = H.pick_scorer(t, scorer, "component")
    figs["components"] = ("Layer x component importance (mean per weight, log scale; grey: absent)",
                          H.component_figure(t, comp_scorer, "mean", "none", log=True))
    if any(t.has(s, "head") for s in t.scorers):
        head_scorer = H.pick_scorer(t, scorer, "head")
        tables = [t] + ([run.after] if run.after is not None and run.after.has(head_scorer, "head") else [])
        titles = ["before", run.after_label][: len(tables)]
        figs["heads"] = ("Layer x head importance" + (", before and after on one scale" if len(tables) > 1 else ""),
                         H.heads_figure(tables, titles, head_scorer, "mean", "none", log=True, cols=2))
    figs["layers"] = ("Every scorer's layer ranking side by side (rank percentile within each column, 1 = most "
                      "important): the layers a depth pruner would drop are the darkest",
                      layer_scores_figure(t))
    if run.after is not None:
        kept = run.layers_kept
        figs["delta"] = ("Before / after on one scale, and log10(after / before) centred at zero",
                         H.delta_figure(t, run.after, comp_scorer, "component", "mean", "none", log=True,
                                        titles=("before", run.after_label), layers_kept=kept))
    curve = ((run.metrics or {}).get("heal") or {}).get("curve")
    if curve:
        from importance.viz.curves import loss_curve_figure

        figs["heal"] = ("Healing: the training loss of every step after pruning", loss_curve_figure(curve))
    if run.record is not None:
        try:
            kind, values = H.plan_map(run.record)
        except ImpruneError:
            kind = None
        if kind is not None:
            basis = H.plan_scorer(run.record, t) or comp_scorer
            figs["plan"] = (f"The {kind} map beside the importance it came from ({basis})",
                            H.layer_map_figure(values, kind, t, basis, "mean", "layer"))
    return figs


def _png(fig: Any) -> bytes:
    return H.figure_bytes(fig, "png", FIGURE_DPI)


# ------------------------------------------------------------------------------------------------ HTML

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:1200px;color:#222;
padding:0 1rem;line-height:1.4}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1rem 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.9rem;color:#555}.pair{display:flex;gap:2rem;flex-wrap:wrap}
.muted{color:#777;font-size:.85rem}code{background:#f4f4f4;padding:0 .2rem}
tr.best td,tr.best th{background:#fff1b8;font-weight:600}td.lead{font-weight:700}tr.muted td,tr.muted th{color:#777}
"""

# on load, records script errors and how many images decoded (complete, with a width) as attributes of <body>
_CHECK = """
window.__impruneErrors=[];
window.addEventListener('error',function(e){window.__impruneErrors.push(String(e.message||e));});
window.addEventListener('load',function(){
  var imgs=Array.prototype.slice.call(document.images);
  var ok=imgs.filter(function(i){return i.complete&&i.naturalWidth>0;}).length;
  var b=document.body;b.setAttribute('data-images',String(imgs.length));
  b.setAttribute('data-decoded',String(ok));b.setAttribute('data-errors',String(window.__impruneErrors.length));
});
"""


def _settings(run: Run) -> list[tuple[str, Any]]:
    settings = (run.metrics or {}).get("settings")
    if isinstance(settings, dict) and settings:
        return list(settings.items())
    meta = run.before.meta
    model, data = H.describe(run.before)
    rows = [("model", model), ("data", data), ("scorers", ", ".join(run.before.scorers)),
            ("layers", run.before.n_layers), ("seed", meta.get("seed")), ("batch size", meta.get("batch_size")),
            ("tokens counted", meta.get("counts", {}).get("targets", meta.get("counts", {}).get("tokens"))),
            ("scoring seconds", meta.get("seconds"))]
    if run.after is not None:
        rows.append((f"second table ({run.after_label})", " ".join(H.describe(run.after))))
    return [(k, v) for k, v in rows if v is not None]


def _metrics_section(metrics: dict[str, Any]) -> str:
    parts = []
    ppl = metrics.get("perplexity") or {}
    if isinstance(ppl, dict) and ppl:
        keys = ["ppl", "nll", "predicted", "windows", "seq_len", "data"]
        head = "".join(f"<th>{esc(k)}</th>" for k in ["", *keys])
        rows = "".join("<tr><th>" + esc(when) + "</th>" + "".join(
            f"<td class='num'>{esc(fmt(v.get(k)))}</td>" for k in keys) + "</tr>"
            for when, v in ppl.items() if isinstance(v, dict))
        parts.append(f"<h3>Perplexity</h3><table><tr>{head}</tr>{rows}</table>")
    acc = metrics.get("accuracy") or {}
    if isinstance(acc, dict) and isinstance(acc.get("before"), dict) and isinstance(acc.get("after"), dict):
        b, af = acc["before"], acc["after"]
        head = "".join(f"<th>{esc(k)}</th>" for k in ("task", "acc before", "acc after", "acc_norm before",
                                                       "acc_norm after", "chance", "items"))
        rows = "".join(f"<tr><th>{esc(n)}</th>" + "".join(f"<td class='num'>{esc(fmt(v))}</td>" for v in (
            b[n].get("acc"), af[n].get("acc"), b[n].get("acc_norm"), af[n].get("acc_norm"), b[n].get("chance"),
            b[n].get("n"))) + "</tr>" for n in b if n in af and isinstance(b[n], dict))
        parts.append(f"<h3>Probe accuracy</h3><p>{esc(acc.get('metric', ''))}</p><table><tr>{head}</tr>{rows}</table>")
    for key, title in (("params", "Parameters"), ("nonzero_params", "Non-zero parameters"), ("memory", "Memory"),
                       ("timings", "Timings (seconds)")):
        block = metrics.get(key)
        if isinstance(block, dict) and block:
            rows = list(block.items())
            if {"before", "after"} <= block.keys() and all(isinstance(block[k], (int, float))
                                                           for k in ("before", "after")) and block["before"]:
                rows.append(("after / before", block["after"] / block["before"]))
            parts.append(f"<h3>{esc(title)}</h3>" + kv_table(rows))
    return "".join(parts)


def _ranking_tables(table: ImportanceTable, scorer: str, label: str) -> str:
    out = []
    for gran in ("component", "head"):
        if not table.has(scorer, gran):
            continue
        top, bottom = table.ranking(scorer, gran, "mean", TOP_K, skip_norms=True)
        cells = []
        for name, items in (("most important", top), ("least important", bottom)):
            rows = "".join(f"<tr><td>{i}</td><td>{esc(lab)}</td><td class='num'>{esc(f'{v:.4g}')}</td></tr>"
                           for i, (lab, v) in enumerate(items, 1))
            cells.append(f"<div><h4>{esc(label)}: {gran}s, {name}</h4><table><tr><th>#</th><th>{gran}</th>"
                         f"<th>{esc(scorer)} (mean per weight)</th></tr>{rows}</table></div>")
        out.append(f"<div class='pair'>{''.join(cells)}</div>")
    return "".join(out)


def _headline(metrics: dict[str, Any]) -> str:
    """Before / (pruned) / after of what a reader asks first: perplexity, mean probe accuracy (with chance),
    parameters, non-zeros, weight bytes, speed where measured; '' when the run measured none of them."""
    ppl = metrics.get("perplexity") if isinstance(metrics.get("perplexity"), dict) else {}
    acc = metrics.get("accuracy") if isinstance(metrics.get("accuracy"), dict) else {}
    stages = [k for k in ("before", "pruned", "after") if isinstance(ppl.get(k), dict) or isinstance(acc.get(k), dict)]
    rows: list[tuple[str, dict[str, Any]]] = []
    if ppl:
        first = next((v for v in ppl.values() if isinstance(v, dict)), {})
        note = f" ({fmt(first.get('predicted'))} tokens, windows of {fmt(first.get('seq_len'))})" if first else ""
        rows.append(("perplexity" + note, {k: (ppl.get(k) or {}).get("ppl") for k in stages}))
    tasks = [n for n, v in (acc.get("before") or {}).items() if isinstance(v, dict)]
    if tasks:
        mean = lambda rows_, key: sum(rows_[n][key] for n in tasks if n in rows_) / len(tasks)  # noqa: E731
        chance = mean(acc["before"], "chance")
        rows.append((f"mean probe accuracy ({len(tasks)} probes, chance {chance:.3f})",
                     {k: mean(acc[k], "acc") for k in stages if isinstance(acc.get(k), dict)}))
    memory = metrics.get("memory") if isinstance(metrics.get("memory"), dict) else {}
    for label, block in (("parameters", metrics.get("params")), ("non-zero parameters", metrics.get("nonzero_params")),
                         ("weight bytes", {"before": memory.get("weight_bytes_before"),
                                           "after": memory.get("weight_bytes_after")}),
                         ("forward seconds", metrics.get("speed"))):
        if isinstance(block, dict) and block.get("before") is not None and block.get("after") is not None:
            rows.append((label, {"before": block["before"], "after": block["after"]}))
    if not rows:
        return ""
    head = "".join(f"<th>{esc(k)}</th>" for k in ["", *stages, "after / before"])
    body = ""
    for label, vals in rows:
        b, a = vals.get("before"), vals.get("after")
        ratio = a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None
        body += (f"<tr><th>{esc(label)}</th>" + "".join(f"<td class='num'>{esc(fmt(vals.get(k)))}</td>" for k in stages)
                 + f"<td class='num'>{esc(fmt(ratio) if ratio is not None else '')}</td></tr>")
    return f"<table class='headline'><tr>{head}</tr>{body}</table>"


LEAD_FIGURES = ("plan", "delta", "components")  # the figure a reader wants first, by what the run has


def render(run: Run, figures: dict[str, tuple[str, bytes]], scorer: str | None = None) -> str:
    """The page as a string, from a loaded run and its figures rendered to PNG bytes ({stem: (caption, png)}):
    the headline (before / after numbers) and the lead figure first, details next, settings at the end."""
    model, data = H.describe(run.before)
    title = f"imprune report: {model}"
    body = [f"<h1>{esc(title)}</h1>",
            f"<p class='muted'>{esc('run folder' if run.is_run else 'table')}: <code>{esc(run.root)}</code>; "
            f"scored on <code>{esc(data)}</code></p>"]
    headline = _headline(run.metrics) if run.metrics else ""
    if headline:
        body += ["<h2>Headline</h2>", headline]
    lead = next((k for k in LEAD_FIGURES if k in figures), None)
    if lead is not None:
        body.append(figure_html(lead, *figures[lead]))
    if run.metrics:
        body += ["<h2>Metrics</h2>", _metrics_section(run.metrics)]
    body.append("<h2>Figures</h2>")
    body += [figure_html(stem, caption, png) for stem, (caption, png) in figures.items() if stem != lead]
    rank_scorer = H.pick_scorer(run.before, scorer, "component")
    body += ["<h2>Top and bottom</h2>", _ranking_tables(run.before, rank_scorer, "before" if run.after else "table")]
    if run.after is not None and rank_scorer in run.after.scorers:
        body.append(_ranking_tables(run.after, rank_scorer, run.after_label))
    if run.validation is not None:
        body.append(_validation_section(run.validation))
    body += ["<h2>Settings</h2>", kv_table(_settings(run))]
    versions = run.before.meta.get("versions") or {}
    if versions:
        body.append("<p class='muted'>" + esc(", ".join(f"{k} {v}" for k, v in versions.items())) + "</p>")
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{esc(title)}</title><style>{_CSS}</style><script>{_CHECK}</script></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def build_report(path: str | Path, compare: str | Path | None = None, scorer: str | None = None,
                 figures_dir: Path | None = None) -> str:
    """Load, draw and render; with ``figures_dir``, also write each PNG there (atomically)."""
    run = load_run(path, compare)
    pngs = {stem: (caption, _png(fig)) for stem, (caption, fig) in run_figures(run, scorer).items()}
    if figures_dir is not None:
        for stem, (_, png) in pngs.items():
            with atomic_file(Path(figures_dir) / f"{stem}.png") as tmp:
                tmp.write_bytes(png)
    return render(run, pngs, scorer)


def write_report(path: str | Path, out: str | Path, compare: str | Path | None = None, scorer: str | None = None,
                 overwrite: bool = False, figures_dir: Path | None = None) -> Path:
    """Build the whole page first, then write ``out`` atomically."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise ImpruneError(f"output '{out}' already exists; choose another path or pass --overwrite")
    page = build_report(path, compare, scorer, figures_dir)
    with publish(out, kind="file", overwrite=overwrite) as tmp:  # a regular file only, replaced atomically
        tmp.write_text(page, encoding="utf-8")
    return out


def write_run_outputs(run_dir: str | Path) -> Path:
    """What ``imprune run`` ends with: RUN_DIR/figures/*.png and RUN_DIR/report.html (replaced if present)."""
    run_dir = Path(run_dir)
    return write_report(run_dir, run_dir / "report.html", overwrite=True, figures_dir=run_dir / "figures")
