"""Structured rows of the quality benchmark: perplexity after physically removing heads + channels or layers.

``rows(args) -> list[dict]`` is what ``scripts/bench_quality.py`` plugs in; run alone, this file prints the
same rows as a markdown table (with the dense figure) and writes a JSON beside it.

Rows (shared/protocol.md; one scoring pass with every criterion on the dense model feeds all of them):
  width 20% of block parameters   taylor, fisher, activation, magnitude (uniform allocation: the same
                                  widths in every layer); taylor, fisher, activation with importance-guided
                                  allocation (when ``pruning.methods.allocate`` is present) and with bias compensation;
                                  fisher uniform / importance with least-squares reconstruction (--reconstruct),
                                  and with the units chosen by the OBS error of that re-fit (--select obs)
  layers 25% of the layers        block_influence, residual_fisher, removal, taylor, fisher (8 of SmolLM2's 30
                                  layers; removal measured on the first 2,048 calibration tokens); removal
                                  iterative (re-measured after each removal), all candidates and the k = 8 best;
                                  compensated: each removed block adds its sub-blocks' means (+mean) or is a
                                  fitted linear stand-in (+linear, ``pruning.methods.standins``)
  blocks 25% of block parameters  attention / MLP sub-blocks removed on their own (--method blocks): by measured
                                  removal on the first 1,024 calibration tokens, iterative (re-measuring the 8 best
                                  of the first round after each removal) and one-shot (the first round's ranking),
                                  and by the one-pass gate Fisher (all calibration tokens), which records its
                                  Spearman correlation with the measured removal over every sub-block
Reference setting: SmolLM2 float32, calibration 32 x 256 Austen windows without Persuasion (seed 0),
evaluation on the first 16,384 tokens of Persuasion in windows of 256. ``--quick``: 8 x 256 calibration,
4,096 evaluation tokens.

``args`` attributes read (all optional): model, seed, batch_size, quick, only (comma-separated substrings
of row names, e.g. 'layers' or 'width taylor'), calib_windows, eval_tokens, seq_len.

    python scripts/quality_structured.py [--quick] [--only layers]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

ROWS: list[dict[str, Any]] = [
    *({"method": "width", "sparsity": 0.2, "criterion": c, "allocation": "uniform", "bias_compensation": False}
      for c in ("taylor", "fisher", "activation", "magnitude")),
    *({"method": "width", "sparsity": 0.2, "criterion": c, "allocation": "importance", "bias_compensation": False}
      for c in ("taylor", "fisher", "activation")),
    *({"method": "width", "sparsity": 0.2, "criterion": c, "allocation": "uniform", "bias_compensation": True}
      for c in ("taylor", "fisher", "activation")),
    *({"method": "width", "sparsity": 0.2, "criterion": "fisher", "allocation": a, "bias_compensation": False,
       "reconstruct": True} for a in ("uniform", "importance")),
    # the same counts, units chosen by the structured OBS error of the re-fit (--select obs)
    *({"method": "width", "sparsity": 0.2, "criterion": "fisher", "allocation": a, "bias_compensation": False,
       "reconstruct": True, "select": "obs"} for a in ("importance", "uniform")),
    *({"method": "layers", "sparsity": 0.25, "criterion": c}
      for c in ("block_influence", "residual_fisher", "removal", "taylor", "fisher")),
    {"method": "layers", "sparsity": 0.25, "criterion": "removal", "iterative": True, "k": 8},
    {"method": "layers", "sparsity": 0.25, "criterion": "removal", "iterative": True, "k": None},
    # a removed block adds its sub-blocks' calibration means (kept as two constants: --compensate mean)
    *({"method": "layers", "sparsity": 0.25, "criterion": "removal", "iterative": True, "k": k, "compensate": "mean"}
      for k in (8, None)),
    {"method": "layers", "sparsity": 0.25, "criterion": "removal", "iterative": True, "k": 8, "compensate": "mean",
     "removal_tokens": 4096},
    # the same choice, each removed block then a fitted linear stand-in x + x W^T + b (--compensate linear)
    {"method": "layers", "sparsity": 0.25, "criterion": "removal", "iterative": True, "k": 8, "compensate": "linear"},
    # one-shot: the layers by the one-pass residual Fisher (no measured removal), then linear stand-ins
    {"method": "layers", "sparsity": 0.25, "criterion": "residual_fisher", "compensate": "linear"},
    # sub-blocks: the iterative row first; the one-shot removal row then ranks by its first round (the same
    # measurement on the same 1,024 tokens, not repeated)
    # (a removed sub-block adds zero: compensate none; or its calibration mean: compensate mean, the default)
    *({"method": "blocks", "sparsity": 0.25, "criterion": "removal", "iterative": True, "k": 8, "removal_tokens": 1024,
       "compensate": c} for c in ("none", "mean")),
    *({"method": "blocks", "sparsity": 0.25, "criterion": "removal", "removal_tokens": 1024, "compensate": c}
      for c in ("none", "mean")),
    # the CLI's defaults (2,048 removal tokens, mean compensation) with --iterative --iterative-k 8
    {"method": "blocks", "sparsity": 0.25, "criterion": "removal", "iterative": True, "k": 8, "compensate": "mean"},
    *({"method": "blocks", "sparsity": 0.25, "criterion": "gate_fisher", "compensate": c} for c in ("none", "mean")),
]
CRITERIA = ["taylor", "fisher", "activation", "magnitude", "block_influence", "residual_fisher", "removal"]


def row_name(spec: dict[str, Any]) -> str:
    extra = f" {spec['allocation']}" if spec["method"] not in ("layers", "blocks") else ""
    extra += " +bias" if spec.get("bias_compensation") else ""
    extra += " +reconstruct" if spec.get("reconstruct") else ""
    extra += " obs" if spec.get("select") == "obs" else ""
    extra += f" {spec['removal_tokens']} tok" if spec.get("removal_tokens") else ""
    extra += {"none": " zero", "mean": " +mean", "linear": " +linear"}.get(spec.get("compensate", ""), "")
    if spec.get("iterative"):
        extra += " iterative" + (f" k={spec['k']}" if spec.get("k") else "")
    return f"structured {spec['method']} {spec['criterion']}{extra} {spec['sparsity']:g}"


def _settings(args: Any) -> dict[str, Any]:
    quick = bool(getattr(args, "quick", False))
    return {"model": getattr(args, "model", None) or "builtin:smollm2-135m", "seed": getattr(args, "seed", 0),
            "batch_size": getattr(args, "batch_size", None) or 4, "quick": quick,
            "seq_len": getattr(args, "seq_len", None) or 256,
            "calib_windows": getattr(args, "calib_windows", None) or (8 if quick else 32),
            "eval_tokens": getattr(args, "eval_tokens", None) or (4096 if quick else 16384)}


def _selected(args: Any) -> list[dict[str, Any]]:
    only = [s.strip() for s in (getattr(args, "only", None) or "").split(",") if s.strip()]
    chosen = [r for r in ROWS if not only or any(s in row_name(r) for s in only)]
    try:
        import pruning.methods.allocate  # noqa: F401
    except ModuleNotFoundError:
        chosen = [r for r in chosen if r.get("allocation") != "importance"]
    return chosen


def rows(args: Any, dense: bool = False, on_row: Any = None) -> list[dict[str, Any]]:
    """One dict per structured row (``dense=True`` adds the dense model first); ``on_row(rows so far)`` after each."""
    from benchlib import reference_data

    from importance.models.load import load_model
    from importance.scoring import score
    from importance.validate.faithfulness import spearman
    from pruning.eval.perplexity import perplexity
    from pruning.methods.blocks import prune_blocks
    from pruning.methods.depth import prune_layers
    from pruning.methods.structured import StructuredConfig, prune_structured

    st = _settings(args)
    chosen = _selected(args)
    if not chosen:
        return []
    base = load_model(st["model"])
    calib, evals = reference_data(base, st)
    start = time.perf_counter()
    needed = {r["criterion"] for r in chosen if not r.get("iterative") and r["method"] != "blocks"}  # table criteria
    table = score(base, calib, [c for c in CRITERIA if c in needed], batch_size=st["batch_size"],
                  progress=False) if needed else None
    score_seconds = time.perf_counter() - start
    common = {"family": "structured", "calibration": dict(calib.meta), "score_seconds": round(score_seconds, 1)}
    out = []
    if dense:
        ppl = perplexity(base.model, evals, base.task, progress=False)
        out.append({**common, "name": "dense", "method": "dense", "ppl": ppl.ppl, "nll": ppl.nll,
                    "predicted": ppl.predicted, "windows": ppl.windows, "seq_len": ppl.seq_len})
    params_before = sum(p.numel() for p in base.model.parameters())
    first_round: dict[Any, dict] = {}  # removal tokens -> first-round sub-block scores of an iterative blocks row
    for spec in chosen:
        lm = copy.deepcopy(base)
        start = time.perf_counter()
        measured = None
        if spec["method"] == "blocks":
            key = (spec.get("removal_tokens"), spec["compensate"])
            measured = first_round.get(key) if spec["criterion"] == "removal" and not spec.get("iterative") else None
            res = prune_blocks(lm, spec["sparsity"], spec["criterion"], calib, st["batch_size"],
                               removal_tokens=spec.get("removal_tokens"), iterative=bool(spec.get("iterative")),
                               k=spec.get("k"), scores=measured, compensate=spec["compensate"])
            if spec.get("iterative"):
                first_round[key] = {tuple(int(v) if v.isdigit() else v for v in key.split()): x
                                                           for key, x in res.record["structured"]["scores"].items()}
        elif spec["method"] == "layers":
            res = prune_layers(lm, spec["sparsity"], spec["criterion"], table, calib, st["batch_size"],
                               iterative=bool(spec.get("iterative")), k=spec.get("k"),
                               compensate=spec.get("compensate", "none"), removal_tokens=spec.get("removal_tokens"))
        else:
            cfg = StructuredConfig(spec["sparsity"], spec["method"], spec["criterion"], spec["allocation"],
                                   bias_compensation=spec["bias_compensation"],
                                   reconstruct=spec.get("reconstruct", False), select=spec.get("select", "fisher"))
            res = prune_structured(lm, cfg, table, calib, st["batch_size"])
        seconds = time.perf_counter() - start
        ppl = perplexity(lm.model, evals, lm.task, progress=False)
        s = res.record["structured"]
        out.append({**common, **spec, "name": row_name(spec), "ppl": ppl.ppl, "nll": ppl.nll,
                    "predicted": ppl.predicted, "windows": ppl.windows, "seq_len": ppl.seq_len,
                    "achieved": s["achieved"], "params_before": params_before,
                    "params_after": sum(p.numel() for p in lm.model.parameters()), "prune_seconds": round(seconds, 2),
                    "removed_layers": s.get("layers_removed"), "widths": _widths(s),
                    "iterative": s.get("iterative"), "reconstruction_error": s.get("reconstruction_error"),
                    **({"sub_blocks_removed": s["sub_blocks_removed"], "sub_block_scores": s["scores"],
                        "calibration_nll": s["calibration_nll"], "rank_seconds": s["rank_seconds"],
                        "ranking_reused": measured is not None} if spec["method"] == "blocks" else {})})
        print(f"  {row_name(spec):<45} ppl {ppl.ppl:9.2f}", flush=True)
        if on_row is not None:
            on_row(out)
        del lm
    by = {r["criterion"]: r["sub_block_scores"] for r in out  # the gate estimates zeroing: the 'zero' rows
          if r.get("method") == "blocks" and r.get("compensate") == "none"}
    if {"removal", "gate_fisher"} <= set(by):  # the one-pass estimate against the measurement, every sub-block
        import torch

        keys = sorted(by["removal"])
        rho = spearman(torch.tensor([by["gate_fisher"][k] for k in keys]),
                       torch.tensor([by["removal"][k] for k in keys]))
        for r in out:
            if r.get("method") == "blocks" and r["criterion"] == "gate_fisher":
                r["spearman_vs_removal"] = rho
        print(f"  sub-block gate_fisher vs measured removal: Spearman {rho:.3f} over {len(keys)} sub-blocks",
              flush=True)
    return out


def _widths(s: dict[str, Any]) -> dict[str, Any] | None:
    """Heads / channels left per layer, summarised: {'heads': [...distinct], 'intermediate': [min, max]}."""
    layers = s.get("layers")
    if not layers:
        return None
    heads = sorted({v["heads"] for v in layers.values()})
    inter = [v["intermediate"] for v in layers.values()]
    return {"heads": heads, "intermediate": [min(inter), max(inter)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="scripts/results/quality_structured.json")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    st = _settings(args)
    print("settings:", json.dumps({**st, "threads": args.threads, "rows": [row_name(r) for r in _selected(args)]}))
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def partial(done: list[dict[str, Any]]) -> None:  # a long run keeps what it measured
        out_path.write_text(json.dumps({"settings": st, "results": done, "partial": True}, indent=2) + "\n")

    result = rows(args, dense=True, on_row=partial)
    dense = next(r for r in result if r["name"] == "dense")
    print(f"\nperplexity on {dense['windows']} x {dense['seq_len']} Persuasion tokens ({dense['predicted']} predicted)"
          f"; calibration {st['calib_windows']} x {st['seq_len']} Austen tokens (seed {st['seed']})\n")
    print("| row | target | achieved | params after | perplexity | vs dense | widths / removed layers |")
    print("|---|---|---|---|---|---|---|")
    for r in result:
        if r["name"] == "dense":
            print(f"| dense | - | - | - | {r['ppl']:.2f} | 1.00x | - |")
            continue
        shape = r["removed_layers"] if r["method"] == "layers" else r["widths"]
        if r["method"] == "blocks":
            shape = " ".join(f"{b['layer']}{b['kind'][0]}" for b in r["sub_blocks_removed"])
        print(f"| {r['name']} | {r['sparsity']:.2f} | {r['achieved']:.3f} | {r['params_after']:,} | {r['ppl']:.2f} | "
              f"{r['ppl'] / dense['ppl']:.2f}x | {shape} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": st, "results": result}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
