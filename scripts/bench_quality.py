"""Quality benchmark (shared/protocol.md): perplexity after pruning, every method in ONE run, one table.

Unstructured rows: 50% unstructured and 2:4 for every criterion (magnitude, wanda, taylor, fisher, sparsegpt),
each with uniform allocation and (unstructured) with importance-guided allocation (``--alloc-scorer``, band
``--band``). 2:4 keeps 2 of every 4 weights in every row, so it has no guided variant. Structured rows come
from other modules' ``rows(args)`` functions, listed in ``ROW_SOURCES`` (select with ``--families``).

Reference setting: SmolLM2-135M float32; calibration 32 x 256 Austen windows without Persuasion (seed 0, no
BOS); evaluation on the first 16,384 tokens of Persuasion in windows of 256. ``--quick``: 16 x 256
calibration, 4,096 evaluation tokens, and only wanda and sparsegpt (unless ``--only`` says otherwise).
Each row starts from the same dense weights (restored in memory). Expect ~30-60 minutes for the full run on
2 CPU cores.

    python scripts/bench_quality.py [--quick] [--only wanda,sparsegpt] [--families unstructured,structured]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, and the row modules next to this file
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CRITERIA = ("magnitude", "wanda", "taylor", "fisher", "sparsegpt")
PATTERNS = ("50%", "2:4")
ALLOCATIONS = ("uniform", "importance")
TABLE_SCORERS = ("fisher", "taylor", "activation", "magnitude", "block_influence")


def settings(args: Any) -> dict[str, Any]:
    quick = bool(getattr(args, "quick", False))
    return {"model": args.model, "seed": args.seed, "batch_size": args.batch_size, "quick": quick,
            "seq_len": args.seq_len, "calib_windows": args.calib_windows or (16 if quick else 32),
            "eval_tokens": args.eval_tokens or (4096 if quick else 16384), "alloc_scorer": args.alloc_scorer,
            "alloc_granularity": args.alloc_granularity, "alloc_transform": args.alloc_transform,
            "band": args.band}


def unstructured_specs(args: Any) -> list[dict[str, Any]]:
    crits = CRITERIA if not args.quick or args.only else ("wanda", "sparsegpt")
    specs = []
    for crit in crits:
        for pattern in PATTERNS:
            for alloc in ALLOCATIONS:
                if pattern == "2:4" and alloc != "uniform":
                    continue
                specs.append({"criterion": crit, "pattern": pattern, "allocation": alloc})
    only = [s.strip() for s in (args.only or "").split(",") if s.strip()]
    return [s for s in specs if not only or any(o in spec_name(s) for o in only)]


def spec_name(s: dict[str, Any]) -> str:
    return f"{s['criterion']} {s['pattern']} {s['allocation']}"


def unstructured_rows(args: Any, dense: bool = False) -> list[dict[str, Any]]:
    """One dict per unstructured / N:M row (``dense=True`` adds the dense model first)."""
    import torch

    from importance.data import load_data
    from importance.models import load_model
    from importance.score import score
    from pruning.evaluate import perplexity
    from pruning.unstructured import UnstructuredConfig, prune_unstructured

    st = settings(args)
    specs = unstructured_specs(args)
    lm = load_model(st["model"])
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    calib = load_data("austen:train", lm.tokenizer, seq_len=st["seq_len"], samples=st["calib_windows"],
                      seed=st["seed"], max_positions=limit)
    evals = load_data("austen:eval", lm.tokenizer, seq_len=st["seq_len"], tokens=st["eval_tokens"],
                      sampling="sequential", max_positions=limit)
    dense_state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    table = None
    if args.alloc_scorer in TABLE_SCORERS and any(s["allocation"] == "importance" for s in specs):
        start = time.perf_counter()
        table = score(lm, calib, [args.alloc_scorer], batch_size=st["batch_size"], progress=False)
        print(f"  scored the dense model with {args.alloc_scorer} in {time.perf_counter() - start:.1f} s", flush=True)
    out = []
    common = {"family": "unstructured", "calibration": dict(calib.meta)}
    if dense:
        ppl = perplexity(lm.model, evals, lm.task, progress=False)
        out.append({**common, "name": "dense", "ppl": ppl.ppl, "nll": ppl.nll, "predicted": ppl.predicted,
                    "windows": ppl.windows, "seq_len": ppl.seq_len})
        print(f"  {'dense':<34} ppl {ppl.ppl:9.2f}", flush=True)
    for s in specs:
        lm.model.load_state_dict(dense_state)
        nm = (2, 4) if s["pattern"] == "2:4" else None
        cfg = UnstructuredConfig(0.5, s["criterion"], nm=nm, allocation=s["allocation"], band=args.band,
                                 alloc_scorer=args.alloc_scorer, alloc_granularity=args.alloc_granularity,
                                 alloc_transform=args.alloc_transform)
        start = time.perf_counter()
        res = prune_unstructured(lm, cfg, table, calib, st["batch_size"])
        seconds = time.perf_counter() - start
        ppl = perplexity(lm.model, evals, lm.task, progress=False)
        out.append({**common, **s, "name": spec_name(s), "ppl": ppl.ppl, "nll": ppl.nll,
                    "predicted": ppl.predicted, "windows": ppl.windows, "seq_len": ppl.seq_len,
                    "achieved": res.record["achieved"]["overall"], "prune_seconds": round(seconds, 1),
                    "recipe": res.record["unstructured"], "allocation": res.record["allocation"]})
        print(f"  {spec_name(s):<34} ppl {ppl.ppl:9.2f}  ({seconds:.0f} s)", flush=True)
    lm.model.load_state_dict(dense_state)
    del dense_state
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def _module_rows(name: str) -> Any:
    def rows(args: Any, dense: bool = False) -> list[dict[str, Any]]:
        return importlib.import_module(name).rows(args, dense=dense)

    return rows


# Where row families plug in: name -> rows(args, dense=False) -> list of row dicts with at least
# 'name' and 'ppl' (and 'family'). The structured rows live in scripts/quality_structured.py.
ROW_SOURCES = {"unstructured": unstructured_rows, "structured": _module_rows("quality_structured")}


def markdown(rows: list[dict[str, Any]], st: dict[str, Any]) -> str:
    dense = next((r for r in rows if r["name"] == "dense"), None)
    d = dense["ppl"] if dense else float("nan")
    lines = []
    if dense:
        lines.append(f"Perplexity on the first {dense['windows'] * dense['seq_len']:,} Persuasion tokens "
                     f"({dense['windows']} windows of {dense['seq_len']}, {dense['predicted']:,} predicted); "
                     f"calibration {st['calib_windows']} x {st['seq_len']} Austen tokens (seed {st['seed']}); "
                     f"guided = {st['alloc_scorer']} signal, band {st['band']}. Dense: {d:.2f}.")
        lines.append("")
    uns = [r for r in rows if r.get("family") == "unstructured" and r["name"] != "dense"]
    if uns:
        lines += ["| criterion | 50% uniform | 50% guided | 2:4 |", "|---|---|---|---|"]
        for crit in dict.fromkeys(r["criterion"] for r in uns):
            cells = []
            for pattern, alloc in (("50%", "uniform"), ("50%", "importance"), ("2:4", "uniform")):
                hit = [r for r in uns if (r["criterion"], r["pattern"], r["allocation"]) == (crit, pattern, alloc)]
                cells.append(f"{hit[0]['ppl']:.2f}" if hit else "-")
            lines.append(f"| {crit} | " + " | ".join(cells) + " |")
    other = [r for r in rows if r.get("family") != "unstructured" and r["name"] != "dense"]
    if other:
        lines += ["", "| row | perplexity | vs dense |", "|---|---|---|"]
        lines += [f"| {r['name']} | {r['ppl']:.2f} | {r['ppl'] / d:.2f}x |" for r in other]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--quick", action="store_true", help="16 x 256 calibration, 4,096 eval tokens, fewer rows")
    p.add_argument("--only", default=None, help="comma-separated substrings of row names, e.g. 'wanda,2:4'")
    p.add_argument("--families", default="unstructured", help=f"row families: {', '.join(ROW_SOURCES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib-windows", type=int, default=None)
    p.add_argument("--eval-tokens", type=int, default=None)
    p.add_argument("--alloc-scorer", default="owl", help="guided allocation signal: owl or a table scorer")
    p.add_argument("--alloc-granularity", default="layer", choices=["layer", "component"])
    p.add_argument("--alloc-transform", default=None, choices=["linear", "log", "rank"])
    p.add_argument("--band", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON path (default scripts/results/bench_quality[_quick].json)")
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    st = settings(args)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in ROW_SOURCES]
    if unknown:
        raise SystemExit(f"unknown family {unknown}; use {', '.join(ROW_SOURCES)}")
    print("settings:", json.dumps({**st, "families": families, "threads": torch.get_num_threads(),
                                   "rows": [spec_name(s) for s in unstructured_specs(args)]}), flush=True)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for i, fam in enumerate(families):
        rows += ROW_SOURCES[fam](args, dense=i == 0)
    table = markdown(rows, st)
    print("\n" + table)
    out = Path(args.out or f"scripts/results/bench_quality{'_quick' if args.quick else ''}.json")
    from benchlib import write_results

    write_results(out, {"settings": st, "seconds": round(time.perf_counter() - start, 1), "results": rows})
    out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
