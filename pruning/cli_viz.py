"""``imprune heatmap``, ``imprune report`` and ``imprune probe``: pictures and pages of importance tables."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from importance.errors import ImpruneError

from .cli import DEVICE, DTYPE, MODEL, OVERWRITE, QUIET, SEED, TRUST, arg, check_output, command, positive

KINDS = ("component", "head", "kv_group", "delta", "sparsity", "bits")
SCORER = arg("--scorer", default=None, help="scorer to draw (default: taylor when the table has it; beside a "
             "sparsity / bits plan, the scorer that made the plan)")
AGGREGATION = arg("--aggregation", default="mean", choices=["sum", "mean"],
                  help="sum over each group, or mean per weight (default; comparable across shapes)")
NORM = arg("--norm", default="none", choices=["none", "layer", "component", "global"],
           help="divide by the layer's / component's / model's total, over the columns shown")
LOG = arg("--log", action="store_true", help="log colour scale (over the positive values)")


def _figure_path(path: str, overwrite: bool) -> Path:
    from importance.heatmap import FORMATS

    out = check_output(path, overwrite)
    if out.suffix.lower() not in FORMATS:
        raise ImpruneError(f"--out '{out.name}' must end in .png, .svg or .pdf")
    return out


def _titles(text: str | None, n: int) -> list[str] | None:
    if text is None:
        return None
    titles = [t.strip() for t in text.split(",")]
    if len(titles) != n:
        raise ImpruneError(f"--titles has {len(titles)} names for {n} tables; give one comma-separated title each")
    return titles


def _plan(path: str | None) -> dict:
    if path is None:
        raise ImpruneError("--kind sparsity/bits needs --plan imprune.json (from `imprune prune` or `quantize`)")
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "imprune.json"
    if not p.is_file():
        raise ImpruneError(f"plan '{p}' does not exist; pass the imprune.json of a pruned or quantized model")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ImpruneError(f"plan '{p}' is not valid JSON ({err.msg}); pass an imprune.json") from None


@command("heatmap", "draw importance tables: layer x component, layer x head grid, before/after/delta, "
         "sparsity or bits map", [
             arg("tables", nargs="*", metavar="TABLE", help="importance table folders (from `imprune score`)"),
             arg("--kind", default="component", choices=KINDS,
                 help="component (default), head / kv_group (one panel per table, one scale), delta (two "
                      "tables), sparsity / bits (--plan; a table is drawn beside it)"),
             SCORER, AGGREGATION, NORM, LOG, arg("--norms", action="store_true", help="include the norm columns"),
             arg("--plan", default=None, help="imprune.json (or its model folder) for --kind sparsity / bits"),
             arg("--titles", default=None, help="comma-separated panel titles, one per table"),
             arg("--cols", type=int, default=4, help="panels per row of a grid"),
             arg("--out", required=True, help="FILE.png, FILE.svg or FILE.pdf"), OVERWRITE])
def heatmap_cmd(args: argparse.Namespace) -> int:
    from importance import heatmap as H
    from importance.table import ImportanceTable

    out = _figure_path(args.out, args.overwrite)
    positive(args.cols, "--cols")
    kind, n = args.kind, len(args.tables)
    if kind == "delta" and n != 2:
        raise ImpruneError(f"--kind delta needs exactly two tables (before after), got {n}")
    if kind in ("component", "head", "kv_group") and n == 0:
        raise ImpruneError(f"--kind {kind} needs at least one TABLE folder")
    if kind in ("sparsity", "bits") and n > 1:
        raise ImpruneError(f"--kind {kind} draws one plan beside at most one TABLE, got {n}")
    plan = _plan(args.plan) if kind in ("sparsity", "bits") else None
    tables = [ImportanceTable.load(Path(t).expanduser()) for t in args.tables]
    titles = _titles(args.titles, n)
    if kind == "component" and n == 1:
        fig = H.component_figure(tables[0], args.scorer, args.aggregation, args.norm, args.log, args.norms)
    elif kind in ("component", "head", "kv_group"):
        fig = H.grid_figure(tables, titles, args.scorer, kind, args.aggregation, args.norm, args.log, args.norms,
                            args.cols)
    elif kind == "delta":
        fig = H.delta_figure(tables[0], tables[1], args.scorer, "component", args.aggregation, args.norm, args.log,
                             args.norms, titles or ("before", "after"))
    else:
        found, values = H.plan_map(plan)
        if found != kind:
            raise ImpruneError(f"the plan has a {found} map, not {kind}; use --kind {found}")
        table = tables[0] if tables else None
        scorer = args.scorer or (H.plan_scorer(plan, table) if table is not None else None)  # what made the plan
        fig = H.layer_map_figure(values, kind, table, scorer, args.aggregation, args.norm, args.log)
    H.save_figure(fig, out)
    print(f"wrote {out}")
    return 0


@command("report", "one self-contained HTML page of a run folder or a table (figures embedded, no network)", [
    arg("run_dir", metavar="RUN_DIR", help="an `imprune run` folder, or a table folder from `imprune score`"),
    arg("--compare", default=None, metavar="TABLE", help="a second table: before / after / difference"),
    SCORER, arg("--out", default="report.html", help="the HTML file to write (default report.html)"), OVERWRITE])
def report_cmd(args: argparse.Namespace) -> int:
    from .report import write_report

    out = check_output(args.out, args.overwrite)
    write_report(args.run_dir, out, args.compare, args.scorer, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def parse_tasks(text: str) -> list[str]:
    """'all' or 'name,name' -> registered task names (validated)."""
    from importance.tasks import TASKS

    names = list(TASKS) if text.strip() == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise ImpruneError(f"unknown task '{','.join(unknown) or text}'; use all or any of {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


@command("probe", "score each built-in task probe separately -> DIR/<task>/ tables and DIR/heads.png (one panel "
         "per task)", [
             MODEL, DTYPE, DEVICE, TRUST,
             arg("--tasks", default="all", help="all, or comma-separated: knowledge, retrieval, logic, decision, "
                                                "semantic, syntax, inference, math"),
             arg("--samples", type=int, default=64, help="prompt/answer items per task"),
             arg("--scorers", default="taylor,fisher", help="comma-separated scorers (one pass per task)"),
             arg("--seq-len", type=int, default=128, help="longest prompt + answer in tokens"), SEED,
             arg("--batch-size", type=int, default=16, help="items per forward pass (they are short)"),
             SCORER, AGGREGATION,
             arg("--norm", default="global", choices=["none", "layer", "component", "global"],
                 help="heads.png: global (default) makes each task's panel a share of 1, so tasks compare"),
             arg("--log", action=argparse.BooleanOptionalAction, default=True, help="heads.png on a log scale"),
             arg("--out", required=True, help="output folder"), OVERWRITE, QUIET])
def probe_cmd(args: argparse.Namespace) -> int:
    import shutil

    from importance import heatmap as H
    from importance.cache import atomic_dir
    from importance.data import load_data
    from importance.models import load_model
    from importance.scoring import parse_scorers, score

    names = parse_tasks(args.tasks)
    scorers = parse_scorers(args.scorers)
    positive(args.samples, "--samples")
    positive(args.batch_size, "--batch-size")
    out = check_output(args.out, args.overwrite)
    lm = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    start = time.perf_counter()
    tables = []
    for name in names:  # everything is scored and drawn before anything is written
        windows = load_data(f"tasks:{name}", lm.tokenizer, seq_len=args.seq_len, samples=args.samples,
                            seed=args.seed, max_positions=limit)
        t0 = time.perf_counter()
        tables.append(score(lm, windows, scorers, seed=args.seed, batch_size=args.batch_size,
                            progress=not args.quiet))
        if not args.quiet:
            print(f"  {name:<10} {len(windows)} items, {int(tables[-1].meta['counts'].get('targets', 0))} answer "
                  f"tokens, {time.perf_counter() - t0:.1f} s")
    scorer = H.pick_scorer(tables[0], args.scorer, "head")
    fig = H.heads_figure(tables, names, scorer, args.aggregation, args.norm, args.log)
    png = H.figure_bytes(fig, "png")
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    with atomic_dir(out) as tmp:
        for name, table in zip(names, tables):
            table.save(tmp / name)
        (tmp / "heads.png").write_bytes(png)
    print(f"probed {lm.spec} on {len(names)} task(s) x {args.samples} items in {time.perf_counter() - start:.1f} s "
          f"-> {out} (tables per task, heads.png)")
    return 0
