"""How scoring scales (shared/protocol.md): calibration tokens x1 / x2 / x4, 1 vs 2 processes, block by block.

Each variant runs in its own process (so its peak RSS is its own), repeated in interleaved order; the
table prints median seconds of the scoring pass, time ratios against x1 (linear = 2.0 and 4.0), peak RSS
ratios (flat = 1.0), and the 2-process run (accelerate, gloo on CPU) against 1 process on the same tokens.
Group-level taylor + fisher + activation + magnitude. Last, the block-by-block mode (forward-only scorers over
kept hidden states, the model loaded with ``--max-memory`` so accelerate keeps its blocks on disk) against the
usual whole-model forward pass: peak resident memory of the scoring pass, sampled every 20 ms (VmRSS and the
anonymous part RssAnon; memory-mapped weight files count in VmRSS only).

    python scripts/bench_scale.py [--model builtin:smollm2-135m] [--windows 8] [--seq-len 256] [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from benchlib import capped_child, peak_rss_mb, rss_mb, run_child, write_results  # noqa: E402

SCORERS = "taylor,fisher,activation,magnitude"


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from importance.data.sources import load_data
    from importance.models.load import load_model
    from importance.scoring import score

    lm = load_model(args.model)
    windows = load_data(args.data, lm.tokenizer, seq_len=args.seq_len, samples=args.n, seed=0)
    loaded = rss_mb()
    start = time.perf_counter()
    score(lm, windows, SCORERS.split(","), batch_size=args.batch_size, progress=False)
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(), "loaded_rss_mb": loaded,
                      "tokens": windows.n_tokens}))


def memory_child(args: argparse.Namespace) -> None:
    """Forward-only scoring, whole model in memory or block by block on an offloaded model; sampled peaks."""
    lm, windows, peak = capped_child(args, args.blockmem)
    from importance.scoring import score

    cap = None if args.blockmem == "none" else args.blockmem
    model_mb = sum(p.numel() * p.element_size() for p in lm.model.parameters()) / 2**20
    peak.update(VmRSS=0, RssAnon=0)
    start = time.perf_counter()
    score(lm, windows, ["activation", "magnitude", "block_influence"], batch_size=args.batch_size,
          blockwise=cap is not None, progress=False)
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_vmrss_mb": peak["VmRSS"] / 1024,
                      "peak_anon_mb": peak["RssAnon"] / 1024, "model_mb": model_mb, "max_memory": cap}))


def processes(args: argparse.Namespace, n: int, windows: int) -> dict:
    """``imprune score --processes n`` (n > 1 goes through accelerate launch); seconds from the table."""
    from importance.table import ImportanceTable

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pruning", "score", "--model", args.model, "--data", args.data,
               "--samples", str(windows), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
               "--scorers", SCORERS, "--out", f"{tmp}/t", "--quiet", "--processes", str(n)]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads // n)))
        start = time.perf_counter()
        run_child([sys.executable, "-c", "import json,subprocess,sys; r=subprocess.run(sys.argv[1:]).returncode; "
                   "print(json.dumps({'rc': r})); sys.exit(r)", *cmd], env=env)
        wall = time.perf_counter() - start
        table = ImportanceTable.load(f"{tmp}/t")
    return {"seconds": table.meta["seconds"], "wall_seconds": wall, "processes": table.meta.get("processes", 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--data", default="austen:train")
    p.add_argument("--windows", type=int, default=8, help="windows at x1")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", default="scripts/results/bench_scale.json")
    p.add_argument("--cap", default="120MB",
                   help="--max-memory of the block-by-block run (SmolLM2: at least its 113 MB embedding)")
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--blockmem", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.n:
        child(args)
        return
    if args.blockmem:
        memory_child(args)
        return
    settings = {k: getattr(args, k) for k in ("model", "data", "windows", "seq_len", "batch_size", "threads", "reps")}
    print("settings:", json.dumps(settings))
    mult = (1, 2, 4)
    runs: dict[str, list[dict]] = {f"x{m}": [] for m in mult} | {"1 process": [], "2 processes": [],
                                                                 "whole model": [], "block by block": []}
    base = [sys.executable, __file__, "--model", args.model, "--data", args.data, "--seq-len", str(args.seq_len),
            "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    for rep in range(args.reps):
        for m in mult:
            runs[f"x{m}"].append(run_child([*base, "--n", str(args.windows * m)]))
            last = runs[f"x{m}"][-1]
            print(f"  rep {rep} x{m}: {last['seconds']:.1f} s, peak {last['peak_rss_mb']:.0f} MB", flush=True)
        for n, name in ((1, "1 process"), (2, "2 processes")):
            runs[name].append(processes(args, n, args.windows * 2))
            print(f"  rep {rep} {name}: {runs[name][-1]['seconds']:.1f} s pass, "
                  f"{runs[name][-1]['wall_seconds']:.1f} s wall", flush=True)
        for name, cap in (("whole model", "none"), ("block by block", args.cap)):
            runs[name].append(run_child([*base, "--windows", str(args.windows * 4), "--blockmem", cap]))
            print(f"  rep {rep} {name}: peak {runs[name][-1]['peak_vmrss_mb']:.0f} MB", flush=True)
    med = {k: {f: statistics.median(r[f] for r in rs) for f in rs[0] if isinstance(rs[0][f], (int, float))}
           for k, rs in runs.items()}
    rows = []
    print("\n| variant | tokens | seconds | time ratio vs x1 (linear) | peak RSS MB | peak ratio vs x1 (flat = 1) |")
    print("|---|---|---|---|---|---|")
    for m in mult:
        r = med[f"x{m}"]
        row = {"variant": f"x{m}", **r, "time_ratio": r["seconds"] / med["x1"]["seconds"],
               "peak_ratio": r["peak_rss_mb"] / med["x1"]["peak_rss_mb"]}
        rows.append(row)
        print(f"| x{m} | {int(r['tokens'])} | {r['seconds']:.1f} | {row['time_ratio']:.2f} ({m}.00) | "
              f"{r['peak_rss_mb']:.0f} | {row['peak_ratio']:.3f} |")
    one, two = med["1 process"], med["2 processes"]
    speed = one["seconds"] / two["seconds"]
    print(f"\n1 vs 2 processes on {args.windows * 2 * args.seq_len} tokens ({args.threads} threads in all): pass "
          f"{one['seconds']:.1f} s vs {two['seconds']:.1f} s = {speed:.2f}x; wall (launch + load included) "
          f"{one['wall_seconds']:.1f} s vs {two['wall_seconds']:.1f} s")
    rows.append({"variant": "processes", "one": one, "two": two, "pass_speedup": speed})
    whole, block = med["whole model"], med["block by block"]
    print(f"\nforward-only scoring of {args.windows * 4 * args.seq_len} tokens, model {whole['model_mb']:.0f} MB: "
          f"whole model peak {whole['peak_vmrss_mb']:.0f} MB (anon {whole['peak_anon_mb']:.0f}) vs block by block "
          f"under --max-memory {args.cap} {block['peak_vmrss_mb']:.0f} MB (anon {block['peak_anon_mb']:.0f}) = "
          f"{block['peak_vmrss_mb'] / whole['peak_vmrss_mb']:.2f}x; time {block['seconds'] / whole['seconds']:.2f}x")
    rows.append({"variant": "blockwise", "whole": whole, "block": block,
                 "peak_ratio": block["peak_vmrss_mb"] / whole["peak_vmrss_mb"]})
    write_results(args.out, {"settings": settings, "results": rows, "runs": runs})


if __name__ == "__main__":
    main()
