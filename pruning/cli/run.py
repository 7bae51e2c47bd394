"""``imprune run``: the whole before/after pipeline (see ``pruning.run.pipeline``) and ``imprune recipes``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from importance.errors import ImpruneError
from importance.scoring import DEFAULT_SCORERS, parse_scorers
from pruning.cli.core import ALLOW_PICKLE, DEVICE, DTYPE, MODEL, QUIET, SEED, TRUST, arg, command, positive


@command("run", "evaluate, score, prune by a recipe, evaluate and score again, draw, report (one run folder)", [
    MODEL, DTYPE, DEVICE, TRUST, ALLOW_PICKLE,
    arg("--data", default="austen:train", help="calibration and scoring data"),
    arg("--recipe", default="demo", help="a shipped recipe name (see `imprune recipes`) or a .yaml/.json file"),
    arg("--tokens", type=int, default=8192, help="calibration / scoring tokens"),
    arg("--seq-len", type=int, default=256), SEED, arg("--batch-size", type=int, default=4),
    arg("--scorers", default=",".join(DEFAULT_SCORERS)),
    arg("--eval-data", default="austen:eval"), arg("--eval-tokens", type=int, default=16384),
    arg("--task-limit", type=int, default=16,
        help="items per built-in probe for accuracy before / after (default %(default)s; 0: no accuracy)"),
    arg("--out", required=True, help="run folder; rerunning with the same settings reuses finished stages"),
    arg("--fresh", action="store_true", help="recompute every stage even when its settings are unchanged"),
    QUIET])
def run_cmd(args: argparse.Namespace) -> int:
    from pruning.run.pipeline import Pipeline, RunConfig
    from pruning.run.recipes import load_recipe

    recipe = load_recipe(args.recipe)
    for flag in ("tokens", "batch_size", "eval_tokens", "seq_len"):
        positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    if args.task_limit < 0:
        raise ImpruneError(f"--task-limit must be 0 (no accuracy) or more items per probe, got {args.task_limit}")
    out = Path(args.out).expanduser()
    if out.exists() and not (out / "stages").is_dir() and (not out.is_dir() or any(out.iterdir())):
        raise ImpruneError(f"'{out}' exists and is not an imprune run folder; choose a new --out")
    if args.fresh and (out / "stages").is_dir():
        for marker in (out / "stages").glob("*.json"):
            marker.unlink()
    cfg = RunConfig(model=args.model, data=args.data, tokens=args.tokens, seq_len=args.seq_len, seed=args.seed,
                    batch_size=args.batch_size, scorers=tuple(parse_scorers(args.scorers)), eval_data=args.eval_data,
                    eval_tokens=args.eval_tokens, task_limit=args.task_limit, dtype=args.dtype, device=args.device,
                    trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    result = Pipeline(cfg, recipe, out, progress=not args.quiet, log=log).run()
    print(summary(result.metrics, out))
    return 0


def summary(m: dict, out: Path) -> str:
    """The one-screen summary printed at the end of a run."""
    b, a = m["perplexity"]["before"], m["perplexity"]["after"]
    pb, pa = m["params"]["before"], m["params"]["after"]
    nb, na = m["nonzero_params"]["before"], m["nonzero_params"]["after"]
    mb, ma = m["memory"]["weight_bytes_before"], m["memory"]["weight_bytes_after"]
    now = sum(m["computed_now"].values())
    lines = [
        "",
        f"imprune run: {m['model']}, recipe {m['recipe']['name']} ({m['recipe']['description']})",
        f"  perplexity   {b['ppl']:.2f} -> {a['ppl']:.2f}   ({a['windows']} x {a['seq_len']} tokens of {a['data']}, "
        f"{a['predicted']} predicted)" if "pruned" not in m["perplexity"] else
        f"  perplexity   {b['ppl']:.2f} dense -> {m['perplexity']['pruned']['ppl']:.2f} pruned -> {a['ppl']:.2f} healed"
        f"   ({a['windows']} x {a['seq_len']} tokens of {a['data']}, {a['predicted']} predicted)",
        *_heal_lines(m.get("heal")),
        *_accuracy_lines(m.get("accuracy")),
        f"  parameters   {pb:,} -> {pa:,} stored ({pa / pb:.1%}); non-zero {nb:,} -> {na:,} ({na / nb:.1%})",
        f"  weights      {mb / 2**20:.1f} MiB -> {ma / 2**20:.1f} MiB in memory"
        + ("" if ma < mb else " (zeros in dense tensors save no memory by themselves)"),
        f"  stages       {now:.0f} s computed now" + (f"; reused {', '.join(m['reused'])}" if m["reused"] else ""),
        f"  report       {out / 'report.html'}",
    ]
    return "\n".join(lines)


def _heal_lines(heal: dict | None) -> list[str]:
    if not heal:
        return []
    curve = heal.get("curve") or [float("nan")]
    return [f"  healing      {heal['kind']}, {heal['steps']} steps, {heal['tokens']:,} tokens, {heal['trainable']:,} "
            f"trainable parameters, {heal['seconds']:.0f} s; loss {curve[0]:.3f} -> {curve[-1]:.3f}"]


def _accuracy_lines(acc: dict | None) -> list[str]:
    """Mean probe accuracy before -> after with chance, then the per-task figures."""
    if not acc or not acc.get("before") or not acc.get("after"):
        return []
    b, a = acc["before"], acc["after"]
    names = [n for n in b if n in a]
    mean = lambda d, f: sum(d[n][f] for n in names) / len(names)  # noqa: E731
    per = ", ".join(f"{n} {b[n]['acc']:.2f}->{a[n]['acc']:.2f}" for n in names)
    mid = f"{mean(acc['pruned'], 'acc'):.3f} pruned -> " if isinstance(acc.get("pruned"), dict) else ""
    return [f"  accuracy     {mean(b, 'acc'):.3f} -> {mid}{mean(a, 'acc'):.3f} mean acc over {len(names)} probes x "
            f"{acc['items_per_task']} items (chance {mean(b, 'chance'):.3f}; acc_norm {mean(b, 'acc_norm'):.3f} -> "
            f"{mean(a, 'acc_norm'):.3f})", f"               {per}"]


@command("recipes", "list the shipped recipes of `imprune run --recipe NAME`", [])
def recipes_cmd(args: argparse.Namespace) -> int:
    from pruning.run.recipes import load_recipe, shipped_recipes

    for name in shipped_recipes():
        r = load_recipe(name)
        print(f"{name:<10} {r.description}")
        for s in r.steps:
            print(f"{'':<10}   - {json.dumps(s.to_dict())}")
    return 0
