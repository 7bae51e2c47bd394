"""Benchmark of selective quantization (shared/protocol.md): perplexity and in-memory weight bytes of
importance-guided mixed precision against uniform widths and random plans at the same budget, in ONE run.

Rows (every quantized row is stored for real with optimum-quanto, then evaluated and measured):
  dense float32
  uniform 8-bit, uniform 4-bit
  guided <budget>-bit (choices 8/4) for each sensitivity: fisher (element Fisher x squared error, the exact
      estimate) and activation (||x||^2 x squared error, no gradient needed)
  random <budget>-bit, several seeds (units in a random order, each raised while the budget allows)
Weight bytes: the storage of every parameter (packed codes + scales + shifts), tied tensors once, divided by
the same parameters in float32. The tied embedding / lm_head of SmolLM2 stays float32 in every row.

Targets: guided loses at most half the perplexity that random loses (mean over seeds), weight memory of the
guided row <= 0.4x float32.

Reference setting: SmolLM2-135M float32; calibration 32 x 256 Austen windows without Persuasion (seed 0);
evaluation: the first 16,384 tokens of Persuasion in windows of 256; 3 random seeds. ``--quick``: 8 x 256
calibration, 4,096 evaluation tokens, 2 seeds.

    python scripts/bench_quant.py [--quick] [--budget 5] [--choices 4,8] [--seeds 3] [--out scripts/results]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path
from typing import Any

from benchlib import add_reference_args  # noqa: E402  (scripts/ is on the path when a script runs)


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--quick", action="store_true", help="8 calibration windows, 4,096 evaluation tokens, 2 seeds")
    p.add_argument("--budget", type=float, default=5.0)
    p.add_argument("--choices", default="4,8")
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--sensitivities", default="fisher,activation")
    p.add_argument("--seeds", type=int, default=None, help="random plans (default 3, quick 2)")
    add_reference_args(p)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return p.parse_args()


def main() -> int:
    import torch

    from importance.data.sources import load_data
    from importance.models.load import load_model
    from importance.scoring import score
    from importance.store.meta import versions, write_json
    from pruning.eval.perplexity import perplexity
    from pruning.quant.bits import parse_choices, plan_bits, random_plan, uniform_plan
    from pruning.quant.quantize import float32_bytes, quantize_model_, weight_bytes

    a = _args()
    choices = parse_choices(a.choices)
    sens = [s.strip() for s in a.sensitivities.split(",") if s.strip()]
    st = {"model": a.model, "quick": a.quick, "budget": a.budget, "choices": list(choices),
          "group_size": a.group_size or "auto (largest of 128/96/64/32 dividing the input dimension)",
          "sensitivities": sens, "seeds": a.seeds or (2 if a.quick else 3),
          "calib_windows": a.calib_windows or (8 if a.quick else 32), "seq_len": a.seq_len,
          "eval_tokens": a.eval_tokens or (4096 if a.quick else 16384), "batch_size": a.batch_size, "seed": a.seed,
          "threads": torch.get_num_threads(), "storage": "optimum-quanto (packed qint4, int8), float32 scales"}
    print("settings: " + ", ".join(f"{k}={v}" for k, v in st.items()), flush=True)
    base = load_model(a.model)
    limit = getattr(base.model.config, "max_position_embeddings", None)
    calib = load_data("austen:train", base.tokenizer, seq_len=a.seq_len, samples=st["calib_windows"], seed=a.seed,
                      max_positions=limit)
    evalw = load_data("austen:eval", base.tokenizer, seq_len=a.seq_len, tokens=st["eval_tokens"],
                      sampling="sequential", max_positions=limit)
    start = time.perf_counter()
    table = score(base, calib, sorted(set(sens) | {"fisher"}), elements=True, batch_size=a.batch_size,
                  progress=False)
    score_s = time.perf_counter() - start
    fp32 = float32_bytes(base.model)
    gs = a.group_size
    plans: list[tuple[str, Any]] = [("dense float32", None)]
    plans += [(f"uniform {b}-bit", uniform_plan(base.model, b, group_size=gs)) for b in sorted(choices, reverse=True)]
    for s in sens:
        start = time.perf_counter()
        p = plan_bits(base.model, table, a.budget, choices, s, group_size=gs)
        plans.append((f"guided {s} {a.budget:g}-bit", p))
        print(f"planned {s} in {time.perf_counter() - start:.1f} s ({p.solver})", flush=True)
    plans += [(f"random {a.budget:g}-bit seed {k}", random_plan(base.model, a.budget, choices, k, group_size=gs))
              for k in range(st["seeds"])]
    fisher = plan_bits(base.model, table, a.budget, choices, "fisher", group_size=gs).errors  # unit -> width -> est.
    rows = []
    for name, plan in plans:
        model = base.model if plan is None else quantize_model_(copy.deepcopy(base.model), plan)
        start = time.perf_counter()
        ppl = perplexity(model, evalw, base.task, batch_size=a.batch_size, progress=False)
        nbytes = weight_bytes(model)
        rows.append({"row": name, "avg_bits": None if plan is None else round(plan.average_bits(), 4),
                     "estimate": None if plan is None else sum(fisher[n][b] for n, b in plan.bits.items()),
                     "weight_bytes": nbytes, "ratio_fp32": nbytes / fp32, "ppl": ppl.ppl, "nll": ppl.nll,
                     "predicted": ppl.predicted, "eval_s": round(time.perf_counter() - start, 1),
                     "bits": None if plan is None else dict(plan.bits)})
        print(f"  {name}: ppl {ppl.ppl:.3f}, {nbytes / fp32:.3f}x float32", flush=True)
        del model
    dense = rows[0]["ppl"]
    rand = [r["ppl"] - dense for r in rows if r["row"].startswith("random")]
    rand_loss = statistics.mean(rand) if rand else float("nan")
    for r in rows:
        r["ppl_loss"] = r["ppl"] - dense
        r["loss_vs_random"] = r["ppl_loss"] / rand_loss if rand_loss > 0 else None
    guided = [r for r in rows if r["row"].startswith("guided")]
    targets = {r["row"]: {"loss_le_half_random": r["ppl_loss"] <= 0.5 * rand_loss,
                          "memory_le_0.4": r["ratio_fp32"] <= 0.4} for r in guided}
    table_md = _markdown(rows, st, evalw, score_s, rand_loss)
    print(table_md)
    for name, t in targets.items():
        print(f"target {name}: perplexity loss <= half of random's: {'PASS' if t['loss_le_half_random'] else 'FAIL'};"
              f" weights <= 0.4x float32: {'PASS' if t['memory_le_0.4'] else 'FAIL'}")
    out = Path(a.out)
    stem = "bench_quant_quick" if a.quick else "bench_quant"
    write_json(out / f"{stem}.json", {"settings": st, "eval": dict(evalw.meta), "calibration": dict(calib.meta),
                                      "score_seconds": round(score_s, 1), "float32_bytes": fp32, "rows": rows,
                                      "random_mean_loss": rand_loss, "targets": targets, "versions": versions()})
    (out / f"{stem}.md").write_text(table_md + "\n")
    print(f"wrote {out / (stem + '.json')} and .md")
    return 0


def _markdown(rows: list[dict[str, Any]], st: dict[str, Any], evalw: Any, score_s: float, rand_loss: float) -> str:
    lines = [f"Perplexity on {evalw.meta.get('data')} ({len(evalw)} x {evalw.seq_len} tokens), calibration "
             f"{st['calib_windows']} x {st['seq_len']} Austen windows (seed {st['seed']}, scored in {score_s:.0f} s); "
             f"weights stored with optimum-quanto; the tied embedding stays float32.", "",
             "| row | avg bits | weight MB | x fp32 | perplexity | loss vs dense | / random loss | Fisher estimate |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bits = "32" if r["avg_bits"] is None else f"{r['avg_bits']:.3f}"
        rel = "-" if r["loss_vs_random"] is None or r["row"].startswith("dense") else f"{r['loss_vs_random']:.2f}"
        est = "-" if r["estimate"] is None else f"{r['estimate']:.3g}"
        lines.append(f"| {r['row']} | {bits} | {r['weight_bytes'] / 1e6:.1f} | {r['ratio_fp32']:.3f} | "
                     f"{r['ppl']:.2f} | {r['ppl_loss']:+.2f} | {rel} | {est} |")
    lines.append(f"\nRandom plans lose {rand_loss:+.2f} perplexity on average.")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
