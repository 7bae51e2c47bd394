"""``imprune heatmap``, ``imprune report`` and ``imprune probe``: pictures and pages of importance tables."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from importance.errors import ImpruneError
from pruning.cli.core import (
    ALLOW_PICKLE,
    DEVICE,
    DTYPE,
    MODEL,
    OVERWRITE,
    QUIET,
    SEED,
    TRUST,
    arg,
    check_output,
    command,
    positive,
)

KINDS = ("component", "head", "kv_group", "delta", "sparsity", "bits")
SCORER = arg("--scorer", default=None, help="scorer to draw (default: taylor when the table has it; beside a "
             "sparsity / bits plan, the scorer that made the plan)")
AGGREGATION = arg("--aggregation", default="mean", choices=["sum", "mean"],
                  help="sum over each group, or mean per weight (default; comparable across shapes)")
NORM = arg("--norm", default="none", choices=["none", "layer", "component", "global"],
           help="divide by the layer's / component's / model's total, over the columns shown")
LOG = arg("--log", action="store_true", help="log colour scale (over the positive values)")


def _figure_path(path: str, overwrite: bool) -> Path:
    from importance.viz.heatmap import FORMATS

    out = check_output(path, overwrite, kind="file")
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


def _plan(path: str | None) -> tuple[dict, Path]:
    """The --plan record (checked: a JSON object whose map is layer -> component -> number) and its file."""
    from importance.models.identity import check_plan_map, read_json_object

    if path is None:
        raise ImpruneError("--kind sparsity/bits needs --plan imprune.json (from `imprune prune` or `quantize`)")
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "imprune.json"
    if not p.is_file():
        raise ImpruneError(f"plan '{p}' does not exist; pass the imprune.json of a pruned or quantized model")
    fix = "pass the imprune.json that `imprune prune` or `imprune quantize` wrote"
    record = read_json_object(p, fix, "plan ")
    check_plan_map(record, f"plan '{p}'", fix)
    return record, p


def _check_tables(kind: str, paths: list[str], tables: list, plan: dict | None, plan_path: Path | None,
                  scorer: str | None = None) -> tuple[int, ...] | None:
    """Artifacts drawn together must describe one model: delta's second table may be the first's model after
    pruning (its layers_kept, returned, lines the rows up) and must hold the scorer drawn; a plan must fit the
    table drawn beside it."""
    from importance.models.identity import check_plan, check_same_model, table_facts
    from importance.viz.heatmap import pick_scorer

    facts = [table_facts(t, f"table '{p}'") for p, t in zip(paths, tables)]
    if kind == "delta":
        kept = check_same_model(facts[0], facts[1], "draw the difference of two tables of one model (before "
                                "`imprune prune` and after it)", derived=True)
        name = pick_scorer(tables[0], scorer, "component")
        if not tables[1].has(name, "component"):
            both = [s for s in tables[0].scorers if tables[0].has(s, "component") and tables[1].has(s, "component")]
            raise ImpruneError(f"table '{paths[1]}' has no {name} component scores (it has "
                               f"{', '.join(tables[1].scorers)}); " + (f"pass --scorer {' or '.join(both)}" if both
                               else "score both models with the same --scorers"))
        return kept
    if plan is not None and facts:
        check_plan(plan, f"plan '{plan_path}'", facts[0], "draw a plan beside the table of the model it was made "
                   "from (the dense model's scores)")
    return None


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
    from importance.table import ImportanceTable
    from importance.viz import heatmap as H

    out = _figure_path(args.out, args.overwrite)
    positive(args.cols, "--cols")
    kind, n = args.kind, len(args.tables)
    if kind == "delta" and n != 2:
        raise ImpruneError(f"--kind delta needs exactly two tables (before after), got {n}")
    if kind in ("component", "head", "kv_group") and n == 0:
        raise ImpruneError(f"--kind {kind} needs at least one TABLE folder")
    if kind in ("sparsity", "bits") and n > 1:
        raise ImpruneError(f"--kind {kind} draws one plan beside at most one TABLE, got {n}")
    plan, plan_path = _plan(args.plan) if kind in ("sparsity", "bits") else (None, None)
    tables = [ImportanceTable.load(Path(t).expanduser()) for t in args.tables]
    kept = _check_tables(kind, args.tables, tables, plan, plan_path, args.scorer)
    titles = _titles(args.titles, n)
    if kind == "component" and n == 1:
        fig = H.component_figure(tables[0], args.scorer, args.aggregation, args.norm, args.log, args.norms)
    elif kind in ("component", "head", "kv_group"):
        fig = H.grid_figure(tables, titles, args.scorer, kind, args.aggregation, args.norm, args.log, args.norms,
                            args.cols)
    elif kind == "delta":
        fig = H.delta_figure(tables[0], tables[1], args.scorer, "component", args.aggregation, args.norm, args.log,
                             args.norms, titles or ("before", "after"), layers_kept=kept)
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
    from pruning.run.report import write_report

    out = check_output(args.out, args.overwrite, kind="file")
    write_report(args.run_dir, out, args.compare, args.scorer, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


PROBE_MARKER, PROBE_SCHEMA = "probe.json", "imprune.probe/1"  # marks a probe folder as imprune's (--overwrite)


def parse_tasks(text: str) -> list[str]:
    """'all' or 'name,name' -> registered task names (validated)."""
    from importance.data.tasks import TASKS

    names = list(TASKS) if text.strip() == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise ImpruneError(f"unknown task '{','.join(unknown) or text}'; use all or any of {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


@command("probe", "score each built-in task probe separately -> DIR/<task>/ tables and DIR/heads.png (one panel "
         "per task)", [
             MODEL, DTYPE, DEVICE, TRUST, ALLOW_PICKLE,
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
    from importance.data.sources import load_data
    from importance.models.load import load_model
    from importance.scoring import parse_scorers, score
    from importance.store.meta import versions, write_json
    from importance.store.outputs import publish
    from importance.viz import heatmap as H

    names = parse_tasks(args.tasks)
    scorers = parse_scorers(args.scorers)
    positive(args.samples, "--samples")
    positive(args.batch_size, "--batch-size")
    if args.scorer is not None and args.scorer not in scorers:
        raise ImpruneError(f"--scorer {args.scorer} is not among --scorers {','.join(scorers)}; draw one of those "
                           "or add it to --scorers")
    out = check_output(args.out, args.overwrite, protect={"--model": args.model})
    lm = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                    allow_pickle=args.allow_pickle)
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
    with publish(out, overwrite=args.overwrite) as tmp:  # the old folder goes only once the new one is complete
        for name, table in zip(names, tables):
            table.save(tmp / name)
        (tmp / "heads.png").write_bytes(png)
        write_json(tmp / PROBE_MARKER, {"schema": PROBE_SCHEMA, "model": lm.describe(), "tasks": names,
                                         "samples": args.samples, "scorers": scorers, "seed": args.seed,
                                         "figure": "heads.png", "versions": versions()})
    items = sorted({int(t.meta.get("data", {}).get("windows", 0)) for t in tables})  # a task may have fewer
    count = str(items[0]) if len(items) == 1 else f"{items[0]}-{items[-1]}"
    print(f"probed {lm.spec} on {len(names)} task(s) x {count} items in {time.perf_counter() - start:.1f} s "
          f"-> {out} (tables per task, heads.png)")
    return 0
