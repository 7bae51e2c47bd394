"""``imprune quantize``: importance-guided mixed-precision weights under an average-bits budget.

    imprune quantize --model M [--scores DIR] --budget 4.5 --choices 3,4,8 [--data austen:train --tokens 8192
                     --seq-len 256 --seed 0] [--method gptq|rtn] [--sym|--asym] [--group-size G] [--no-act-order]
                     [--observer minmax|mse|mse-h]
                     [--sparsity 0.5 | --nm 2:4] [--keep PATTERN ...] [--format compressed-tensors|quanto]
                     [--fake] [--random-seed S] [--quantize-embeddings 8] --out OUT

With ``--data`` (GPTQ, the default then): the widths are planned by each unit's output error AFTER error
compensation weighted by the table's Fisher (``pruning.quant.gptq_model.plan_gptq``), then the blocks are quantized
sequentially with GPTQ (``pruning.second_order.gptq``) and written in the compressed-tensors format
(``pruning.quant.ct_format``:
plain ``from_pretrained`` reloads it, mixed widths included). ``--method rtn`` rounds to nearest on the same
grid. ``--format quanto`` keeps the optimum-quanto path (round to nearest on quanto's grid, packed in memory;
``pruning.quant.quantize``). The folder holds ``imprune.json`` (``bits`` = {layer: {component: width}}, ``modules``)
and ``bits.png`` (the widths beside the importance heatmap). ``--fake`` writes quantize-dequantized float
weights instead (a plain transformers folder, any architecture); otherwise modules that are not
``torch.nn.Linear`` (GPT-2's Conv1D) stay in full precision. ``--random-seed``: a random plan at the same budget.
``--quantize-embeddings B``: the input embedding and the output head rounded to B bits too, outside the budget
(``pruning.quant.embeddings``; a tied pair quantized and stored once).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from importance.data.sources import load_data
from importance.errors import ImpruneError
from importance.models.identity import check_table
from importance.models.load import load_model
from importance.table import ImportanceTable
from pruning.cli.core import (
    ALLOW_PICKLE,
    DEVICE,
    MODEL,
    OVERWRITE,
    QUIET,
    SEED,
    TRUST,
    arg,
    check_output,
    command,
    positive,
)
from pruning.eval.perplexity import perplexity
from pruning.methods.masks import parse_nm
from pruning.quant.bits import (
    SENSITIVITIES,
    SUPPORTED_BITS,
    BitPlan,
    check_budget,
    parse_choices,
    plan_bits,
    random_plan,
)
from pruning.quant.ct_format import packed_bytes, save_compressed_tensors
from pruning.quant.embeddings import quantize_embeddings_
from pruning.quant.gptq_model import METHODS, GPTQConfig, plan_gptq, quantize_model_gptq_
from pruning.quant.quantize import fake_quantize_model_, float32_bytes, quantize_model_, save_quantized, weight_bytes
from pruning.second_order.gptq import GPTQ_BITS, OBSERVERS


def parse_keep(values: list[str] | None) -> tuple[str, ...]:
    """--keep may repeat and take comma lists: ['lm_head', 'a,b'] -> ('lm_head', 'a', 'b')."""
    return tuple(p.strip() for v in values or () for p in v.split(",") if p.strip())


@command("quantize", "mixed-precision weights by importance under an average-bits budget (GPTQ / RTN)", [
    MODEL, DEVICE, TRUST, ALLOW_PICKLE,
    arg("--scores", default=None, help="importance table folder (`imprune score --elements` for the Fisher estimate)"),
    arg("--budget", type=float, required=True, help="average bits per planned weight, e.g. 4.5"),
    arg("--choices", default="4,8", help="widths to choose from (2, 3, 4, 8; quanto: 2, 4, 8), comma separated"),
    arg("--method", default=None, choices=list(METHODS),
        help="gptq (error-compensated, needs --data; the default with --data) or rtn (round to nearest)"),
    arg("--format", default="compressed-tensors", choices=["compressed-tensors", "quanto"],
        help="compressed-tensors (plain from_pretrained reloads it; default) or quanto (packed in memory, rtn)"),
    arg("--data", default=None, help="calibration data for GPTQ and its width estimate, e.g. austen:train"),
    arg("--tokens", type=int, default=8192, help="calibration tokens (whole windows)"), SEED,
    arg("--sym", dest="sym", action="store_true", default=False, help="symmetric grid (zero point 0)"),
    arg("--asym", dest="sym", action="store_false", help="asymmetric grid with zero points (default)"),
    arg("--act-order", dest="act_order", action="store_true", default=None,
        help="gptq: visit columns by descending Hessian diagonal, static groups (default but with --nm, whose "
             "groups need the natural order; SmolLM2 4-bit g64: 46.66 vs 50.12 without)"),
    arg("--no-act-order", dest="act_order", action="store_false", help="gptq: natural column order"),
    arg("--damp", type=float, default=0.01), arg("--blocksize", type=int, default=128),
    arg("--observer", default=GPTQConfig.observer, choices=list(OBSERVERS),
        help="how each group's range (scale, zero point) is chosen: minmax, or the clipping search mse (least "
             "squared rounding error over shrunk ranges) / mse-h (weighted by the input energy); default "
             f"{GPTQConfig.observer}"),
    arg("--sparsity", type=float, default=0.0, help="gptq: prune this fraction jointly (e.g. 0.5)"),
    arg("--nm", default=None, help="gptq: prune N:M jointly, e.g. 2:4"),
    arg("--group-size", type=int, default=None,
        help="inputs per scale for widths below 8 (8 bits: per channel); must divide every planned module's "
             "input dimension (default: the largest of 128/96/64/32 that divides it)"),
    arg("--quantize-embeddings", type=int, default=None, metavar="BITS",
        help="also round the input embedding and the output head to BITS (e.g. 8; a tied pair once), outside "
             "the budget"),
    arg("--keep", action="append", default=None, metavar="PATTERN",
        help="module name patterns kept in full precision (shell wildcards; repeat or comma-separate)"),
    arg("--sensitivity", default="fisher", choices=list(SENSITIVITIES),
        help="rtn without --data: loss-increase estimate (fisher, activation, taylor, magnitude)"),
    arg("--random-seed", type=int, default=None, help="a random plan at the same budget instead (baseline)"),
    arg("--fake", action="store_true", help="write quantize-dequantized float weights (no packed storage)"),
    arg("--eval-data", default="austen:eval"), arg("--eval-tokens", type=int, default=16384),
    arg("--seq-len", type=int, default=256), arg("--batch-size", type=int, default=8),
    arg("--no-eval", action="store_true", help="skip perplexity before/after"),
    arg("--out", required=True, help="output folder"), OVERWRITE, QUIET])
def quantize_cmd(args: argparse.Namespace) -> int:
    out = check_output(args.out, args.overwrite, protect={"--model": args.model, "--scores": args.scores,
                                                          "--data": args.data, "--eval-data": args.eval_data})
    legacy = args.format == "quanto"  # the optimum-quanto grid (packed, or --fake)
    method = args.method or ("gptq" if args.data else "rtn")
    if legacy and method == "gptq":
        raise ImpruneError("--format quanto stores round-to-nearest weights only; use --format compressed-tensors "
                           "(or --fake) for GPTQ, or --method rtn")
    choices = parse_choices(args.choices, SUPPORTED_BITS if legacy else GPTQ_BITS)
    check_budget(args.budget, choices)
    positive(args.group_size, "--group-size")
    positive(args.eval_tokens, "--eval-tokens")
    positive(args.tokens, "--tokens")
    positive(args.batch_size, "--batch-size")
    nm = parse_nm(args.nm)
    act_order = nm is None if args.act_order is None else args.act_order
    cfg = GPTQConfig(method, args.sym, args.blocksize, args.damp, act_order, args.sparsity, nm, observer=args.observer)
    cfg.validate()
    if method == "gptq" and not args.data:
        raise ImpruneError("--method gptq needs calibration data: pass --data (e.g. austen:train)")
    if args.quantize_embeddings is not None:
        if legacy and not args.fake:
            raise ImpruneError("--quantize-embeddings needs --format compressed-tensors (or --fake): optimum-quanto "
                               "does not store embeddings")
        if args.quantize_embeddings not in GPTQ_BITS:
            raise ImpruneError(f"--quantize-embeddings {args.quantize_embeddings}: unsupported width; use one of "
                               f"{', '.join(map(str, GPTQ_BITS))}")
    keep = parse_keep(args.keep)
    table = ImportanceTable.load(args.scores) if args.scores else None
    lm = load_model(args.model, dtype="float32", device=args.device, trust_remote_code=args.trust_remote_code,
                    allow_pickle=args.allow_pickle)
    if table is not None:
        check_table(table, lm, f"--scores {args.scores}")
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    calib = load_data(args.data, lm.tokenizer, seq_len=args.seq_len, tokens=args.tokens, seed=args.seed,
                      max_positions=limit, flags=("--tokens", "--seq-len")) if args.data else None
    supported = SUPPORTED_BITS if legacy else GPTQ_BITS
    if args.random_seed is not None:
        plan = random_plan(lm.model, args.budget, choices, args.random_seed, keep, args.group_size, not args.fake,
                           supported)
    elif calib is not None and not legacy:
        plan = plan_gptq(lm.model, table, args.budget, choices, calib, cfg, keep, args.group_size, not args.fake,
                         args.batch_size, not args.quiet)
    else:
        plan = plan_bits(lm.model, table, args.budget, choices, args.sensitivity, keep, args.group_size,
                         linear_only=not args.fake, supported=supported)
    evaluate = not args.no_eval and lm.task in ("causal-lm", "masked-lm")
    windows = load_data(args.eval_data, lm.tokenizer, seq_len=args.seq_len, tokens=args.eval_tokens,
                        sampling="sequential", max_positions=limit, flags=("--eval-tokens", "--seq-len")) \
        if evaluate else None
    ppl = (lambda: perplexity(lm.model, windows, lm.task, args.batch_size, progress=not args.quiet)) if windows \
        else (lambda: None)
    fp32 = float32_bytes(lm.model)
    before = ppl()
    start = time.perf_counter()
    quantized, embeds = None, None
    if args.quantize_embeddings is not None:  # first: the blocks are then calibrated on the rounded embedding
        embeds = quantize_embeddings_(lm.model, args.quantize_embeddings, cfg.sym, args.group_size)
    if legacy:
        (fake_quantize_model_ if args.fake else quantize_model_)(lm.model, plan)
    else:
        quantized = quantize_model_gptq_(lm.model, plan, calib, cfg, args.batch_size, progress=not args.quiet)
    seconds = time.perf_counter() - start
    after = ppl()
    stored = weight_bytes(lm.model) if quantized is None else packed_bytes(lm.model, plan, quantized, embeds)
    record = {"method": "quantize", "quantizer": method if not legacy else "rtn (optimum-quanto grid)",
              "budget": args.budget, "format": "fake-quant" if args.fake else args.format,
              "grid": {"symmetric": cfg.sym, "act_order": cfg.act_order, "damp": cfg.damp,
                       "observer": None if legacy else cfg.observer,
                       "joint": {"sparsity": cfg.sparsity, "nm": cfg.nm}},
              "calibration": dict(calib.meta) if calib is not None else None, "quantize_seconds": round(seconds, 1),
              "memory": {"bytes": stored, "float32_bytes": fp32, "ratio": stored / fp32},
              "perplexity": {"before": before.to_dict() if before else None,
                             "after": after.to_dict() if after else None},
              "scores": str(Path(args.scores).resolve()) if args.scores else None,
              "embeddings": None if embeds is None else {
                  "bits": args.quantize_embeddings, "method": "rtn",
                  "modules": {t.name: {"format": t.fmt, "tied_to": t.tied_to,
                                       "group_size": embeds[1][t.name].spec.group_size} for t in embeds[0]}}}
    figure = {"bits.png": figure_png(plan, table)}
    if args.fake:
        from pruning.io import save_model

        save_model(lm, out, {**record, **plan.to_json()}, overwrite=args.overwrite, files=figure)
    elif legacy:
        save_quantized(lm, out, plan, record, overwrite=args.overwrite, files=figure)
    else:
        save_compressed_tensors(lm, out, plan, quantized, record, overwrite=args.overwrite, files=figure,
                                embeddings=embeds)
    if before and after:
        print(f"perplexity {before.ppl:.2f} -> {after.ppl:.2f} ({after.windows} x {after.seq_len} tokens, "
              f"{after.predicted} predicted; {after.data})")
    counts = {b: sum(1 for v in plan.bits.values() if v == b) for b in plan.choices}
    print(f"{len(plan.units)} modules at {', '.join(f'{n} x {b}-bit' for b, n in counts.items())}: average "
          f"{plan.average_bits():.3f} bits (budget {args.budget}, solver {plan.solver}; {method} in {seconds:.0f} s); "
          f"weights {stored:,} bytes = {stored / fp32:.3f}x of float32 "
          f"({'fake-quant: float storage' if args.fake else args.format}); wrote {out}")
    if plan.errors:
        print(f"estimate: {plan.sensitivity}")
    return 0


def figure_png(plan: BitPlan, table: ImportanceTable | None) -> bytes:
    """The bits map beside the importance it came from (``importance.viz.heatmap``), as PNG bytes, drawn before
    anything is written."""
    from importance.viz.heatmap import figure_bytes, layer_map_figure, plan_scorer

    scorer = plan_scorer({"sensitivity": plan.sensitivity}, table) if table is not None else None
    fig = layer_map_figure(plan.layer_map(), "bits", table, scorer=scorer, log=True,
                           title=f"bits per layer x component (average {plan.average_bits():.2f}, budget "
                                 f"{plan.budget:g}; {plan.solver})")
    return figure_bytes(fig)
