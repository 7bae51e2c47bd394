"""Benchmark of error-compensated selective quantization (shared/protocol.md), in ONE run.

Rows (each a fresh copy of the model, quantized, evaluated; weights on the compressed-tensors grid, group
``--group-size`` for widths below 8, asymmetric unless ``--sym``):
  dense float32
  rtn 4-bit                          round to nearest (no data)
  gptq 4-bit, gptq 8-bit             uniform, sequential GPTQ
  guided gptq <b> (choices)          widths by the output error after GPTQ x Fisher row sensitivity
                                     (``pruning.quant.gptq_model``), for b in --budgets (4.0 with 3,4,8; 4.5 with
                                     3,4,8; 5.0 with 4,8); one planning pass measures every width once
  random <b> seed k                  random plans at the same budgets and choices, GPTQ at those widths
  joint 50% + 4-bit, 2:4 + 4-bit     GPTQ with the mask in the same column loop
  sparsegpt 50%                      the pass the quantization time is compared with (same windows)
  gptq 4-bit natural static          natural column order, group parameters from the initial weights (the way
                                     llm-compressor computes them)
  validate (the width estimate)      for --validate-units sampled linears x --validate-widths, the predicted cost
                                     the knapsack uses vs the measured eval NLL increase of that linear alone
                                     GPTQ-quantized (``pruning.quant.estimate_check``), on the first
                                     --validate-windows Persuasion windows; Spearman in the output and the JSON
Columns: average bits, weight bytes as stored (packed codes + scales + zero points; embeddings float32),
perplexity, loss vs dense, / random loss at the same budget, quantization seconds, / SparseGPT seconds.

Reference setting: SmolLM2-135M float32; calibration 32 x 256 ``austen:train`` windows (seed 0); evaluation
the first 16,384 tokens of Persuasion in windows of 256. ``--quick``: 8 x 256 calibration, 4,096 evaluation
tokens, one random seed. ``--rows`` picks rows by name and runs them in that order (e.g. ``--rows guided,gptq4``;
sparsegpt always first, validate last); ``--name`` the result files'
stem (default bench_gptq, bench_gptq_quick).

    python scripts/bench_gptq.py [--quick] [--group-size 64] [--rows ...] [--seeds 3] [--name STEM]
                                 [--validate-units 12 --validate-widths 2,3,4 --validate-windows 8]
                                 [--observer minmax|mse|mse-h] [--append]
                                 [--out scripts/results]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import add_reference_args  # noqa: E402  (scripts/ is on the path when a script runs)

BUDGETS = {4.0: "3,4,8", 4.5: "3,4,8", 5.0: "4,8"}
ROWS = ("rtn4", "gptq4", "gptq8", "guided", "random", "joint", "sparsegpt", "static4", "validate")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--sym", action="store_true")
    p.add_argument("--observer", default=None, help="group range observer: minmax | mse | mse-h (default: "
                   "GPTQConfig's)")
    p.add_argument("--budgets", default="4.0,4.5,5.0")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--seeds", type=int, default=None, help="random plans per budget (default 3, quick 1)")
    p.add_argument("--validate-units", type=int, default=12)
    p.add_argument("--validate-widths", default="2,3,4")
    p.add_argument("--validate-windows", type=int, default=8)
    p.add_argument("--name", default=None, help="stem of the result files")
    p.add_argument("--append", action="store_true",
                   help="add the rows to the result files of --name (same settings but --rows / --budgets / --seeds): "
                        "their dense row, SparseGPT time and planning pass are kept (one table from several runs)")
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
    from pruning.methods.unstructured import UnstructuredConfig, prune_unstructured
    from pruning.quant.bits import _units, random_plan
    from pruning.quant.ct_format import packed_bytes
    from pruning.quant.estimate_check import check_estimate, sample_units
    from pruning.quant.gptq_model import GPTQConfig, gptq_errors, plan_from_errors, plan_gptq, quantize_model_gptq_
    from pruning.quant.quantize import float32_bytes
    from pruning.second_order.gptq import GPTQ_BITS
    from scripts.benchlib import reference_data

    a = _args()
    rows_order = [r.strip() for r in a.rows.split(",") if r.strip()]
    rows_wanted = set(rows_order)
    unknown = rows_wanted - set(ROWS)
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; use {', '.join(ROWS)}")
    budgets = [float(b) for b in a.budgets.split(",") if b.strip()]
    from dataclasses import replace

    cfg = GPTQConfig("gptq", sym=a.sym)
    cfg = replace(cfg, observer=a.observer or cfg.observer)
    st = {"model": a.model, "quick": a.quick, "group_size": a.group_size, "symmetric": a.sym,
          "observer": cfg.observer,
          "budgets": {b: BUDGETS.get(b, "3,4,8") for b in budgets}, "rows": sorted(rows_wanted),
          "seeds": a.seeds or (1 if a.quick else 3), "calib_windows": a.calib_windows or (8 if a.quick else 32),
          "seq_len": a.seq_len, "eval_tokens": a.eval_tokens or (4096 if a.quick else 16384),
          "batch_size": a.batch_size, "seed": a.seed, "threads": torch.get_num_threads()}
    if "validate" in rows_wanted:
        st["validate"] = {"units": a.validate_units, "widths": a.validate_widths, "windows": a.validate_windows}
    print("settings: " + ", ".join(f"{k}={v}" for k, v in st.items()), flush=True)
    base = load_model(a.model)
    calib, evalw = reference_data(base, st)
    fp32 = float32_bytes(base.model)
    gs = a.group_size
    results: list[dict[str, Any]] = []

    plan_s, errors, how, sgpt_s, check = None, None, "", None, None
    tables: dict[str, Any] = {}

    def fisher_table() -> Any:  # one scoring pass shared by the guided rows and the estimate check
        if "fisher" not in tables:
            tables["fisher"] = score(base, calib, ["fisher"], elements=True, batch_size=a.batch_size, progress=False)
        return tables["fisher"]

    def dump(partial: bool) -> str:
        """Ratios, markdown and JSON of the rows so far (after every row, so a cut-off run keeps its rows)."""
        dense = results[0]["ppl"]
        for r in results:
            r["ppl_loss"] = r["ppl"] - dense
            rand = [x["ppl"] - dense for x in results if x["row"].startswith("random") and x["budget"] == r["budget"]]
            r["loss_vs_random"] = r["ppl_loss"] / (sum(rand) / len(rand)) if rand and r["budget"] else None
            r["time_vs_sparsegpt"] = r["seconds"] / sgpt_s if sgpt_s and r["seconds"] else None
        md = _markdown(results, st, evalw, plan_s) + ("" if check is None else "\n\n" + _check_line(check))
        out = Path(a.out)
        write_json(out / f"{stem}.json", {"settings": st, "complete": not partial, "eval": dict(evalw.meta),
                                          "calibration": dict(calib.meta), "planning_seconds": plan_s,
                                          "estimator": how, "errors": errors, "rows": results,
                                          "estimate_check": check,
                                          "versions": versions()})
        (out / f"{stem}.md").write_text(md + "\n")
        return md + f"\nwrote {out / (stem + '.json')} and .md"

    def evaluate(name: str, model: Any, plan: Any, quantized: Any, seconds: float | None, budget: float | None) -> None:
        ppl = perplexity(model, evalw, base.task, batch_size=a.batch_size, progress=False)
        nbytes = fp32 if plan is None else packed_bytes(model, plan, quantized)
        results.append({"row": name, "budget": budget, "avg_bits": None if plan is None else
                        round(plan.average_bits(), 4), "weight_bytes": nbytes, "ratio_fp32": nbytes / fp32,
                        "ppl": ppl.ppl, "nll": ppl.nll, "predicted": ppl.predicted,
                        "seconds": None if seconds is None else round(seconds, 1), "threads": st["threads"],
                        "bits": None if plan is None else dict(plan.bits)})
        print(f"  {name}: ppl {ppl.ppl:.3f}, {nbytes / fp32:.3f}x float32"
              + ("" if seconds is None else f", {seconds:.0f} s"), flush=True)
        dump(partial=True)

    def run(name: str, plan: Any, c: Any = cfg, budget: float | None = None) -> None:
        model = copy.deepcopy(base.model)
        start = time.perf_counter()
        q = quantize_model_gptq_(model, plan, calib, c, a.batch_size)
        evaluate(name, model, plan, q, time.perf_counter() - start, budget)
        del model

    stem = a.name or ("bench_gptq_quick" if a.quick else "bench_gptq")
    if a.append and (Path(a.out) / f"{stem}.json").exists():
        import json

        old = json.loads((Path(a.out) / f"{stem}.json").read_text())
        same = [k for k in st if k not in ("rows", "budgets", "seeds", "validate", "threads")]  # each row: threads
        diff = [k for k in same if str(old["settings"].get(k)) != str(st[k])]
        if diff or old["eval"] != dict(evalw.meta):
            raise SystemExit(f"--append: {stem}.json has other settings ({', '.join(diff) or 'eval windows'})")
        results.extend(old["rows"])
        st["rows"] = sorted(set(old["settings"]["rows"]) | rows_wanted)
        st["budgets"] = {**{float(b): v for b, v in old["settings"]["budgets"].items()}, **st["budgets"]}
        sgpt_s = next((r["seconds"] for r in results if r["row"].startswith("sparsegpt")), None)
        plan_s, errors, how, check = old["planning_seconds"], old["errors"], old["estimator"], old["estimate_check"]
        print(f"  appending to {stem}.json: {len(results)} rows kept", flush=True)
    else:
        evaluate("dense float32", base.model, None, None, None, None)
    if "sparsegpt" in rows_wanted:
        lm = copy.copy(base)
        lm.model = copy.deepcopy(base.model)
        start = time.perf_counter()
        prune_unstructured(lm, UnstructuredConfig(0.5, "sparsegpt"), windows=calib, batch_size=a.batch_size)
        sgpt_s = time.perf_counter() - start
        evaluate("sparsegpt 50% (time reference)", lm.model, None, None, sgpt_s, None)
        results[-1]["weight_bytes"] = None
        del lm
    uniform = lambda b: plan_gptq(base.model, None, float(b), str(b), calib, cfg, group_size=gs)  # noqa: E731

    def guided() -> None:
        nonlocal errors, how, plan_s
        table = fisher_table()
        units, kept = _units(base.model, (), gs, True)
        widths = tuple(sorted({int(w) for b in budgets for w in st["budgets"][b].split(",")}))
        start = time.perf_counter()
        errors, how = gptq_errors(base.model, units, widths, calib, cfg, table, a.batch_size)
        plan_s = time.perf_counter() - start
        print(f"planning pass ({widths}): {plan_s:.0f} s; {how}", flush=True)
        for b in budgets:
            choices = tuple(int(w) for w in st["budgets"][b].split(","))
            run(f"guided gptq {b:g} ({st['budgets'][b]})", plan_from_errors(units, kept, errors, choices, b, how),
                budget=b)

    def random_rows() -> None:
        for k in range(st["seeds"]):  # seed-major: a cut-off run still has every budget
            for b in budgets:
                run(f"random {b:g} ({st['budgets'][b]}) seed {k}",
                    random_plan(base.model, b, st["budgets"][b], k, group_size=gs, linear_only=True,
                                supported=GPTQ_BITS), budget=b)

    def joint() -> None:
        run("joint 50% + gptq 4-bit", uniform(4), replace(cfg, sparsity=0.5))
        run("joint 2:4 + gptq 4-bit (natural order)", uniform(4), replace(cfg, nm=(2, 4), act_order=False))

    steps = {"rtn4": lambda: run("rtn 4-bit", uniform(4), replace(cfg, method="rtn")),
             "gptq4": lambda: run("gptq 4-bit", uniform(4)), "gptq8": lambda: run("gptq 8-bit", uniform(8)),
             "static4": lambda: run("gptq 4-bit natural order, static groups", uniform(4),
                                    replace(cfg, act_order=False, static_groups=True)),
             "joint": joint, "guided": guided, "random": random_rows}
    for name in rows_order:  # in the order --rows names them
        if name in steps:
            steps[name]()
    if "validate" in rows_wanted:
        units, _ = _units(base.model, (), gs, True)
        sample = sample_units(units, a.validate_units, a.seed)
        vwidths = tuple(sorted(int(w) for w in a.validate_widths.split(",") if w.strip()))
        vwin = load_data("austen:eval", base.tokenizer, seq_len=a.seq_len, tokens=a.validate_windows * a.seq_len,
                         sampling="sequential")
        start = time.perf_counter()
        def partial(c: dict[str, Any]) -> None:  # every measured row is kept even if the run is cut off
            nonlocal check
            r = c["rows"][-1]
            print(f"  {r['unit']} {r['bits']}-bit: predicted {r['predicted']:.4g}, measured {r['measured']:+.4f} nats",
                  flush=True)
            check = {**c, "seconds": round(time.perf_counter() - start, 1), "windows": len(vwin),
                     "seq_len": vwin.seq_len, "widths": list(vwidths), "complete": False}
            dump(partial=True)

        check = check_estimate(base, sample, vwidths, calib, vwin, cfg, fisher_table(), a.batch_size, partial)
        check.update(complete=True, seconds=round(time.perf_counter() - start, 1), windows=len(vwin),
                     seq_len=vwin.seq_len, widths=list(vwidths))
        print(_check_line(check), flush=True)
        dump(partial=True)
    print(dump(partial=False))
    return 0


def _check_line(c: dict[str, Any]) -> str:
    """The estimate check in one line (``pruning.quant.estimate_check``)."""
    s, r = c["spearman"], c["spearman_rtn_fisher"]
    per = lambda d: ", ".join(f"{b}-bit {v:.2f}" for b, v in d["per_width"].items())  # noqa: E731
    units = len({x["unit"] for x in c["rows"]})
    return (f"validate-estimate: {units} linears x widths {c['widths']}, measured = eval NLL increase of that linear "
            f"alone GPTQ-quantized ({c['windows']} x {c['seq_len']} Persuasion tokens; {c['seconds']:.0f} s): "
            f"Spearman(predicted after compensation, measured) pooled **{s['pooled']:.3f}** (per width {per(s)}); "
            f"before compensation (sum F (w - RTN(w))^2) pooled {r['pooled']:.3f} (per width {per(r)})")


def _markdown(rows: list[dict[str, Any]], st: dict[str, Any], evalw: Any, plan_s: float | None) -> str:
    lines = [f"Perplexity on {evalw.meta.get('data')} ({len(evalw)} x {evalw.seq_len} tokens), calibration "
             f"{st['calib_windows']} x {st['seq_len']} austen:train windows (seed {st['seed']}); grid "
             f"{'symmetric' if st['symmetric'] else 'asymmetric'}, {st['observer']} observer, "
             f"group {st['group_size']} below 8 bits, 8 bits per "
             f"channel; embeddings / lm_head float32"
             + (f"; the guided rows share one planning pass of {plan_s:.0f} s." if plan_s else "."), "",
             "| row | avg bits | weight MB | x fp32 | perplexity | loss vs dense | / random loss | seconds | "
             "/ SparseGPT |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bits = "32" if r["avg_bits"] is None else f"{r['avg_bits']:.3f}"
        mb = "-" if r["weight_bytes"] is None else f"{r['weight_bytes'] / 1e6:.1f}"
        ratio = "-" if r["weight_bytes"] is None else f"{r['ratio_fp32']:.3f}"
        rel = "-" if r["loss_vs_random"] is None else f"{r['loss_vs_random']:.2f}"
        sec = "-" if r["seconds"] is None else f"{r['seconds']:.0f}"
        tv = "-" if r["time_vs_sparsegpt"] is None else f"{r['time_vs_sparsegpt']:.2f}"
        lines.append(f"| {r['row']} | {bits} | {mb} | {ratio} | {r['ppl']:.2f} | {r['ppl_loss']:+.2f} | {rel} | "
                     f"{sec} | {tv} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
