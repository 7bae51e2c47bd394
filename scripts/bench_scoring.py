"""Cost of the one-pass scoring over a bare forward(+backward), per shared/protocol.md.

Variants, each in its own process (so peak RSS is its own), repeated in interleaved order:
  bare_fwd        no-grad forward over the batches (logits)
  bare_fwdbwd     forward + backward of the summed token NLL with every parameter requiring grad (.grad kept)
  activation      ``score(..., ['activation'])``: the forward-only pass + table
  groups          taylor + fisher + activation + magnitude at every GROUP granularity (no per-weight tensors)
  defaults        every one-pass default scorer (the four + block_influence + residual_fisher), groups only
  elements        the same plus per-weight tensors (element granularity)
Printed: median seconds, ratios (activation / bare_fwd, groups and elements / bare_fwdbwd), peak RSS and the RSS
increase over the loaded model. Writes a JSON beside the table. Reference setting: SmolLM2, 32 x 256 Austen.

    python scripts/bench_scoring.py [--model builtin:smollm2-135m] [--windows 32] [--seq-len 256] [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from benchlib import peak_rss_mb, rss_mb, run_child, write_results  # noqa: E402

VARIANTS = ("bare_fwd", "bare_fwdbwd", "activation", "groups", "defaults", "elements")


def child(args: argparse.Namespace) -> None:
    """Run one variant and print one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    from importance.data.sources import load_data
    from importance.engine.objective import token_nll
    from importance.models.load import load_model
    from importance.scoring import DEFAULT_SCORERS, score

    lm = load_model(args.model)
    windows = load_data(args.data, lm.tokenizer, seq_len=args.seq_len, samples=args.windows, seed=0)
    model, task = lm.model, lm.task
    rss_loaded = rss_mb()
    start = time.perf_counter()
    if args.variant == "bare_fwd":
        with torch.no_grad():
            for b in windows.batches(args.batch_size):
                model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
    elif args.variant == "bare_fwdbwd":
        for b in windows.batches(args.batch_size):
            nll, _ = token_nll(model, b, task)
            nll.sum().backward()
    else:
        protocol = ["taylor", "fisher", "activation", "magnitude"]  # shared/protocol.md's pass
        scorers = {"activation": ["activation"], "groups": protocol, "defaults": list(DEFAULT_SCORERS),
                   "elements": protocol}[args.variant]
        score(lm, windows, scorers, batch_size=args.batch_size, elements=args.variant == "elements", progress=False)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    print(json.dumps({"variant": args.variant, "seconds": seconds, "peak_rss_mb": peak, "loaded_rss_mb": rss_loaded,
                      "tokens": windows.n_tokens}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--data", default="austen:train")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="scripts/results/bench_scoring.json")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        child(args)
        return
    variants = args.variants.split(",")
    settings = {k: getattr(args, k) for k in ("model", "data", "windows", "seq_len", "batch_size", "threads", "reps")}
    print("settings:", json.dumps(settings))
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for rep in range(args.reps):
        for v in variants:
            cmd = [sys.executable, __file__, "--variant", v, *sum(([f"--{k.replace('_', '-')}", str(val)]
                                                                  for k, val in settings.items() if k != "reps"), [])]
            runs[v].append(run_child(cmd))
            print(f"  rep {rep} {v:<12} {runs[v][-1]['seconds']:7.1f} s  peak {runs[v][-1]['peak_rss_mb']:7.0f} MB",
                  flush=True)
    med = {v: {"seconds": statistics.median(r["seconds"] for r in rs),
               "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
               "loaded_rss_mb": statistics.median(r["loaded_rss_mb"] for r in rs)} for v, rs in runs.items()}
    base = {"activation": "bare_fwd", "groups": "bare_fwdbwd", "defaults": "bare_fwdbwd", "elements": "bare_fwdbwd"}
    target = {"activation": (1.05, None), "groups": (1.10, 1.05), "defaults": (1.10, 1.05), "elements": (1.10, None)}
    print("\n| variant | seconds | vs | time ratio (target) | peak RSS MB | peak ratio (target) | "
          "pass RSS increase MB |")
    print("|---|---|---|---|---|---|---|")
    table = []
    for v in variants:
        m = med[v]
        row = {"variant": v, **m, "increase_mb": m["peak_rss_mb"] - m["loaded_rss_mb"]}
        ref = base.get(v)
        if ref in med:
            row["time_ratio"] = m["seconds"] / med[ref]["seconds"]
            row["peak_ratio"] = m["peak_rss_mb"] / med[ref]["peak_rss_mb"]
            t_time, t_mem = target[v]
            tr = f"{row['time_ratio']:.3f} (<= {t_time})"
            pr = f"{row['peak_ratio']:.3f}" + (f" (<= {t_mem})" if t_mem else "")
        else:
            tr = pr = "-"
        print(f"| {v} | {m['seconds']:.1f} | {ref or '-'} | {tr} | {m['peak_rss_mb']:.0f} | {pr} | "
              f"{row['increase_mb']:.0f} |")
        table.append(row)
    write_results(args.out, {"settings": settings, "results": table, "runs": runs})


if __name__ == "__main__":
    main()
