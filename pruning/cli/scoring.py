"""``imprune info`` and ``imprune eval``: what a model is made of, and how well it predicts text."""

from __future__ import annotations

import argparse
import json
import os

from importance.arch.canonical import model_map
from importance.data.sources import load_data
from importance.errors import ImpruneError
from importance.models.load import load_model
from importance.scorers import MEASURED, SCORERS, layer_only
from importance.scoring import DEFAULT_SCORERS, REMOVAL_TOKENS
from importance.store.meta import versions, write_json
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
    arg,
    check_output,
    command,
    positive,
)
from pruning.eval.perplexity import perplexity

PROBE_LIMIT = 128  # probe items per task when --limit is not given


def _load(args: argparse.Namespace):
    return load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                      max_memory=getattr(args, "max_memory", None), allow_pickle=args.allow_pickle)


def _max_positions(model) -> int | None:
    cfg = model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


@command("info", "print the canonical component map of a model", [MODEL, DTYPE, DEVICE, TRUST, ALLOW_PICKLE,
         arg("--json", action="store_true", help="print the map as JSON")])
def info(args: argparse.Namespace) -> int:
    lm = _load(args)
    mm = model_map(lm.model)
    total = sum(p.numel() for p in lm.model.parameters())
    in_blocks = sum(p.numel() for b in mm.blocks for p in b.module.parameters())
    b0 = next((b for b in mm.blocks if not b.skipped), mm.blocks[0])  # geometry of a block with both sub-blocks
    # hybrids (blocks without attention) and MoE models with dense layers first: the first block that has it
    ba, bm, be = (next((b for b in mm.blocks if has(b)), b0) for has in (
        lambda b: b.n_heads, lambda b: b.intermediate, lambda b: b.n_experts))
    attn_layers = sum(1 for b in mm.blocks if b.n_heads)
    skipped = [f"L{b.index} {k}" for b in mm.blocks for k in b.skipped]
    doc = {"model": lm.describe(), "model_class": type(lm.model).__name__, "blocks": mm.blocks_path,
           "layers": mm.n_layers, "heads": ba.n_heads, "kv_heads": ba.n_kv_heads, "head_dim": ba.head_dim,
           "attention_layers": attn_layers,
           "intermediate": bm.intermediate, "experts": be.n_experts, "discovered": mm.discovered,
           "params_total": total, "params_in_blocks": in_blocks, "components": mm.summary(),
           "sub_blocks_removed": skipped}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"model      {lm.spec}  ({doc['model_class']}, model_type {mm.model_type}, {lm.task})")
    for note in lm.notes:
        print(f"note       {note}")
    print(f"blocks     {mm.blocks_path} x {mm.n_layers}" + ("  [discovered, not registered]" if mm.discovered else ""))
    hybrid = f" (in {attn_layers} of {mm.n_layers} blocks)" if attn_layers < mm.n_layers - len(skipped) else ""
    print(f"attention  {ba.n_heads} heads / {ba.n_kv_heads} KV heads, head_dim {ba.head_dim}{hybrid}")
    if be.n_experts:
        print(f"experts    {be.n_experts} per MoE layer")
    if bm.intermediate:
        print(f"mlp        intermediate {bm.intermediate}")
    if skipped:
        print(f"removed    {len(skipped)} sub-blocks: {', '.join(skipped)}")
    print(f"params     {total:,} total, {in_blocks:,} in blocks ({100 * in_blocks / total:.1f}%)")
    print(f"\n{'component':<18} {'shape':<16} {'layers':>6} {'params':>13}  path")
    for row in doc["components"]:
        shape = "x".join(str(s) for s in row["shape"])
        print(f"{row['component']:<18} {shape:<16} {row['layers']:>6} {row['params']:>13,}  {row['path']}")
    return 0


@command("eval", "perplexity on non-overlapping windows (shared/protocol.md), or accuracy with --tasks", [
    MODEL, DTYPE, DEVICE, MAX_MEMORY, TRUST, ALLOW_PICKLE,
    arg("--data", default="austen:eval", help="data spec (default: Persuasion)"),
    arg("--seq-len", type=int, default=256, help="window length"),
    arg("--tokens", type=int, default=16384, help="evaluate the first N tokens (whole windows)"),
    arg("--tasks", default=None, help="accuracy instead of perplexity: 'probes' (the eight built-in probes), probe "
        "names, and/or lm-eval task names (needs the eval extra), comma-separated"),
    arg("--limit", type=int, default=None, help=f"items per task (probes default {PROBE_LIMIT}; lm-eval: all)"),
    arg("--num-fewshot", type=int, default=None, help="lm-eval few-shot examples (default: the task's own)"),
    arg("--include-path", default=None, help="a folder of lm-eval task YAMLs (custom tasks)"),
    arg("--batch-size", type=int, default=8), arg("--out", default=None, help="write metrics JSON here"),
    OVERWRITE, QUIET, SEED])
def evaluate(args: argparse.Namespace) -> int:
    positive(args.batch_size, "--batch-size")
    if args.tasks is None:
        for flag in ("limit", "num_fewshot", "include_path"):
            if getattr(args, flag) is not None:
                raise ImpruneError(f"--{flag.replace('_', '-')} applies to accuracy tasks; add --tasks")
    else:
        positive(args.limit, "--limit")
        if args.num_fewshot is not None and args.num_fewshot < 0:
            raise ImpruneError(f"--num-fewshot must be 0 or more, got {args.num_fewshot}")
    out = check_output(args.out, args.overwrite, kind="file", protect={"--model": args.model, "--data": args.data}) \
        if args.out else None
    if args.tasks is not None:
        return _eval_tasks(args, out)
    lm = _load(args)
    windows = load_data(args.data, lm.tokenizer, seq_len=args.seq_len, tokens=args.tokens, seed=args.seed,
                        sampling="sequential", max_positions=_max_positions(lm.model))
    result = perplexity(lm.model, windows, lm.task, batch_size=args.batch_size, progress=not args.quiet)
    bos = bool(windows.meta.get("bos"))
    print(result.line() + ("; each window starts with the tokenizer's BOS (not a target)" if bos else ""))
    if out is not None:
        write_json(out, {"model": lm.describe(), "perplexity": result.to_dict(),
                         "window": {"seq_len": windows.seq_len, "windows": len(windows),
                                    "tokens": windows.n_tokens, "sampling": "sequential", "bos": bos},
                         "versions": versions()})
        print(f"wrote {out}")
    return 0


def _eval_tasks(args: argparse.Namespace, out) -> int:
    """``imprune eval --tasks``: the probes here, other names through lm-eval, one table, one JSON."""
    from pruning.eval.tasks import probe_accuracy, probe_names, table

    probes, others = probe_names(args.tasks)
    manager = None
    if others:  # unknown names and a missing extra fail before the model loads
        from pruning.eval.harness import task_manager

        manager = task_manager(others, args.include_path)
    elif args.include_path is not None or args.num_fewshot is not None:
        raise ImpruneError("--include-path and --num-fewshot apply to lm-eval tasks; the probes are zero-shot")
    lm = _load(args)
    rows = probe_accuracy(lm, probes, args.limit or PROBE_LIMIT, args.seed, args.batch_size,
                          progress=not args.quiet) if probes else []
    raw: dict = {}
    if others:
        from pruning.eval.harness import harness

        more, res = harness(lm, others, args.limit, args.num_fewshot, args.batch_size, seed=args.seed,
                            manager=manager, progress=not args.quiet)
        rows += more
        raw = json.loads(json.dumps({k: res.get(k) for k in ("results", "n-shot", "configs")}, default=str))
    print(table(rows))
    if out is not None:
        write_json(out, {"model": lm.describe(), "tasks": [r.to_dict() for r in rows],
                         "settings": {"tasks": args.tasks, "limit": args.limit or (PROBE_LIMIT if probes else None),
                                      "num_fewshot": args.num_fewshot, "seed": args.seed,
                                      "batch_size": args.batch_size},
                         "metric": "acc: highest summed log-likelihood; acc_norm: per character", "lm_eval": raw,
                         "versions": versions()})
        print(f"wrote {out}")
    return 0


@command("score", "score every parameter group with all scorers in one pass -> an importance table", [
    MODEL, DTYPE, DEVICE, MAX_MEMORY, TRUST, ALLOW_PICKLE,
    arg("--data", default="austen:train", help="calibration data spec"),
    arg("--scorers", default=",".join(DEFAULT_SCORERS),
        help="comma-separated: " + ", ".join(SCORERS)
        + " (removal / head_removal measure layer / head removal: not defaults)"),
    arg("--seq-len", type=int, default=256), arg("--tokens", type=int, default=8192),
    arg("--samples", type=int, default=None), SEED, arg("--batch-size", type=int, default=4),
    arg("--elements", action="store_true", help="also keep per-weight tensors (the size of the model)"),
    arg("--fisher-unit", default="sequence", choices=["sequence", "batch"]),
    arg("--removal-tokens", type=int, default=REMOVAL_TOKENS,
        help="calibration tokens the removal scorers measure on (whole windows; default %(default)s)"),
    arg("--obd", action="store_true", help="element Fisher as the OBD saliency w^2 F / 2"),
    arg("--blockwise", action="store_true",
        help="forward-only scorers block by block over kept hidden states (with --max-memory: ~one block resident)"),
    arg("--processes", type=int, default=1,
        help="score data-parallel in N processes (accelerate launch; equals `accelerate launch -m pruning score`)"),
    arg("--out", required=True, help="output folder for the table"), OVERWRITE, QUIET])
def score_cmd(args: argparse.Namespace) -> int:
    from importance.engine.distributed import launched, process_state
    from importance.scoring import parse_scorers, score

    names = parse_scorers(args.scorers)
    positive(args.batch_size, "--batch-size")
    positive(args.processes, "--processes")
    out = check_output(args.out, args.overwrite, protect={"--model": args.model, "--data": args.data})
    if args.processes > 1 and not launched():
        _check_processes(args, names)
        return _relaunch(args)
    state = process_state()
    if state is not None and state.device.type != "cpu":
        args.device = str(state.device)  # one accelerator per process
    lm = _load(args)
    windows = load_data(args.data, lm.tokenizer, seq_len=args.seq_len, tokens=args.tokens, samples=args.samples,
                        seed=args.seed, max_positions=_max_positions(lm.model))
    table = score(lm, windows, names, seed=args.seed, batch_size=args.batch_size, elements=args.elements,
                  fisher_unit=args.fisher_unit, obd=args.obd, blockwise=args.blockwise,
                  removal_tokens=args.removal_tokens, progress=not args.quiet)
    if state is not None and not state.is_main_process:
        return 0  # every process holds the same table; only the main one writes it
    table.save(out, overwrite=args.overwrite)
    counts = table.meta["counts"]
    print(f"scored {lm.spec} on {args.data}: {len(windows)} windows x {windows.seq_len} tokens "
          f"({int(counts.get('tokens', 0))} tokens) in {table.meta['seconds']:.1f} s -> {out}")
    print_ranking(table)
    return 0


def _check_processes(args: argparse.Namespace, names: list[str]) -> None:
    """Refuse a --processes count the machine or the data cannot take, before anything is launched: first
    what the flags alone tell (cores, an upper bound of the batches), then the exact batches and the memory per
    worker from one load of the model and the data here (freed again before the workers start)."""
    import gc

    from importance.engine.distributed import check_processes
    from importance.scoring import removal_windows

    positive(args.tokens, "--tokens")
    positive(args.seq_len, "--seq-len")
    more = "more calibration data (--data, --tokens) or a smaller --batch-size"
    bound = [n for n in (args.tokens // args.seq_len if args.tokens else None, args.samples) if n is not None]
    check_processes(args.processes, {f"calibration batch(es) of --batch-size {args.batch_size} (at most "
                                     f"{min(bound)} windows)": (-(-min(bound) // args.batch_size), more)}
                    if bound else None)
    lm = load_model(args.model, dtype=args.dtype, device="cpu", trust_remote_code=args.trust_remote_code,
                    max_memory=args.max_memory if args.device == "cpu" else None, allow_pickle=args.allow_pickle)
    windows = load_data(args.data, lm.tokenizer, seq_len=args.seq_len, tokens=args.tokens, samples=args.samples,
                        seed=args.seed, max_positions=_max_positions(lm.model))
    batches = {f"calibration batch(es) of --batch-size {args.batch_size} ({len(windows)} windows of "
               f"{windows.seq_len} tokens)": (-(-len(windows) // args.batch_size), more)}
    if any(n in MEASURED for n in names):
        removal = removal_windows(windows, args.removal_tokens)
        batches[f"removal batch(es) ({len(removal)} windows: --removal-tokens {args.removal_tokens})"] = (
            -(-len(removal) // args.batch_size), "more --removal-tokens")
    seen: set[int] = set()
    weights = sum(p.numel() * p.element_size() for p in lm.model.parameters()
                  if p.device.type != "meta" and not (p.data_ptr() in seen or seen.add(p.data_ptr())))
    del lm, windows
    gc.collect()
    check_processes(args.processes, batches, weights)


def _relaunch(args: argparse.Namespace) -> int:
    """Run this same command in ``--processes`` processes through ``accelerate launch``."""
    import subprocess

    from importance.engine.distributed import launch_command

    argv, skip = [], False
    for a in args.argv:  # drop --processes N / --processes=N
        if skip or a.startswith("--processes"):
            skip = a == "--processes" and not skip
            continue
        argv.append(a)
    cmd = launch_command(argv, args.processes)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2)
                                                                                       // args.processes))))
    return subprocess.run(cmd, env=env).returncode


def print_ranking(table, k: int = 3) -> None:
    """Most and least important components and heads per scorer (mean per weight), layers by influence."""
    for scorer in table.scorers:
        for gran in ("component", "head"):
            if not table.has(scorer, gran):
                continue
            top, bottom = table.ranking(scorer, gran, "mean", k, skip_norms=True)
            fmt = lambda xs: ", ".join(label for label, _ in xs)  # noqa: E731
            print(f"  {scorer:<15} {gran:<9} most: {fmt(top):<40} least: {fmt(bottom)}")
        if layer_only(scorer):
            top, bottom = table.ranking(scorer, "layer", "sum", k)
            print(f"  {scorer:<15} layer     most: {', '.join(x for x, _ in top):<40} "
                  f"least: {', '.join(x for x, _ in bottom)}")
