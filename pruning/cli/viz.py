"""``imprune heatmap``, ``imprune report`` and ``imprune probe``: pictures and pages of importance tables."""

from __future__ import annotations

import argparse
import dataclasses
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


@command("probe", "score each built-in task probe separately -> DIR/<task>/ tables, DIR/heads.png (one panel per "
         "task, with accuracy and map reliability), DIR/report.md; --validate adds the causal matrix (DIR/causal.png)",
         [
             MODEL, DTYPE, DEVICE, TRUST, ALLOW_PICKLE,
             arg("--tasks", default="all", help="all, or comma-separated: knowledge, retrieval, logic, decision, "
                                                "semantic, syntax, inference, math"),
             arg("--samples", type=int, default=64, help="prompt/answer items per task (at least 4: two halves)"),
             arg("--scorers", default="fisher,token_fisher,token_second_order,taylor",
                 help="comma-separated scorers (one pass per task)"),
             arg("--seq-len", type=int, default=128, help="longest prompt + answer in tokens"), SEED,
             arg("--batch-size", type=int, default=16, help="items per forward pass (they are short)"),
             arg("--scorer", default=None, help="the map drawn and validated (default: the head scorer that predicts "
                                                "measured head removal best, when among --scorers)"),
             AGGREGATION,
             arg("--norm", default="global", choices=["none", "layer", "component", "global"],
                 help="heads.png: global (default) makes each task's panel a share of 1, so tasks compare"),
             arg("--log", action=argparse.BooleanOptionalAction, default=True, help="heads.png on a log scale"),
             arg("--validate", action="store_true", help="causal check: remove each task's top heads, measure every "
                                                         "task (8 x 8 answer-loss and accuracy matrix)"),
             arg("--validate-heads", type=int, default=10, help="heads removed per task by --validate (default 10)"),
             arg("--validate-items", type=int, default=32, help="items per task measured by --validate (default 32)"),
             arg("--out", required=True, help="output folder"), OVERWRITE, QUIET])
def probe_cmd(args: argparse.Namespace) -> int:
    from importance.models.load import load_model
    from importance.scorers import head_scorer
    from importance.scoring import parse_scorers
    from pruning.eval.probe import ProbeConfig, markdown, run_probe

    names = parse_tasks(args.tasks)
    scorers = parse_scorers(args.scorers)
    positive(args.samples, "--samples")
    positive(args.batch_size, "--batch-size")
    positive(args.validate_heads, "--validate-heads")
    positive(args.validate_items, "--validate-items")
    scorer = args.scorer or head_scorer(scorers) or scorers[0]
    cfg = ProbeConfig(args.samples, tuple(scorers), scorer, args.seq_len, args.seed, args.batch_size, args.validate,
                      args.validate_heads, args.validate_items)
    if scorer not in scorers:
        raise ImpruneError(f"--scorer {scorer} is not among --scorers {','.join(scorers)}; draw one of those "
                           "or add it to --scorers")
    if args.validate and len(names) < 2:
        raise ImpruneError("--validate compares a task with the others: probe at least two tasks")
    out = check_output(args.out, args.overwrite, protect={"--model": args.model})
    lm = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                    allow_pickle=args.allow_pickle)
    start = time.perf_counter()
    maps_cfg = dataclasses.replace(cfg, validate=False)  # the maps are written first; the causal check then adds to it
    res = run_probe(lm, names, maps_cfg, progress=not args.quiet)  # computed before anything is written
    _write_probe(out, args, lm, names, scorers, scorer, res, overwrite=args.overwrite)
    if args.validate:
        from pruning.eval.probe import add_causal

        if not args.quiet:
            print(f"wrote the maps to {out}; causal check: top {cfg.validate_heads} heads of each task removed",
                  flush=True)
        add_causal(lm, res, cfg, progress=not args.quiet)
        _write_probe(out, args, lm, names, scorers, scorer, res, overwrite=True)
    report = markdown(res, scorer, lm.spec) if len(names) > 1 else ""
    if report and not args.quiet:
        print(report)
    items = sorted({int(t.meta.get("data", {}).get("windows", 0)) for t in res.tables})  # a task may have fewer
    count = str(items[0]) if len(items) == 1 else f"{items[0]}-{items[-1]}"
    print(f"probed {lm.spec} on {len(names)} task(s) x {count} items in {time.perf_counter() - start:.1f} s "
          f"-> {out} (heads.png{', causal.png' if res.causal else ''}, tables per task"
          f"{', report.md' if report else ''}; maps by {scorer})")
    return 0


def _write_probe(out: Path, args: argparse.Namespace, lm, names: list[str], scorers: list[str], scorer: str, res,
                 overwrite: bool) -> None:
    """The probe folder: a table per task, heads.png, causal.png (with --validate), report.md, probe.json."""
    from importance.store.meta import versions, write_json
    from importance.store.outputs import publish
    from importance.viz import heatmap as H
    from importance.viz.tasks import causal_figure, task_grid_figure
    from pruning.eval.probe import markdown

    if len(names) > 1:
        fig = task_grid_figure(res.tables, names, scorer, res.panels(scorer), args.aggregation, args.norm, args.log)
    else:
        fig = H.heads_figure(res.tables, names, scorer, args.aggregation, args.norm, args.log)
    figures = {"heads.png": H.figure_bytes(fig, "png")}
    if res.causal is not None:
        c = res.causal
        figures["causal.png"] = H.figure_bytes(causal_figure(c.nll_rise, c.acc_drop, c.tasks, c.k, c.scorer,
                                                             lm.spec), "png")
    report = markdown(res, scorer, lm.spec) if len(names) > 1 else ""
    with publish(out, overwrite=overwrite) as tmp:  # the old folder goes only once the new one is complete
        for name, table in zip(names, res.tables):
            table.save(tmp / name)
        for fname, data in figures.items():
            (tmp / fname).write_bytes(data)
        if report:
            (tmp / "report.md").write_text(report)
        write_json(tmp / PROBE_MARKER, {"schema": PROBE_SCHEMA, "model": lm.describe(), "tasks": names,
                                         "samples": args.samples, "scorers": scorers, "scorer": scorer,
                                         "seed": args.seed, "figure": "heads.png", **res.to_dict(),
                                         "versions": versions()})
