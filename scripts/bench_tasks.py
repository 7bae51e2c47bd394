"""Task benchmark (shared/protocol.md): accuracy on the eight built-in probes (with chance) for the dense SmolLM2
and three pruned models, and whether per-task head maps are task-specific.

Rows: dense, 50% unstructured SparseGPT, width 20% (Fisher, importance widths, reconstruction), layers 25% (measured
removal): the pruned folders of ``scripts/bench_heal.py`` (same ``imprune prune`` settings, reference calibration;
made here when ``--work`` lacks them). Accuracy: ``pruning.eval.tasks.probe_accuracy`` on the first ``--limit``
items of each probe (seed 0): acc = the answer has the highest summed log-likelihood among its distractors.

Map part: the per-task reliability / similarity table and the 8 x 8 causal matrix of ``imprune probe --validate``:
read from ``--probe DIR`` (a finished probe folder), or computed here (``--samples``, ``--validate-items``,
``--validate-heads``; maps by ``--scorer``, default the probe's); computed here, the head grid and the causal
heatmap are written beside the JSON (``<out>_heads.png``, ``<out>_causal.png``).

    python scripts/bench_tasks.py [--limit 64] [--rows sparsegpt50,width20,layers25] [--probe DIR]
        [--out scripts/results/bench_tasks.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_heal import DENSE, ROWS, cli  # noqa: E402
from benchlib import write_results  # noqa: E402


def accuracy_markdown(models: dict[str, list[dict[str, Any]]], limit: int) -> str:
    names = list(models)
    tasks = [r["task"] for r in models[names[0]]]
    lines = [f"Accuracy on the eight probes (acc, {limit} items each, seed 0; chance = mean 1 / choices):", "",
             "| task | chance | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for i, t in enumerate(tasks):
        lines.append(f"| {t} | {models[names[0]][i]['chance']:.3f} | "
                     + " | ".join(f"{models[m][i]['acc']:.3f}" for m in names) + " |")
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    lines.append(f"| **mean** | {mean(models[names[0]], 'chance'):.3f} | "
                 + " | ".join(f"**{mean(models[m], 'acc'):.3f}**" for m in names) + " |")
    return "\n".join(lines) + "\n"


def write_figures(out: str, res: Any, scorer: str, model: str) -> None:
    """The probe's head grid and causal heatmap beside ``out`` (``<stem>_heads.png``, ``<stem>_causal.png``)."""
    from importance.viz import heatmap as H
    from importance.viz.tasks import causal_figure, task_grid_figure

    stem = Path(out).with_suffix("")
    grid = task_grid_figure(res.tables, res.tasks, scorer, res.panels(scorer), "mean", "global", True)
    Path(f"{stem}_heads.png").write_bytes(H.figure_bytes(grid, "png"))
    c = res.causal
    fig = causal_figure(c.nll_rise, c.acc_drop, c.tasks, c.k, c.scorer, model)
    Path(f"{stem}_causal.png").write_bytes(H.figure_bytes(fig, "png"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DENSE, help="the dense model (another one needs its own --work)")
    p.add_argument("--limit", type=int, default=64, help="items per probe for accuracy")
    p.add_argument("--rows", default="sparsegpt50,width20,layers25")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "imprune" / "bench_heal"),
                   help="pruned folders (shared with bench_heal.py)")
    p.add_argument("--probe", default=None, help="a finished `imprune probe --validate` folder to report")
    p.add_argument("--samples", type=int, default=32, help="probe items per task for the maps (without --probe)")
    p.add_argument("--validate-items", type=int, default=16)
    p.add_argument("--validate-heads", type=int, default=10)
    p.add_argument("--scorer", default=None, help="the maps drawn and validated (default: the probe's default)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="scripts/results/bench_tasks.json")
    args = p.parse_args()
    import torch

    from importance.data.tasks import TASKS
    from importance.models.load import load_model
    from importance.store.meta import versions
    from pruning.eval.tasks import probe_accuracy

    torch.set_num_threads(args.threads)
    print("settings:", json.dumps(vars(args)), flush=True)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; use any of {', '.join(ROWS)}")
    if args.model != DENSE and Path(args.work) == Path.home() / ".cache" / "imprune" / "bench_heal":
        raise SystemExit("--model other than the reference needs its own --work folder (bench_heal's holds SmolLM2's)")
    work = Path(args.work)
    models: dict[str, list[dict[str, Any]]] = {}
    seconds: dict[str, float] = {}
    for name in ["dense", *rows]:
        folder = args.model if name == "dense" else work / name
        if name != "dense" and not (folder / "imprune.json").is_file():
            t = time.perf_counter()
            cli(["prune", "--model", args.model, *ROWS[name], "--out", str(folder), "--quiet"])
            print(f"{name}: pruned in {time.perf_counter() - t:.0f} s", flush=True)
        lm = load_model(str(folder))
        t = time.perf_counter()
        models[name] = [r.to_dict() for r in probe_accuracy(lm, list(TASKS), args.limit)]
        seconds[name] = time.perf_counter() - t
        mean = sum(r["acc"] for r in models[name]) / len(models[name])
        print(f"{name}: mean acc {mean:.3f} over {len(TASKS)} probes x {args.limit} items in {seconds[name]:.0f} s",
              flush=True)
        del lm
        doc = {"settings": vars(args), "versions": versions(), "accuracy": models, "seconds": seconds,
               "prune": {r: ROWS[r] for r in rows}}
        write_results(args.out, doc)  # after every model: a stopped run keeps what it measured
    md = accuracy_markdown(models, args.limit)
    if args.probe:
        probe = Path(args.probe)
        doc["maps"] = json.loads((probe / "probe.json").read_text())
        md += "\n" + (probe / "report.md").read_text().split("\n", 1)[1]
    else:
        from importance.data.tasks import task_names
        from pruning.eval.probe import ProbeConfig, markdown, run_probe

        lm = load_model(args.model)
        cfg = ProbeConfig(samples=args.samples, validate=True, validate_items=args.validate_items,
                          validate_heads=args.validate_heads)
        cfg = dataclasses.replace(cfg, scorer=args.scorer) if args.scorer else cfg
        t = time.perf_counter()
        res = run_probe(lm, task_names(), cfg, progress=True)
        seconds["maps"] = time.perf_counter() - t
        doc["maps"] = {"scorer": cfg.scorer, **res.to_dict()}
        md += "\n" + markdown(res, cfg.scorer, args.model).split("\n", 1)[1]
        write_figures(args.out, res, cfg.scorer, lm.spec)
    write_results(args.out, doc)
    Path(args.out).with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
