"""Scorers against measured removal on several held-out draws: is a ranking's agreement a property of the scorer,
or of one lucky set of held-out windows? Layers (default) or heads (``--granularity head``).

One table from the reference calibration (32 x 256 Austen windows, seed 0; ``--windows`` more) with every scorer of
the granularity (layers: the one-pass ones plus the measured ``removal`` on its first ``--removal-tokens``; heads:
the default scorers plus the per-token gate ones ``token_fisher`` / ``token_second_order``; ``--scorers`` replaces
the list, '' scores nothing and only measures); then every layer bypassed (every head zeroed) alone on each
held-out draw (``--draws`` seeds 0..n-1 or ``--seeds``, ``--eval-tokens`` each) and one larger draw
(``--large-tokens``), and the Spearman correlation of each scorer's ranking with each measurement, plus the
measurements' agreement with each other (how far any scorer could go). ``--reuse FILES`` takes the measured vectors
of draws previous results JSON files already hold (same labels) instead of measuring them again; with
``--scorers ''`` the predictions those files hold are compared too (named 'scorer (file)'), so runs combine
without a pass. Draw seed 0 of 1,024 tokens is bench_faithfulness's held-out set.

    python scripts/bench_layer_draws.py [--granularity layer|head] [--draws 4 | --seeds 3,4] [--eval-tokens 1024]
        [--large-tokens 4096] [--scorers a,b] [--removal-tokens 2048] [--reuse OLD.json,...] [--out NEW.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from benchlib import write_results  # noqa: E402

from importance.arch.canonical import model_map  # noqa: E402
from importance.data.sources import load_data  # noqa: E402
from importance.models.load import load_model  # noqa: E402
from importance.scorers import layer_only  # noqa: E402
from importance.scoring import DEFAULT_SCORERS, REMOVAL_TOKENS, score  # noqa: E402
from importance.store.meta import versions  # noqa: E402
from importance.validate.ablation import measure_ablation  # noqa: E402
from importance.validate.faithfulness import spearman  # noqa: E402

EXTRA = {"layer": ("removal",), "head": ("token_fisher", "token_second_order")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--draws", type=int, default=4, help="held-out draws of --eval-tokens (seeds 0..draws-1)")
    p.add_argument("--seeds", default=None, help="comma-separated draw seeds instead of 0..draws-1")
    p.add_argument("--eval-tokens", type=int, default=1024)
    p.add_argument("--large-tokens", type=int, default=4096, help="one more draw of this size (seed 100); 0: none")
    p.add_argument("--scorers", default=None, help="comma-separated scorers (default: the defaults + "
                   "removal for layers, token_fisher,token_second_order for heads); '': measure only")
    p.add_argument("--removal-tokens", type=int, default=REMOVAL_TOKENS,
                   help="calibration tokens the measured removal / head_removal scorers run on")
    p.add_argument("--reuse", default=None,
                   help="previous results JSON files (comma-separated) whose measured draws are taken as they are")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--granularity", default="layer", choices=["layer", "head"])
    p.add_argument("--out", default=None, help="default scripts/results/bench_{layer,head}_draws.json")
    args = p.parse_args()
    args.out = args.out or f"scripts/results/bench_{args.granularity}_draws.json"
    gran = args.granularity
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    mm = model_map(lm.model)
    names = ([*DEFAULT_SCORERS, *EXTRA[gran]] if args.scorers is None
             else [s for s in args.scorers.split(",") if s])
    extra: dict = {}
    predicted: dict[str, torch.Tensor] = {}
    if names:
        calib = load_data("austen:train", lm.tokenizer, seq_len=args.seq_len, samples=args.windows, seed=0)
        start = time.perf_counter()
        table = score(lm, calib, names, removal_tokens=args.removal_tokens, progress=False)
        extra = {"score_seconds": time.perf_counter() - start, "calibration": dict(calib.meta),
                 "removal": table.meta.get("removal")}
        print(f"scored {', '.join(names)}: {extra['score_seconds']:.0f} s", flush=True)
        names = [s for s in table.scorers if table.has(s, gran)]
        predicted = {s: table.layer_scores(s) if gran == "layer" else table.matrix(s, "head", "sum").flatten()
                     for s in names}
    elif args.reuse:  # nothing scored: the predictions the reused files hold, named by file
        for f in args.reuse.split(","):
            for s, v in json.loads(Path(f).read_text()).get("predicted", {}).items():
                predicted[f"{s} ({Path(f).stem})"] = torch.tensor(v)
        names = list(predicted)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(range(args.draws))
    draws = [(f"{args.eval_tokens} tok seed {k}", args.eval_tokens, k) for k in seeds]
    if args.large_tokens:
        draws.append((f"{args.large_tokens} tok seed 100", args.large_tokens, 100))
    old = {label: (f, v) for f in (args.reuse.split(",") if args.reuse else [])
           for label, v in json.loads(Path(f).read_text())["measured"].items()}
    measured: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}
    for label, tokens, seed in draws:
        if label in old:
            measured[label] = torch.tensor(old[label][1])
            print(f"measured {label}: taken from {old[label][0]}", flush=True)
        else:
            held = load_data("austen:eval", lm.tokenizer, seq_len=args.seq_len, tokens=tokens, seed=seed)
            result = measure_ablation(lm.model, held, lm.task, (gran,), progress=False, mm=mm)
            width = 0 if gran == "layer" else mm.blocks[0].n_heads
            measured[label] = result.matrix(gran, mm.n_layers, width).flatten()
            seconds[label] = result.seconds[gran]
            print(f"measured {label}: {result.seconds[gran]:.0f} s", flush=True)
        report(args, names, predicted, measured, {**extra, "measure_seconds": seconds},
               final=len(measured) == len(draws))  # written after every draw: a stopped run keeps what it measured


def report(args: argparse.Namespace, names: list[str], predicted: dict[str, torch.Tensor],
           measured: dict[str, torch.Tensor], extra: dict, final: bool) -> None:
    rho = {s: {d: spearman(predicted[s], m) for d, m in measured.items()} for s in names}
    pairs = [spearman(measured[a], measured[b]) for i, a in enumerate(measured) for b in list(measured)[i + 1:]]
    agreement = {"min": min(pairs), "max": max(pairs)} if pairs else None  # needs two draws
    if final:
        print("\n| scorer | " + " | ".join(measured) + " | mean | min |")
        print("|---|" + "---|" * (len(measured) + 2))
        for s in sorted(names, key=lambda n: -statistics.mean(rho[n].values())):
            v = list(rho[s].values())
            kind = " (layer-only)" if layer_only(s) else ""
            print(f"| {s}{kind} | " + " | ".join(f"{x:.3f}" for x in v)
                  + f" | {statistics.mean(v):.3f} | {min(v):.3f} |")
        if agreement:
            print(f"\nmeasurement vs measurement (every pair of draws): Spearman {agreement['min']:.3f} .. "
                  f"{agreement['max']:.3f}")
    write_results(args.out, {"settings": vars(args), "versions": versions(), **extra, "complete": final,
                             "spearman": rho, "measured": {d: m.tolist() for d, m in measured.items()},
                             "predicted": {s: v.tolist() for s, v in predicted.items()},
                             "measurement_agreement": agreement})


if __name__ == "__main__":
    main()
