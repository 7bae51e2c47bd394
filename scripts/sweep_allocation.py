"""Which signal should drive importance-guided unstructured allocation: a sweep on the reference setting.

Prunes SmolLM2 to 50% with one criterion (default wanda) and ``--allocation importance``, once per signal /
granularity / transform / band below, each from the same dense weights, and prints one JSON line per
configuration with the perplexity (64 x 256 Persuasion windows) and the first and last per-layer ratios.
Calibration 32 x 256 Austen windows (seed 0); the table (all scorers) is scored once on the dense model.
The uniform and OWL (linear) figures of the same setting are in ``scripts/results/bench_quality.md``.
This sweep chose the default signal of ``pruning.methods.unstructured`` (fisher, per layer, log scale).

    python scripts/sweep_allocation.py [wanda|sparsegpt|...] > scripts/results/sweep_allocation.jsonl
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import reference_data  # noqa: E402

from importance.models.load import load_model  # noqa: E402
from importance.scoring import score  # noqa: E402
from pruning.eval.perplexity import perplexity  # noqa: E402
from pruning.methods.unstructured import UnstructuredConfig, prune_unstructured  # noqa: E402

CONFIGS = [  # (signal, granularity, transform, band)
    ("fisher", "layer", "log", 0.1), ("fisher", "layer", "rank", 0.1), ("block_influence", "layer", "rank", 0.1),
    ("taylor", "layer", "log", 0.1), ("owl", "layer", "rank", 0.1), ("fisher", "component", "log", 0.1),
    ("activation", "layer", "log", 0.1), ("magnitude", "layer", "log", 0.1), ("fisher", "layer", "log", 0.05),
]


def main() -> None:
    crit = sys.argv[1] if len(sys.argv) > 1 else "wanda"
    torch.set_num_threads(1)
    lm = load_model("builtin:smollm2-135m")
    calib, evals = reference_data(lm, {"seq_len": 256, "calib_windows": 32, "seed": 0, "eval_tokens": 16384})
    dense = {k: v.clone() for k, v in lm.model.state_dict().items()}
    start = time.time()
    table = score(lm, calib, ["fisher", "taylor", "activation", "magnitude", "block_influence"], progress=False)
    print("scored", time.time() - start, flush=True)
    for signal, gran, transform, band in CONFIGS:
        lm.model.load_state_dict(dense)
        cfg = UnstructuredConfig(0.5, crit, allocation="importance", band=band, alloc_scorer=signal,
                                 alloc_granularity=gran, alloc_transform=transform)
        start = time.time()
        res = prune_unstructured(lm, cfg, table, calib, 4)
        ppl = perplexity(lm.model, evals, lm.task, progress=False).ppl
        ratios = res.record["allocation"]["ratios"]
        per_layer = [round(sum(v.values()) / len(v), 3) for _, v in sorted(ratios.items(), key=lambda kv: int(kv[0]))]
        print(json.dumps({"crit": crit, "scorer": signal, "gran": gran, "transform": transform, "band": band,
                          "ppl": round(ppl, 2), "s": round(time.time() - start),
                          "layers": per_layer[:4] + ["..."] + per_layer[-4:]}), flush=True)


if __name__ == "__main__":
    main()
