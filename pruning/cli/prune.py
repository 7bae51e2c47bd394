"""``imprune prune``: any registered pruning method, with evaluation before/after and a reloadable folder."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from importance.data.sources import Windows, load_data
from importance.errors import ImpruneError
from importance.models.identity import check_table
from importance.models.load import load_model
from importance.table import ImportanceTable
from pruning.cli.core import (
    ALLOW_PICKLE,
    DEVICE,
    DTYPE,
    MAX_MEMORY,
    MODEL,
    OVERWRITE,
    QUIET,
    SEED,
    TRUST,
    Arg,
    arg,
    check_output,
    command,
    positive,
)
from pruning.eval.perplexity import perplexity
from pruning.methods.checks import check_step
from pruning.methods.registry import METHODS, PruneContext, load_methods, method_sparsity


def _method_args() -> list[Arg]:
    load_methods()
    seen: dict[str, Arg] = {}
    for method in METHODS.values():
        for flags, kwargs in method.args:
            seen.setdefault(flags[0], (flags, kwargs))
    return list(seen.values())


def _prune_args() -> list[Arg]:
    return [MODEL, DTYPE, DEVICE, MAX_MEMORY, TRUST, ALLOW_PICKLE,
            arg("--method", required=True, help="pruning method (see the list in --help)"),
            arg("--sparsity", type=float, default=None,
                help="fraction to remove, in [0, 1) (--method nm: taken from --nm N:M when not given)"),
            arg("--scores", default=None, help="importance table folder from `imprune score`"),
            arg("--data", default="austen:train", help="calibration data"),
            arg("--tokens", type=int, default=8192), arg("--seq-len", type=int, default=256), SEED,
            arg("--batch-size", type=int, default=4),
            arg("--eval-data", default="austen:eval"), arg("--eval-tokens", type=int, default=16384),
            arg("--no-eval", action="store_true", help="skip perplexity before/after"),
            arg("--out", required=True, help="output folder for the pruned model"), OVERWRITE, QUIET,
            *_method_args()]


@command("prune", "prune a model by importance: unstructured, N:M, heads, channels, width, layers, blocks",
         _prune_args())
def prune_cmd(args: argparse.Namespace) -> int:
    load_methods()
    if args.method not in METHODS:
        raise ImpruneError(f"unknown method '{args.method}'; use one of {', '.join(METHODS)}")
    for flag in ("batch_size", "tokens", "eval_tokens", "seq_len"):
        positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    args.sparsity = method_sparsity(args.method, args.sparsity, getattr(args, "nm", None))
    if not 0.0 <= args.sparsity < 1.0:
        raise ImpruneError(f"--sparsity {args.sparsity} is outside [0, 1); give the fraction to remove, e.g. 0.5")
    method = METHODS[args.method]
    if args.max_memory and not method.offload:
        offloadable = ", ".join(m.name for m in METHODS.values() if m.offload)
        raise ImpruneError(f"--method {args.method} changes shapes and needs the whole model in memory; --max-memory "
                           f"works with --method {offloadable} (weights change in place), or drop --max-memory")
    out = check_output(args.out, args.overwrite, protect={"--model": args.model, "--scores": args.scores,
                                                          "--data": args.data, "--eval-data": args.eval_data})
    table = ImportanceTable.load(args.scores) if args.scores else None
    lm = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                    max_memory=args.max_memory, allow_pickle=args.allow_pickle)
    if table is not None:
        check_table(table, lm, f"--scores {args.scores}")
    if method.needs_table and table is None:
        raise ImpruneError(f"--method {args.method} needs an importance table: run `imprune score ... --out DIR` "
                           "and pass --scores DIR")
    from importance.arch.canonical import model_map

    check_step(model_map(lm.model), args.method, args)  # reachable sparsity, criteria, N:M: before any work
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    cache: dict[str, Windows] = {}

    def calibration() -> Windows:
        if "w" not in cache:
            cache["w"] = load_data(args.data, lm.tokenizer, seq_len=args.seq_len, tokens=args.tokens, seed=args.seed,
                                   max_positions=limit)
        return cache["w"]

    evaluate = not args.no_eval and lm.task in ("causal-lm", "masked-lm")
    eval_windows = load_data(args.eval_data, lm.tokenizer, seq_len=args.seq_len, tokens=args.eval_tokens,
                             sampling="sequential", max_positions=limit, flags=("--eval-tokens", "--seq-len")) \
        if evaluate else None
    params_before = sum(p.numel() for p in lm.model.parameters())
    before = perplexity(lm.model, eval_windows, lm.task, progress=not args.quiet) if eval_windows else None
    start = time.perf_counter()
    result = method.fn(PruneContext(lm, args, table, calibration))
    seconds = time.perf_counter() - start
    after = perplexity(lm.model, eval_windows, lm.task, progress=not args.quiet) if eval_windows else None
    params_after = sum(p.numel() for p in lm.model.parameters())
    record = {"method": args.method, "sparsity_target": args.sparsity, **result.record,
              "sparsity": {str(k): v for k, v in result.sparsity.items()},
              "params": {"before": params_before, "after": params_after},
              "perplexity": {"before": before.to_dict() if before else None,
                             "after": after.to_dict() if after else None},
              "calibration": dict(cache["w"].meta) if "w" in cache else None,
              "scores": str(Path(args.scores).resolve()) if args.scores else None,
              "prune_seconds": round(seconds, 2), "shapes_changed": result.shapes_changed, "uniform": result.uniform}
    from pruning.io import save_model

    save_model(lm, out, record, overwrite=args.overwrite)
    if before and after:
        print(f"perplexity {before.ppl:.2f} -> {after.ppl:.2f} ({after.windows} x {after.seq_len} tokens, "
              f"{after.predicted} predicted; {after.data})")
    print(f"params {params_before:,} -> {params_after:,}; pruned in {seconds:.1f} s; wrote {out}")
    return 0
