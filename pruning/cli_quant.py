"""``imprune quantize``: importance-guided mixed-precision weights under an average-bits budget.

    imprune quantize --model M --scores DIR --budget 5.0 --choices 4,8 [--group-size G] [--keep PATTERN ...]
                     [--sensitivity fisher|activation|taylor|magnitude] [--fake] [--random-seed S] --out OUT

Plans one width per block linear module (``pruning.bits``: exact DP on the Fisher-weighted quantization error),
stores the weights packed with optimum-quanto (``pruning.quantize``), evaluates perplexity before and after and
writes the folder with ``imprune.json`` (``bits`` = {layer: {component: width}}, ``modules`` = per-module map)
and ``bits.png`` (the chosen widths beside the importance heatmap, drawn by ``importance.heatmap``).
``--fake`` writes quantize-dequantized float weights instead (a plain transformers folder, any architecture);
without it, modules that are not ``torch.nn.Linear`` (GPT-2's Conv1D, some MoE routers) stay in full precision.
``--random-seed`` replaces the guided plan by a random one at the same budget (the benchmark's baseline).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from importance.data import load_data
from importance.models import load_model
from importance.table import ImportanceTable

from .bits import SENSITIVITIES, BitPlan, check_budget, parse_choices, plan_bits, random_plan
from .cli import ALLOW_PICKLE, DEVICE, MODEL, OVERWRITE, QUIET, TRUST, arg, check_output, command, positive
from .cli_prune import check_table
from .evaluate import perplexity
from .quantize import fake_quantize_model_, float32_bytes, quantize_model_, save_quantized, weight_bytes


def parse_keep(values: list[str] | None) -> tuple[str, ...]:
    """--keep may repeat and take comma lists: ['lm_head', 'a,b'] -> ('lm_head', 'a', 'b')."""
    return tuple(p.strip() for v in values or () for p in v.split(",") if p.strip())


@command("quantize", "mixed-precision weights by importance under an average-bits budget (optimum-quanto)", [
    MODEL, DEVICE, TRUST, ALLOW_PICKLE,
    arg("--scores", default=None, help="importance table folder (`imprune score --elements` for the Fisher estimate)"),
    arg("--budget", type=float, required=True, help="average bits per planned weight, e.g. 5.0"),
    arg("--choices", default="4,8", help="widths to choose from (2, 4, 8), comma separated"),
    arg("--group-size", type=int, default=None,
        help="inputs per scale for 2/4-bit widths; must divide every planned module's input dimension "
             "(default: the largest of 128/96/64/32 that divides it)"),
    arg("--keep", action="append", default=None, metavar="PATTERN",
        help="module name patterns kept in full precision (shell wildcards; repeat or comma-separate)"),
    arg("--sensitivity", default="fisher", choices=list(SENSITIVITIES),
        help="loss-increase estimate: fisher (element Fisher x squared error), activation, taylor, magnitude"),
    arg("--random-seed", type=int, default=None, help="a random plan at the same budget instead (baseline)"),
    arg("--fake", action="store_true", help="write quantize-dequantized float weights (no packed storage)"),
    arg("--eval-data", default="austen:eval"), arg("--eval-tokens", type=int, default=16384),
    arg("--seq-len", type=int, default=256), arg("--batch-size", type=int, default=8),
    arg("--no-eval", action="store_true", help="skip perplexity before/after"),
    arg("--out", required=True, help="output folder"), OVERWRITE, QUIET])
def quantize_cmd(args: argparse.Namespace) -> int:
    out = check_output(args.out, args.overwrite, protect={"--model": args.model, "--scores": args.scores,
                                                          "--eval-data": args.eval_data})
    choices = parse_choices(args.choices)
    check_budget(args.budget, choices)
    positive(args.group_size, "--group-size")
    positive(args.eval_tokens, "--eval-tokens")
    positive(args.batch_size, "--batch-size")
    keep = parse_keep(args.keep)
    table = ImportanceTable.load(args.scores) if args.scores else None
    lm = load_model(args.model, dtype="float32", device=args.device, trust_remote_code=args.trust_remote_code,
                    allow_pickle=args.allow_pickle)
    if table is not None:
        check_table(table, lm, f"--scores {args.scores}")
    if args.random_seed is not None:
        plan = random_plan(lm.model, args.budget, choices, args.random_seed, keep, args.group_size, not args.fake)
    else:
        plan = plan_bits(lm.model, table, args.budget, choices, args.sensitivity, keep, args.group_size,
                         linear_only=not args.fake)
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    evaluate = not args.no_eval and lm.task in ("causal-lm", "masked-lm")
    windows = load_data(args.eval_data, lm.tokenizer, seq_len=args.seq_len, tokens=args.eval_tokens,
                        sampling="sequential", max_positions=limit, flags=("--eval-tokens", "--seq-len")) \
        if evaluate else None
    ppl = (lambda: perplexity(lm.model, windows, lm.task, args.batch_size, progress=not args.quiet)) if windows \
        else (lambda: None)
    fp32 = float32_bytes(lm.model)
    before = ppl()
    (fake_quantize_model_ if args.fake else quantize_model_)(lm.model, plan)
    after = ppl()
    stored = weight_bytes(lm.model)
    record = {"method": "quantize", "budget": args.budget, "path": "fake-quant" if args.fake else "optimum-quanto",
              "memory": {"bytes": stored, "float32_bytes": fp32, "ratio": stored / fp32},
              "perplexity": {"before": before.to_dict() if before else None,
                             "after": after.to_dict() if after else None},
              "scores": str(Path(args.scores).resolve()) if args.scores else None}
    figure = {"bits.png": figure_png(plan, table)}
    if args.fake:
        from .io import save_model

        save_model(lm, out, {**record, **plan.to_json()}, overwrite=args.overwrite, files=figure)
    else:
        save_quantized(lm, out, plan, record, overwrite=args.overwrite, files=figure)
    if before and after:
        print(f"perplexity {before.ppl:.2f} -> {after.ppl:.2f} ({after.windows} x {after.seq_len} tokens, "
              f"{after.predicted} predicted; {after.data})")
    counts = {b: sum(1 for v in plan.bits.values() if v == b) for b in plan.choices}
    print(f"{len(plan.units)} modules at {', '.join(f'{n} x {b}-bit' for b, n in counts.items())}: average "
          f"{plan.average_bits():.3f} bits (budget {args.budget}, solver {plan.solver}); weights {stored:,} bytes = "
          f"{stored / fp32:.3f}x of float32 ({'fake-quant: float storage' if args.fake else 'optimum-quanto'}); "
          f"wrote {out}")
    if plan.errors:
        print(f"estimate: {plan.sensitivity}"
              + ("" if "sum F" in plan.sensitivity or not plan.sensitivity.startswith("fisher") else
                 " (the table has no element Fisher; `imprune score --elements` gives the exact estimate)"))
    return 0


def figure_png(plan: BitPlan, table: ImportanceTable | None) -> bytes:
    """The bits map beside the importance it came from (``importance.heatmap``), as PNG bytes, drawn before
    anything is written."""
    from importance.heatmap import figure_bytes, layer_map_figure, plan_scorer

    scorer = plan_scorer({"sensitivity": plan.sensitivity}, table) if table is not None else None
    fig = layer_map_figure(plan.layer_map(), "bits", table, scorer=scorer, log=True,
                           title=f"bits per layer x component (average {plan.average_bits():.2f}, budget "
                                 f"{plan.budget:g}; {plan.solver})")
    return figure_bytes(fig)
