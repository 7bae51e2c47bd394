"""``imprune heal``: recover what pruning cost, by distillation from the original model (``pruning.heal``)."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

from importance.data.sources import load_data
from importance.errors import ImpruneError
from importance.models.identity import read_record
from importance.models.load import load_model
from importance.store.fingerprint import data_fingerprint, model_fingerprint
from pruning.cli.core import (
    ALLOW_PICKLE,
    DEVICE,
    DTYPE,
    OVERWRITE,
    QUIET,
    SEED,
    SEQ_LEN,
    TRUST,
    arg,
    check_output,
    command,
    positive,
)
from pruning.heal.config import HEAL_ARGS, heal_config


@command("heal", "recover a pruned model by distillation from the original (LoRA or full, sparsity kept)", [
    arg("--model", required=True, help="the pruned model folder (what `imprune prune` or `imprune run` wrote)"),
    arg("--teacher", default=None,
        help="the original model (default: the source model named in --model's imprune.json); not needed for "
             "--loss lm with --placement uniform"),
    DTYPE, DEVICE, TRUST, ALLOW_PICKLE,
    arg("--data", default="austen:train", help="training text (never the evaluation text)"), SEQ_LEN, SEED,
    arg("--eval-data", default="austen:eval"), arg("--eval-tokens", type=int, default=16384),
    arg("--no-eval", action="store_true", help="skip perplexity before / after"),
    *HEAL_ARGS,
    arg("--out", required=True, help="output folder for the healed model"), OVERWRITE, QUIET])
def heal_cmd(args: argparse.Namespace) -> int:
    from pruning.eval.perplexity import perplexity
    from pruning.heal.job import prepare
    from pruning.heal.lineage import check_record, check_student

    positive(args.eval_tokens, "--eval-tokens")
    cfg = heal_config(args, args.seq_len, args.seed, progress=not args.quiet)
    record = read_record(args.model) if Path(args.model).expanduser().is_dir() else None
    check_record(args.model, record)
    teacher_spec = args.teacher or (record or {}).get("source_model", {}).get("spec")
    needs_teacher = cfg.loss != "lm" or cfg.placement == "importance"
    if needs_teacher and not teacher_spec:
        raise ImpruneError(f"--model {args.model} names no source model; pass --teacher (the model it was pruned "
                           "from), or use --loss lm --placement uniform")
    out = check_output(args.out, args.overwrite, protect={"--model": args.model, "--teacher": teacher_spec,
                                                          "--data": args.data, "--eval-data": args.eval_data})
    student = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                         allow_pickle=args.allow_pickle)
    check_student(student, record)
    teacher = load_model(teacher_spec, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                         allow_pickle=args.allow_pickle) if teacher_spec and (needs_teacher or args.teacher) else None
    job = prepare(student, teacher, record, args.data, cfg, args.seq_len, args.seed)
    limit = getattr(student.model.config, "max_position_embeddings", None)
    held = load_data(args.eval_data, student.tokenizer, seq_len=args.seq_len, tokens=args.eval_tokens,
                     sampling="sequential", max_positions=limit, flags=("--eval-tokens", "--seq-len")) \
        if not args.no_eval else None
    ckpt = _checkpoint_dir(out, args, teacher_spec, cfg.key_settings())
    before = perplexity(student.model, held, student.task, progress=not args.quiet) if held else None
    result = job.run(ckpt)
    after = perplexity(student.model, held, student.task, progress=not args.quiet) if held else None
    ppl = {"pruned": before.to_dict(), "healed": after.to_dict()} if before and after else None
    job.save(result, out, teacher=teacher_spec, perplexity=ppl, overwrite=args.overwrite)
    _remove_checkpoints(out)
    if before and after:
        print(f"perplexity {before.ppl:.2f} -> {after.ppl:.2f} after healing ({after.windows} x {after.seq_len} "
              f"tokens of {after.data})")
    print(f"healed in {result.seconds:.0f} s: {result.steps} steps, {result.tokens:,} tokens, {result.trainable:,} "
          f"trainable parameters ({result.kind}); wrote {out}")
    return 0


def _remove_checkpoints(out: Path) -> None:
    """Once ``out`` is complete, every heal checkpoint kept for it goes: this heal's, and those of heals of
    other settings that were interrupted (only folders holding imprune's own checkpoint files)."""
    from pruning.heal.train import CHECKPOINT_SCHEMA

    for folder in out.parent.glob(f".{out.name}.heal-*"):
        try:
            ours = json.loads((folder / "state.json").read_text()).get("schema") == CHECKPOINT_SCHEMA
        except (OSError, ValueError, AttributeError):
            ours = False
        if ours and folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)


def _checkpoint_dir(out: Path, args: argparse.Namespace, teacher: str | None, settings: dict) -> Path:
    """A hidden sibling of ``--out`` named by the digest of everything the heal depends on: a rerun of the same
    command resumes there, another heal never reads it."""
    key = {"model": model_fingerprint(args.model), "teacher": model_fingerprint(teacher) if teacher else None,
           "data": data_fingerprint(args.data), "settings": settings, "dtype": args.dtype}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return out.parent / f".{out.name}.heal-{digest}"
