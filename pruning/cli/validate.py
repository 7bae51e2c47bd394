"""``imprune validate``: measure every group's true loss increase by ablation, and how well each scorer predicts it.

    imprune validate --model M --scores DIR --granularity head|kv_group|component|layer [--data D] [--out DIR]

``--scores DIR`` is an importance table folder; when it does not exist yet the model is scored on ``--data``
first (``--tokens`` calibration tokens) and the table is written there. The ground truth
(``importance.validate.ablation``) is measured on held-out windows (``--eval-data``, default ``austen:eval``; a seeded
random draw of ``--eval-tokens`` tokens in windows of ``--eval-seq-len``), at the chosen granularity and always
also per layer. Output folder (default ``DIR/validation``), written atomically:

  ablation/               an ImportanceTable with the pseudo-scorer ``ablation`` (``ablation/<granularity>`` and
                          ``ablation/layer``), readable by every table tool and heatmap
  validation.json         settings, baseline, timings and the agreement of every scorer (schema below)
  scatter_<g>.png         predicted vs measured for the granularity and for layers (``scatter_layer.png``)
  ablation_heatmap.png    the ablation beside the scorers in the table's layout (rank percentiles)

validation.json (``"schema": "imprune.validation/1"``):
  model            ``LoadedModel.describe()`` of the validated model
  scores           {"path": table folder, "data": the table's calibration meta, "scorers": [...]}
  ground_truth     {"definition", "base_nll", "eval": {data, seq_len, windows, tokens, seed, sampling},
                    "predicted_tokens", "shortcut": bool, "shortcut_reason", "groups": {gran: count},
                    "seconds": {gran: s}, "top": {gran: [[label, dnll], ...]} (five largest increases),
                    "reliability": {gran: {"split_half", "full_set", "ceiling", "windows"} or null}
                    (``Ablation.reliability``: the measurement's agreement with itself across two halves of the
                    held-out windows; ``ceiling`` ~ the best Spearman any scorer can reach against it)}
  granularities    {gran: {"n", "best", "bottom_fraction", "scorers": {scorer: {"spearman", "kendall",
                    "bottom_overlap", "n"}}}} for the chosen granularity and "layer"
  aggregation      "sum" (a group's predicted value is the scorer's sum over the group)
  figures          {"scatter_<g>": file, "scatter_layer": file, "ablation_heatmap": file}
  ablation_table   "ablation" (the sub-folder)
  versions         library versions
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from importance.arch.canonical import model_map
from importance.data.sources import load_data
from importance.engine.objective import has_loss
from importance.errors import ImpruneError
from importance.models.identity import check_table
from importance.store.meta import versions
from importance.table import ImportanceTable
from importance.validate.ablation import DEFINITION, ablation_table, measure_ablation
from importance.validate.faithfulness import BOTTOM_FRACTION, compare
from importance.validate.folder import SCHEMA, VALIDATION_DIR, format_agreement, top_groups, write_validation
from pruning.cli.core import (
    ALLOW_PICKLE,
    BATCH,
    DEVICE,
    DTYPE,
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
from pruning.cli.scoring import _load, _max_positions


@command("validate", "measure each group's loss increase when removed and how well every scorer predicts it", [
    MODEL, DTYPE, DEVICE, TRUST, ALLOW_PICKLE,
    arg("--scores", required=True, help="importance table folder (scored now on --data when it does not exist)"),
    arg("--data", default="austen:train", help="calibration data, used only to score a missing --scores table"),
    arg("--tokens", type=int, default=8192, help="calibration tokens when scoring"),
    arg("--seq-len", type=int, default=256, help="calibration window length when scoring"),
    arg("--granularity", default="head", choices=["head", "kv_group", "component", "layer"],
        help="groups to ablate one by one (layers are always measured too)"),
    arg("--eval-data", default="austen:eval", help="held-out data for the measured loss (default: Persuasion)"),
    arg("--eval-tokens", type=int, default=1024, help="held-out tokens (whole windows, seeded random draw)"),
    arg("--eval-seq-len", type=int, default=256, help="held-out window length"),
    arg("--bottom", type=float, default=BOTTOM_FRACTION, help="fraction a pruner would remove (overlap metric)"),
    arg("--no-shortcut", action="store_true", help="a full forward per ablation instead of the cached inputs"),
    SEED, BATCH, arg("--out", default=None, help="output folder (default: SCORES/validation)"), OVERWRITE, QUIET])
def validate_cmd(args: argparse.Namespace) -> int:
    positive(args.batch_size, "--batch-size")
    positive(args.eval_tokens, "--eval-tokens")
    if not 0 < args.bottom <= 1:
        raise ImpruneError(f"--bottom must be in (0, 1], got {args.bottom}")
    scores_dir = Path(args.scores).expanduser()
    if scores_dir.exists() and not scores_dir.is_dir():
        raise ImpruneError(f"--scores '{scores_dir}' is a file, not an importance table folder; give a table folder "
                           "(from `imprune score --out DIR`) or a path that does not exist yet")
    inputs = {"--model": args.model, "--scores": scores_dir, "--data": args.data, "--eval-data": args.eval_data}
    out = check_output(args.out or scores_dir / VALIDATION_DIR, args.overwrite, protect=inputs)
    if not scores_dir.exists():
        check_output(scores_dir, False, flag="--scores")  # scored and written there: writable before any work
    if scores_dir.exists() and not any((scores_dir / n).is_file() for n in ("table.json", "table.safetensors")):
        raise ImpruneError(f"'{scores_dir}' exists but is not an importance table folder; give a table folder "
                           "(from `imprune score --out DIR`) or a path that does not exist yet")
    given = ImportanceTable.load(scores_dir) if scores_dir.exists() else None  # a damaged table stops here
    lm = _load(args)
    if not has_loss(lm.task):
        raise ImpruneError(f"--model {lm.spec} has no language-model head, so there is no loss to measure an "
                           "ablation with; validate a causal or masked language model")
    mm = model_map(lm.model)
    table = given if given is not None else _scores(args, lm, scores_dir)
    check_table(table, lm, f"--scores {scores_dir}", mm=mm,
                fix="validate the model the table was scored on, or give --scores a new folder to score this one")
    windows = load_data(args.eval_data, lm.tokenizer, seq_len=args.eval_seq_len, tokens=args.eval_tokens,
                        seed=args.seed, sampling="random", max_positions=_max_positions(lm.model),
                        flags=("--eval-tokens", "--eval-seq-len"))
    grans = tuple(dict.fromkeys((args.granularity, "layer")))
    result = measure_ablation(lm.model, windows, lm.task, grans, batch_size=args.batch_size,
                              shortcut=not args.no_shortcut, progress=not args.quiet, mm=mm)
    truth = ablation_table(result, mm, meta={"model": lm.describe(), "data": dict(windows.meta), "seed": args.seed,
                                             "versions": versions()})
    agreement = {g: compare(table, truth, g, fraction=args.bottom) for g in grans}
    doc = {
        "schema": SCHEMA, "model": lm.describe(),
        "scores": {"path": str(scores_dir), "data": table.meta.get("data", {}), "scorers": table.scorers},
        "ground_truth": {
            "definition": DEFINITION, "base_nll": result.base_nll, "eval": dict(windows.meta),
            "predicted_tokens": result.tokens, "shortcut": result.shortcut, "shortcut_reason": result.reason,
            "groups": {g: len(result.groups[g]) for g in grans},
            "seconds": {g: round(s, 2) for g, s in result.seconds.items()},
            "top": {g: top_groups(result, g) for g in grans},
            "reliability": {g: result.reliability(g) for g in grans}},
        "granularities": agreement, "aggregation": "sum",
        "figures": {**{f"scatter_{g}": f"scatter_{g}.png" for g in grans}, "ablation_heatmap": "ablation_heatmap.png"},
        "ablation_table": "ablation", "versions": versions(),
    }
    write_validation(out, doc, table, truth, args.granularity, overwrite=args.overwrite)
    print(f"ground truth: {lm.spec} on {windows.meta.get('data')} ({len(windows)} x {windows.seq_len} tokens, "
          f"{result.tokens} predicted), base NLL {result.base_nll:.4f}; "
          + ", ".join(f"{len(result.groups[g])} {g} groups in {result.seconds[g]:.0f} s" for g in grans)
          + ("" if result.shortcut else f" (full forwards: {result.reason})"))
    for g in grans:
        rel = result.reliability(g)
        if rel is not None:
            print(f"  {g} ranking reproducibility: split-half Spearman {rel['split_half']:.3f}, full set "
                  f"~{rel['full_set']:.3f}; a perfect scorer would reach about {rel['ceiling']:.3f} against it")
    print(format_agreement(agreement))
    print(f"wrote {out}")
    return 0


def _scores(args: argparse.Namespace, lm: Any, scores_dir: Path) -> ImportanceTable:
    if scores_dir.exists():
        return ImportanceTable.load(scores_dir)
    from importance.scoring import DEFAULT_SCORERS, score

    windows = load_data(args.data, lm.tokenizer, seq_len=args.seq_len, tokens=args.tokens, seed=args.seed,
                        max_positions=_max_positions(lm.model))
    table = score(lm, windows, DEFAULT_SCORERS, seed=args.seed, batch_size=args.batch_size, progress=not args.quiet)
    table.save(scores_dir)
    print(f"scored {lm.spec} on {args.data} ({windows.n_tokens} tokens) -> {scores_dir}")
    return table


