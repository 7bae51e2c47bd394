"""Quality benchmark (shared/protocol.md): perplexity after pruning, every method in ONE run, one table.

Unstructured rows: 50% unstructured and 2:4 for every criterion (magnitude, wanda, taylor, fisher, sparsegpt),
each with uniform allocation and (unstructured) with importance-guided allocation, one row per signal in
``--alloc-scorer`` (default fisher, the table's per-layer Fisher on a log scale, and owl, the share of Wanda
outliers per layer), band ``--band``. 2:4 keeps 2 of every 4 weights in every row, so it has no guided
variant. Structured rows come from other modules' ``rows(args)`` functions,
listed in ``ROW_SOURCES`` (select with ``--families``).

Reference setting: SmolLM2-135M float32; calibration 32 x 256 Austen windows without Persuasion (seed 0, no
BOS); evaluation on the first 16,384 tokens of Persuasion in windows of 256. ``--quick``: 16 x 256
calibration, 4,096 evaluation tokens, and only wanda and sparsegpt (unless ``--only`` says otherwise).
Each row starts from the same dense weights (restored in memory). Expect ~30-60 minutes for the full run on
2 CPU cores.

    python scripts/bench_quality.py [--quick] [--only wanda,sparsegpt] [--families unstructured,structured]
        [--alloc-scorer fisher,owl] [--update]      (--update: rerun the selected rows into the existing file)
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


def signals(text: str) -> list[str]:
    """'fisher,owl' -> ['fisher', 'owl'] (the --alloc-scorer list)."""
    return [s.strip() for s in str(text).split(",") if s.strip()]


def unstructured_specs(args: Any) -> list[dict[str, Any]]:
    crits = CRITERIA if not args.quick or args.only else ("wanda", "sparsegpt")
    specs = []
    for crit in crits:
        for pattern in PATTERNS:
            for alloc in ALLOCATIONS:
                if pattern == "2:4" and alloc != "uniform":
                    continue
                for sig in signals(args.alloc_scorer) if alloc == "importance" else [None]:
                    specs.append({"criterion": crit, "pattern": pattern, "allocation": alloc, "signal": sig})
    only = [s.strip() for s in (args.only or "").split(",") if s.strip()]
    return [s for s in specs if not only or any(o in spec_name(s) for o in only)]


def spec_name(s: dict[str, Any]) -> str:
    guided = f" ({s['signal']})" if s.get("signal") else ""
    return f"{s['criterion']} {s['pattern']} {s['allocation']}{guided}"


def unstructured_rows(args: Any, dense: bool = False) -> list[dict[str, Any]]:
    """One dict per unstructured / N:M row (``dense=True`` adds the dense model first)."""
    import torch
    from benchlib import reference_data

    from importance.models.load import load_model
    from importance.scoring import score
    from pruning.eval.perplexity import perplexity
    from pruning.methods.unstructured import UnstructuredConfig, prune_unstructured

    st = settings(args)
    specs = unstructured_specs(args)
    lm = load_model(st["model"])
    calib, evals = reference_data(lm, st)
    dense_state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    table = None
    wanted = [sig for sig in signals(args.alloc_scorer) if sig in TABLE_SCORERS]
    if wanted and any(s["allocation"] == "importance" for s in specs):
        start = time.perf_counter()
        table = score(lm, calib, wanted, batch_size=st["batch_size"], progress=False)
        print(f"  scored the dense model with {','.join(wanted)} in {time.perf_counter() - start:.1f} s", flush=True)
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
                                 alloc_scorer=s["signal"], alloc_granularity=args.alloc_granularity,
                                 alloc_transform=args.alloc_transform)
        start = time.perf_counter()
        res = prune_unstructured(lm, cfg, table, calib, st["batch_size"])
        seconds = time.perf_counter() - start
        ppl = perplexity(lm.model, evals, lm.task, progress=False)
        out.append({**common, **s, "name": spec_name(s), "ppl": ppl.ppl, "nll": ppl.nll,
                    "predicted": ppl.predicted, "windows": ppl.windows, "seq_len": ppl.seq_len,
                    "achieved": res.record["achieved"]["overall"], "prune_seconds": round(seconds, 1),
                    "recipe": res.record["unstructured"], "allocation_plan": res.record["allocation"]})
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


def normalized(r: dict[str, Any]) -> dict[str, Any]:
    """A row as this version writes it (older files kept the allocation record under 'allocation')."""
    plan = r.get("allocation")
    if isinstance(plan, dict):
        r = {**r, "allocation": plan.get("method"), "allocation_plan": plan}
        if r["allocation"] == "importance":
            r["signal"] = r.get("signal") or plan.get("signal")
        r["name"] = spec_name(r)
    return r


def _signal(r: dict[str, Any]) -> str | None:
    return r.get("signal") if r.get("allocation") == "importance" else None


def markdown(rows: list[dict[str, Any]], st: dict[str, Any]) -> str:
    dense = next((r for r in rows if r["name"] == "dense"), None)
    d = dense["ppl"] if dense else float("nan")
    lines = []
    if dense:
        lines.append(f"Perplexity on the first {dense['windows'] * dense['seq_len']:,} Persuasion tokens "
                     f"({dense['windows']} windows of {dense['seq_len']}, {dense['predicted']:,} predicted); "
                     f"calibration {st['calib_windows']} x {st['seq_len']} Austen tokens (seed {st['seed']}); "
                     f"guided = per-layer ratios from the named signal, band +/-{st['band']}. Dense: {d:.2f}.")
        lines.append("")
    uns = [r for r in rows if r.get("family") == "unstructured" and r["name"] != "dense"]
    if uns:
        sigs = list(dict.fromkeys(sg for r in uns if (sg := _signal(r))))
        cols = [("50%", None, "50% uniform")] + [("50%", sg, f"50% guided ({sg})") for sg in sigs] + \
            [("2:4", None, "2:4")]
        lines += ["| criterion | " + " | ".join(c[2] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for crit in dict.fromkeys(r["criterion"] for r in uns):
            cells = []
            for pattern, sig, _ in cols:
                hit = [r for r in uns if (r["criterion"], r["pattern"], _signal(r)) == (crit, pattern, sig)]
                cells.append(f"{hit[0]['ppl']:.2f}" if hit else "-")
            lines.append(f"| {crit} | " + " | ".join(cells) + " |")
    other = [r for r in rows if r.get("family") != "unstructured" and r["name"] != "dense"]
    if other:
        lines += ["", "| row | perplexity | vs dense |", "|---|---|---|"]
        lines += [f"| {r['name']} | {r['ppl']:.2f} | {r['ppl'] / d:.2f}x |" for r in other]
    return "\n".join(lines)


def updated(old: dict[str, Any], st: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[dict[str, Any], list]:
    """``old``'s rows with ``rows`` put in by name; the measurement settings must be the same."""
    same = ("model", "seed", "seq_len", "calib_windows", "eval_tokens", "band", "alloc_granularity",
            "alloc_transform")
    differ = [k for k in same if old["settings"].get(k) != st.get(k)]
    if differ:
        raise SystemExit(f"--update: settings {differ} differ from the results file; rerun it whole")
    merged = {}
    for r in old["results"]:
        r = normalized(r) if r.get("family") == "unstructured" and r["name"] != "dense" else r
        merged[r["name"]] = r
    merged.update({r["name"]: r for r in rows})
    sigs = list(dict.fromkeys(signals(old["settings"]["alloc_scorer"]) + signals(st["alloc_scorer"])))
    return {**old["settings"], "alloc_scorer": ",".join(sigs)}, list(merged.values())


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
    p.add_argument("--alloc-scorer", default="fisher,owl",
                   help="guided allocation signals, comma separated: owl and / or table scorers (one row each)")
    p.add_argument("--alloc-granularity", default="layer", choices=["layer", "component"])
    p.add_argument("--alloc-transform", default=None, choices=["linear", "log", "rank"])
    p.add_argument("--band", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON path (default scripts/results/bench_quality[_quick].json)")
    p.add_argument("--update", action="store_true", help="measure only the selected rows and put them into the "
                   "existing --out file (same settings required), e.g. after changing one method")
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
    out = Path(args.out or f"scripts/results/bench_quality{'_quick' if args.quick else ''}.json")
    old = json.loads(out.read_text()) if args.update and out.is_file() else None
    if args.update and old is None:
        raise SystemExit(f"--update needs an existing results file at {out}")
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for i, fam in enumerate(families):
        rows += ROW_SOURCES[fam](args, dense=i == 0 and old is None)
    seconds = round(time.perf_counter() - start, 1)
    if old is not None:
        st, rows = updated(old, st, rows)
        seconds = {"first run": old["seconds"], "update": seconds}
    table = markdown(rows, st)
    print("\n" + table)
    from benchlib import write_results

    write_results(out, {"settings": st, "seconds": seconds, "results": rows})
    out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
