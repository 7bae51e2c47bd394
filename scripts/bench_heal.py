"""Healing benchmark (shared/protocol.md): perplexity pruned -> healed, uniform vs importance placement.

Rows: width 20% (Fisher, importance widths, least-squares reconstruction: today's default), layers 25%
(measured removal), 50% unstructured SparseGPT, 2:4 SparseGPT. Each pruned model is made once with
``imprune prune`` at the reference setting (calibration 32 x 256 Austen windows without Persuasion, seed 0)
and healed twice with ``imprune heal`` on ``austen:train`` windows (never Persuasion), LoRA under the same
trainable-parameter budget: ``--placement uniform`` (rank --rank on every block linear) and ``--placement
importance`` (ranks per layer by each layer's measured error against the teacher). Evaluation: the first
16,384 Persuasion tokens in windows of 256. Columns: perplexity pruned / healed, the share of the gap to
dense that healing closed, tokens, wall time, trainable parameters, the share of zero block weights before
and after (equal: the zeros are kept), parameters (equal: shapes are kept).

    python scripts/bench_heal.py [--rows width20,layers25,sparsegpt50,nm24] [--placements uniform,importance]
        [--tokens 65536] [--loss kd+lm] [--rank 8] [--seeds 0,1] [--tag -r2] [--out scripts/results/bench_heal.json]
        [--work DIR]
    python scripts/bench_heal.py --compare scripts/results/bench_heal*.json \
        --out scripts/results/bench_heal_placement.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

ROWS: dict[str, list[str]] = {
    "width20": ["--method", "width", "--sparsity", "0.2", "--criterion", "fisher", "--allocation", "importance"],
    "layers25": ["--method", "layers", "--sparsity", "0.25", "--criterion", "removal"],
    "sparsegpt50": ["--method", "unstructured", "--sparsity", "0.5", "--criterion", "sparsegpt"],
    "nm24": ["--method", "nm", "--nm", "2:4", "--criterion", "sparsegpt"],
}
ROW_ORDER = {name: i for i, name in enumerate(ROWS)}  # table order; rows of other names last
DENSE = "builtin:smollm2-135m"


def cli(argv: list[str]) -> None:
    from pruning.cli import main

    code = main(argv)
    if code != 0:
        raise SystemExit(f"imprune {' '.join(argv)} failed with exit code {code}")


def block_zeros(folder: Path) -> dict[str, float]:
    """Zero share of the block linears and parameter count of a saved folder (reloaded as a user would)."""
    from importance.models.load import load_model
    from pruning.heal.adapters import block_linears

    lm = load_model(str(folder))
    ws = [t.module.weight for t in block_linears(lm.model)]
    zeros = sum(int((w == 0).sum()) for w in ws)
    total = sum(w.numel() for w in ws)
    params = sum(p.numel() for p in {id(p): p for p in lm.model.parameters()}.values())
    return {"zero_share": round(zeros / total, 6), "zeros": zeros, "params": params}


def markdown(doc: dict[str, Any]) -> str:
    """The README table of a results file."""
    lines = ["| row | placement | pruned | healed | gap closed | tokens | heal time | trainable | zero share before -> "
             "after | params |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows = sorted(doc["rows"].values(), key=lambda r: (ROW_ORDER.get(r["row"], len(ROWS)), r["placement"] != "uniform",
                                                      r["placement"]))
    for r in rows:
        lines.append(f"| {r['row']} | {r['placement']} | {r['pruned']:.2f} | **{r['healed']:.2f}** | "
                     f"{r['gap_closed']:.1%} | {r['tokens']:,} | {r['heal_seconds'] / 60:.1f} min | "
                     f"{r['trainable']:,} | "
                     f"{r['zero_share_before']:.4f} -> " + (f"{r['zero_share_after']:.4f}" if r.get('zero_share_after')
                                                             is not None else "(run)") + " | "
                     f"{'same' if r['params_before'] == r['params_after'] else 'CHANGED'} |")
    return "\n".join(lines)


def compare(paths: list[Path]) -> tuple[str, dict[str, Any]]:
    """Placement against uniform across seeds: per row and rank, each placement's healed perplexity on every seed,
    its mean gain over uniform and whether that gain exceeds the spread between seeds (the larger of the two
    placements' max - min). Returns the README table and the summary written beside it."""
    runs: dict[tuple[str, int], dict[str, dict[int, dict[str, Any]]]] = {}
    for path in paths:
        for r in json.loads(path.read_text())["rows"].values():
            rank, seed = r["settings"]["rank"], r["settings"]["seed"]
            runs.setdefault((r["row"], rank), {}).setdefault(r["placement"], {})[seed] = r
    lines = ["| row | budget (trainable) | pruned | uniform healed (seeds) | placement | healed (seeds) | mean gain | "
             "seed spread | beyond the spread |", "|---|---|---|---|---|---|---|---|---|"]
    summary: dict[str, Any] = {}
    for (row, rank), by in sorted(runs.items(), key=lambda kv: (ROW_ORDER.get(kv[0][0], len(ROWS)), kv[0][1])):
        uni = by.get("uniform", {})
        for placement, res in sorted(by.items()):
            seeds = sorted(set(res) & set(uni))
            if placement == "uniform" or not seeds:
                continue
            u = [uni[s]["healed"] for s in seeds]
            h = [res[s]["healed"] for s in seeds]
            gain = sum(a - b for a, b in zip(u, h)) / len(seeds)
            spread = max(max(u) - min(u), max(h) - min(h))
            several = len(seeds) > 1
            beyond = several and all(a > b for a, b in zip(u, h)) and gain > spread
            key = f"{row}-r{rank}-{placement}"
            summary[key] = {"row": row, "rank": rank, "placement": placement, "seeds": seeds, "uniform": u,
                            "healed": h, "mean_gain": round(gain, 4), "seed_spread": round(spread, 4),
                            "beyond_spread": beyond, "trainable": [res[s]["trainable"] for s in seeds],
                            "uniform_trainable": uni[seeds[0]]["trainable"], "pruned": uni[seeds[0]]["pruned"],
                            "dense": uni[seeds[0]]["dense"]}
            lines.append(f"| {row} | rank {rank} ({uni[seeds[0]]['trainable']:,}) | {uni[seeds[0]]['pruned']:.2f} | "
                         + " / ".join(f"{v:.2f}" for v in u) + f" | {placement} | **"
                         + " / ".join(f"{v:.2f}" for v in h) + f"** | {gain:+.2f} | "
                         + (f"{spread:.2f} | " + ("yes" if beyond else "no") if several else "- | (one seed)") + " |")
    return "\n".join(lines), summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--placements", default="uniform,importance")
    p.add_argument("--tokens", type=int, default=65536, help="training tokens per heal (the budget)")
    p.add_argument("--loss", default="kd+lm")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--heal-method", default="lora")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "imprune" / "bench_heal"))
    p.add_argument("--out", default=str(ROOT / "scripts" / "results" / "bench_heal.json"))
    p.add_argument("--seeds", default="0", help="heal seeds (data order, adapter init), e.g. 0,1,2: the spread "
                   "between placements against the spread between seeds")
    p.add_argument("--tag", default="", help="suffix of the healed folders and result keys (another budget)")
    p.add_argument("--prune-only", action="store_true")
    p.add_argument("--table", action="store_true", help="print the README table from --out and stop")
    p.add_argument("--compare", nargs="+", metavar="RESULTS", help="results files (any seeds, ranks): print the "
                   "placement-vs-uniform table across seeds, write its summary to --out, and stop")
    args = p.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.out).read_text())))
        return
    from benchlib import write_results

    if args.compare:
        table, summary = compare([Path(f) for f in args.compare])
        print(table)
        write_results(args.out, {"benchmark": "bench_heal placement vs uniform", "sources": args.compare,
                                 "rows": summary})
        return

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out)
    previous = json.loads(out_path.read_text()) if out_path.is_file() else {}
    results: dict[str, Any] = previous.get("rows", {})
    dense = None
    for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
        pruned = work / row
        if not (pruned / "imprune.json").is_file():
            t = time.perf_counter()
            cli(["prune", "--model", DENSE, *ROWS[row], "--out", str(pruned), "--quiet"])
            print(f"{row}: pruned in {time.perf_counter() - t:.0f} s", flush=True)
        if args.prune_only:
            continue
        rec = json.loads((pruned / "imprune.json").read_text())
        dense = dense or rec["perplexity"]["before"]["ppl"]
        before = block_zeros(pruned)
        runs = [(pl.strip(), int(sd)) for sd in args.seeds.split(",")
                for pl in args.placements.split(",") if pl.strip()]
        for placement, seed in runs:
            key = f"{row}-{placement}{args.tag}" + (f"-seed{seed}" if seed else "")
            healed = work / key
            t = time.perf_counter()
            cli(["heal", "--model", str(pruned), "--teacher", DENSE, "--tokens", str(args.tokens), "--loss", args.loss,
                 "--method", args.heal_method, "--rank", str(args.rank), "--placement", placement,
                 "--seed", str(seed), *(["--lr", str(args.lr)] if args.lr else []), "--out", str(healed),
                 "--overwrite", "--quiet"])
            wall = time.perf_counter() - t
            h = json.loads((healed / "imprune.json").read_text())
            ppl_p, ppl_h = h["perplexity"]["pruned"]["ppl"], h["perplexity"]["healed"]["ppl"]
            after = block_zeros(healed)
            entry = {"row": row, "placement": placement, "prune": ROWS[row], "dense": dense, "pruned": ppl_p,
                     "healed": ppl_h, "gap_closed": round((ppl_p - ppl_h) / (ppl_p - dense), 4),
                     "tokens": h["heal"]["tokens"], "steps": h["heal"]["steps"], "heal_seconds": h["heal"]["seconds"],
                     "wall_seconds": round(wall, 1), "trainable": h["heal"]["trainable"], "kind": h["heal"]["kind"],
                     "ranks": h["heal"]["ranks"], "layer_errors": h["heal"]["layer_errors"],
                     "resumed_from": h["heal"]["resumed_from"],
                     "loss_first": h["heal"]["curve"][:4], "loss_last": h["heal"]["curve"][-4:],
                     "zero_share_before": before["zero_share"], "zero_share_after": after["zero_share"],
                     "zeros_equal": before["zeros"] == after["zeros"], "params_before": before["params"],
                     "params_after": after["params"], "settings": h["heal"]["settings"]}
            entry.update(seed=seed, rank=args.rank)
            results[key] = entry
            print(f"{row:<12} {placement:<10} {ppl_p:8.2f} -> {ppl_h:7.2f}  gap closed {entry['gap_closed']:.1%}  "
                  f"{entry['tokens']:,} tokens  {wall:5.0f} s  {entry['trainable']:,} trainable  zeros "
                  f"{before['zero_share']:.4f} -> {after['zero_share']:.4f}", flush=True)
            write_results(out_path, {"benchmark": "bench_heal", "dense": dense, "rows": results,
                                     "machine": "2 CPU cores, float32"})


if __name__ == "__main__":
    main()
