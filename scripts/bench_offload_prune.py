"""Sequential Wanda / SparseGPT on SmolLM2 under a memory cap: the same masks as in memory, at what memory.

Two child processes prune the same model with the same calibration windows: one with the model in memory,
one loaded with ``--max-memory`` (accelerate keeps what does not fit on disk; the pass streams one block at a
time and writes each pruned block back to its own offload folder). Each child samples its peak resident
memory (VmRSS, and RssAnon, which leaves out memory-mapped weight files) during pruning and saves the
pruned weights' zero masks. The parent compares the masks element by element and prints the peak-memory and
time ratios (offloaded / in memory).

    python scripts/bench_offload_prune.py [--criterion wanda] [--cap 120MB] [--windows 16] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchlib import capped_child, run_child, write_results  # noqa: E402


def child(args: argparse.Namespace) -> None:
    lm, windows, peak = capped_child(args, args.child_cap)
    from safetensors.torch import save_file

    from importance.arch.canonical import model_map
    from pruning.methods.unstructured import UnstructuredConfig, prune_unstructured

    cap = None if args.child_cap == "none" else args.child_cap
    placed = sorted(set(getattr(lm.model, "hf_device_map", {}).values()))
    peak.update(VmRSS=0, RssAnon=0)
    start = time.perf_counter()
    prune_unstructured(lm, UnstructuredConfig(args.sparsity, args.criterion, sequential=True), windows=windows,
                       batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "peak_vmrss_mb": peak["VmRSS"] / 1024, "peak_anon_mb": peak["RssAnon"] / 1024,
              "placement": placed, "max_memory": cap}
    masks = {f"{c.layer}|{c.name}": (c.weight == 0).contiguous() for c in model_map(lm.model).components()
             if c.kind == "linear"}
    save_file(masks, args.masks)
    print(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--data", default="austen:train")
    p.add_argument("--criterion", default="wanda", choices=["wanda", "sparsegpt"])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--cap", default="120MB", help="--max-memory of the offloaded run (SmolLM2: >= 114MB)")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="scripts/results/bench_offload_prune.json")
    p.add_argument("--child-cap", help=argparse.SUPPRESS)
    p.add_argument("--masks", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_cap:
        child(args)
        return
    from safetensors.torch import load_file

    settings = {k: getattr(args, k) for k in ("model", "data", "criterion", "sparsity", "cap", "windows", "seq_len",
                                              "batch_size", "threads")}
    print("settings:", json.dumps(settings), flush=True)
    base = [sys.executable, __file__, "--model", args.model, "--data", args.data, "--criterion", args.criterion,
            "--sparsity", str(args.sparsity), "--windows", str(args.windows), "--seq-len", str(args.seq_len),
            "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    runs, masks = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cap in (("in memory", "none"), ("offloaded", args.cap)):
            path = f"{tmp}/{name.replace(' ', '_')}.safetensors"
            runs[name] = run_child([*base, "--child-cap", cap, "--masks", path])
            masks[name] = load_file(path)
            r = runs[name]
            print(f"  {name:<10} {r['seconds']:7.1f} s   peak VmRSS {r['peak_vmrss_mb']:6.0f} MB   RssAnon "
                  f"{r['peak_anon_mb']:6.0f} MB   placement {r['placement'] or ['all in memory']}", flush=True)
    a, b = masks["in memory"], masks["offloaded"]
    differ = sum(int((a[k] != b[k]).sum()) for k in a) if a.keys() == b.keys() else -1
    total = sum(v.numel() for v in a.values())
    mem, off = runs["in memory"], runs["offloaded"]
    ratios = {"peak_vmrss": off["peak_vmrss_mb"] / mem["peak_vmrss_mb"],
              "peak_anon": off["peak_anon_mb"] / mem["peak_anon_mb"], "time": off["seconds"] / mem["seconds"]}
    print(f"\nmasks: {differ} of {total:,} weights differ ({'identical' if differ == 0 else 'NOT identical'}); "
          f"offloaded / in memory: peak VmRSS {ratios['peak_vmrss']:.2f}x, RssAnon {ratios['peak_anon']:.2f}x, "
          f"time {ratios['time']:.2f}x")
    write_results(args.out, {"settings": settings, "runs": runs, "masks_differ": differ, "weights": total,
                             "ratios": ratios})


if __name__ == "__main__":
    main()
