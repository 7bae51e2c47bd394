"""Layer scorers against measured layer removal on several held-out draws: is a layer ranking's agreement a
property of the scorer, or of one lucky set of held-out windows?

One table from the reference calibration (32 x 256 Austen windows, seed 0) with every layer scorer (the one-pass
ones plus the measured ``removal`` on its first 2,048 tokens); then every layer of the model bypassed alone on
``--draws`` seeded draws of held-out windows (``--eval-tokens`` each) and one larger draw (``--large-tokens``),
and the Spearman correlation of each scorer's layer ranking with each measurement, plus the measurements'
agreement with each other (how far any scorer could go).

    python scripts/bench_layer_draws.py [--draws 4] [--eval-tokens 1024] [--large-tokens 4096]
"""

from __future__ import annotations

import argparse
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
from importance.scoring import DEFAULT_SCORERS, score  # noqa: E402
from importance.store.meta import versions  # noqa: E402
from importance.validate.ablation import measure_ablation  # noqa: E402
from importance.validate.faithfulness import spearman  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--draws", type=int, default=4, help="held-out draws of --eval-tokens (seeds 0..draws-1)")
    p.add_argument("--eval-tokens", type=int, default=1024)
    p.add_argument("--large-tokens", type=int, default=4096, help="one more draw of this size (seed 100); 0: none")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="scripts/results/bench_layer_draws.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    mm = model_map(lm.model)
    calib = load_data("austen:train", lm.tokenizer, seq_len=args.seq_len, samples=args.windows, seed=0)
    start = time.perf_counter()
    table = score(lm, calib, [*DEFAULT_SCORERS, "removal"], progress=False)
    score_seconds = time.perf_counter() - start
    names = [s for s in table.scorers if table.has(s, "layer")]
    predicted = {s: table.layer_scores(s) for s in names}
    draws = [(f"{args.eval_tokens} tok seed {k}", args.eval_tokens, k) for k in range(args.draws)]
    if args.large_tokens:
        draws.append((f"{args.large_tokens} tok seed 100", args.large_tokens, 100))
    measured = {}
    for label, tokens, seed in draws:
        held = load_data("austen:eval", lm.tokenizer, seq_len=args.seq_len, tokens=tokens, seed=seed)
        result = measure_ablation(lm.model, held, lm.task, ("layer",), progress=False, mm=mm)
        measured[label] = result.matrix("layer", mm.n_layers, 0)
        print(f"measured {label}: {result.seconds['layer']:.0f} s", flush=True)
    rho = {s: {d: spearman(predicted[s], m) for d, m in measured.items()} for s in names}
    print("\n| scorer | " + " | ".join(measured) + " | mean | min |")
    print("|---|" + "---|" * (len(measured) + 2))
    for s in sorted(names, key=lambda n: -statistics.mean(rho[n].values())):
        v = list(rho[s].values())
        kind = " (layer-only)" if layer_only(s) else ""
        print(f"| {s}{kind} | " + " | ".join(f"{x:.3f}" for x in v) + f" | {statistics.mean(v):.3f} | {min(v):.3f} |")
    pairs = [spearman(measured[a], measured[b]) for i, a in enumerate(measured) for b in list(measured)[i + 1:]]
    agreement = {"min": min(pairs), "max": max(pairs)} if pairs else None  # needs two draws
    if agreement:
        print(f"\nmeasurement vs measurement (every pair of draws): Spearman {min(pairs):.3f} .. {max(pairs):.3f}")
    write_results(args.out, {"settings": vars(args), "versions": versions(), "score_seconds": score_seconds,
                             "calibration": dict(calib.meta), "removal": table.meta.get("removal"),
                             "spearman": rho, "measured": {d: m.tolist() for d, m in measured.items()},
                             "predicted": {s: v.tolist() for s, v in predicted.items()},
                             "measurement_agreement": agreement})


if __name__ == "__main__":
    main()
