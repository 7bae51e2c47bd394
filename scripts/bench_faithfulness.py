"""Faithfulness: how well each scorer's ranking predicts the measured ablation, as calibration data doubles.

Ground truth (``importance.validate.ablation``): every head and every layer of the model removed alone, mean token NLL
increase on held-out windows (``--eval-data``, seeded random draw), measured once. Scores: one pass per chunk of
calibration windows, statistics merged by addition (they are plain sums), so the tables at n, 2n, 4n, 8n windows
(nested: each set holds the previous one, the first is the reference draw ``load_data(samples=n, seed)``) cost
one pass over the largest set. For every size and granularity: Spearman, Kendall tau-b and the bottom-25%
overlap of every scorer against the ablation (``importance.validate.faithfulness``), and the measurement's own
reproducibility (split-half over the held-out windows, ``Ablation.reliability``), whose square root is about
the best Spearman any scorer can reach against the measurement.

The measured ``removal`` layer scorer (bypass each block on calibration windows) runs once, on the first
``--removal-tokens`` of the reference draw (the scorer's default cap), so its value is the same at every size;
every other scorer comes from the merged one-pass statistics.

Ratios measured in this run: the ablation's cost in bare forwards over the held-out windows, and the speed-up of
the cached-input shortcut over a full forward per ablation (a sample of head groups spread over the layers,
measured both ways, with their values compared).

Writes ``--out`` (JSON), a README-ready Markdown table beside it, and for the largest calibration set the
scatter plots and the head heatmap (``<stem>_scatter_<granularity>.png``, ``<stem>_heatmap.png``).
Reference setting: SmolLM2, 32 x 256 Austen windows (seed 0) doubled three times, 4 x 256 Persuasion windows.

    python scripts/bench_faithfulness.py [--quick] [--model builtin:smollm2-135m] [--windows 32] [--seq-len 256]
        [--doublings 3] [--eval-tokens 1024] [--eval-seq-len 256] [--granularities head,layer]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch

from importance.arch.canonical import model_map
from importance.data.sources import Windows, load_data
from importance.engine.collect import CollectConfig, Statistics, collect
from importance.models.load import load_model
from importance.scoring import DEFAULT_SCORERS, REMOVAL_TOKENS, removal_windows
from importance.store.meta import versions, write_json
from importance.table import build_table
from importance.validate.ablation import Replay, ablation_table, groups, measure_ablation, removal_statistics
from importance.validate.faithfulness import compare
from importance.viz.validate import ablation_heatmap_figure, scatter_figure

GOALS = {"layer": 0.8, "head": 0.6}


def nested_chunks(spec: str, tokenizer, seq_len: int, first: int, doublings: int, seed: int) -> list[Windows]:
    """Disjoint chunks whose running unions hold first, 2 first, 4 first ... windows; chunk 0 is the reference draw."""
    ref = load_data(spec, tokenizer, seq_len=seq_len, samples=first, seed=seed)
    if doublings == 0:
        return [ref]
    full = load_data(spec, tokenizer, seq_len=seq_len, samples=first * 2 ** doublings, seed=seed)
    taken = Counter(tuple(r) for r in ref.input_ids.tolist())
    rest = []
    for i, row in enumerate(full.input_ids.tolist()):
        if taken[tuple(row)]:
            taken[tuple(row)] -= 1
        else:
            rest.append(i)
    order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    rest = [rest[i] for i in order]
    chunks, start = [ref], 0
    for k in range(1, doublings + 1):
        size = first * 2 ** (k - 1)  # the k-th doubling adds as many windows as the union already has
        chunks.append(full.subset(rest[start:start + size]))
        start += size
    return chunks


def shortcut_speedup(lm, mm, windows: Windows, batch_size: int, sample: int = 6) -> dict:
    """Time the same head ablations with the shortcut and with full forwards; the values must agree."""
    todo = groups(mm, "head")
    todo = [todo[i] for i in torch.linspace(0, len(todo) - 1, sample).round().long().tolist()]
    out = {}
    for name, on in (("shortcut", True), ("full", False)):
        replay = Replay(lm.model, mm, windows, lm.task, batch_size, shortcut=on)
        replay.delta(todo[0])  # warm-up
        start = time.perf_counter()
        vals = [replay.delta(g) for g in todo]
        out[name] = {"seconds_per_group": (time.perf_counter() - start) / len(todo), "values": vals}
    diff = max(abs(a - b) for a, b in zip(out["shortcut"]["values"], out["full"]["values"]))
    return {"groups": [g.label for g in todo], "max_abs_difference": diff,
            "speedup": out["full"]["seconds_per_group"] / out["shortcut"]["seconds_per_group"],
            **{k: round(v["seconds_per_group"], 4) for k, v in out.items()}}


def bare_forward_seconds(lm, windows: Windows, batch_size: int) -> float:
    replay = Replay(lm.model, model_map(lm.model), windows, lm.task, batch_size, shortcut=False)
    start = time.perf_counter()
    replay.nll(0)
    return time.perf_counter() - start


def markdown(results: dict, sizes: list[int], grans: list[str]) -> str:
    head = "| scorer | " + " | ".join(f"{g} Spearman @ {t:,} tok" for g in grans for t in sizes) + \
        " | " + " | ".join(f"{g} Kendall / bottom-25% @ {sizes[-1]:,}" for g in grans) + " |"
    lines = [head, "|" + "---|" * (1 + len(grans) * (len(sizes) + 1))]
    scorers = list(dict.fromkeys(s for g in grans for s in results[g][str(sizes[-1])]["scorers"]))
    for s in scorers:
        cells = []
        for g in grans:
            for t in sizes:
                r = results[g][str(t)]
                v = r["scorers"].get(s)
                cells.append("-" if v is None else (f"**{v['spearman']:.3f}**" if r["best"] == s
                                                    else f"{v['spearman']:.3f}"))
        for g in grans:
            v = results[g][str(sizes[-1])]["scorers"].get(s)
            cells.append("-" if v is None else f"{v['kendall']:.3f} / {v['bottom_overlap']:.2f}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="builtin:smollm2-135m")
    p.add_argument("--data", default="austen:train")
    p.add_argument("--windows", type=int, default=32, help="calibration windows of the first (reference) set")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--doublings", type=int, default=3)
    p.add_argument("--eval-data", default="austen:eval")
    p.add_argument("--eval-tokens", type=int, default=1024)
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--granularities", default="head,layer")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--removal-tokens", type=int, default=REMOVAL_TOKENS,
                   help="calibration tokens the measured removal scorer runs on (first windows of the reference draw)")
    p.add_argument("--quick", action="store_true", help="4 x 128 calibration windows doubled 3 times, 2 x 128 held out")
    p.add_argument("--out", default=None, help="JSON path (default scripts/results/bench_faithfulness[_quick].json)")
    args = p.parse_args()
    if args.quick:
        args.windows, args.seq_len, args.eval_tokens, args.eval_seq_len = 4, 128, 256, 128
    out = Path(args.out or f"scripts/results/bench_faithfulness{'_quick' if args.quick else ''}.json")
    torch.set_num_threads(args.threads)
    grans = [g.strip() for g in args.granularities.split(",") if g.strip()]
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    print("settings:", json.dumps(settings))

    lm = load_model(args.model)
    mm = model_map(lm.model)
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    held_out = load_data(args.eval_data, lm.tokenizer, seq_len=args.eval_seq_len, tokens=args.eval_tokens,
                         seed=args.seed, max_positions=limit)
    chunks = nested_chunks(args.data, lm.tokenizer, args.seq_len, args.windows, args.doublings, args.seed)

    # ground truth, once
    truth_result = measure_ablation(lm.model, held_out, lm.task, tuple(grans), batch_size=args.batch_size, mm=mm)
    truth = ablation_table(truth_result, mm, meta={"data": dict(held_out.meta)})
    fwd = bare_forward_seconds(lm, held_out, args.batch_size)
    speed = shortcut_speedup(lm, mm, held_out, args.batch_size)
    print(f"ground truth: base NLL {truth_result.base_nll:.4f} on {len(held_out)} x {held_out.seq_len} held-out "
          f"tokens; " + ", ".join(f"{len(truth_result.groups[g])} {g}s in {truth_result.seconds[g]:.0f} s "
                                  f"(= {truth_result.seconds[g] / fwd:.1f} bare forwards)" for g in grans))
    reliability = {g: truth_result.reliability(g) for g in grans}
    for g, rel in reliability.items():
        if rel is not None:
            print(f"ground truth reproducibility ({g}): split-half Spearman {rel['split_half']:.3f}, "
                  f"full set ~{rel['full_set']:.3f}; a perfect scorer would reach about {rel['ceiling']:.3f}")
    print(f"shortcut vs full forward per ablation: {speed['speedup']:.2f}x faster "
          f"(max |difference| {speed['max_abs_difference']:.2e} nats over {len(speed['groups'])} heads)")

    # scores at n, 2n, 4n, 8n windows from one pass over the chunks
    cfg = CollectConfig(grad=True, elements=False, activation=True, block_influence=True, residual_fisher=True)
    merged = Statistics()
    names = list(DEFAULT_SCORERS)
    removal = None
    if "layer" in grans:
        first = removal_windows(chunks[0], args.removal_tokens)
        start = time.perf_counter()
        merged.merge(removal_statistics(lm.model, first, lm.task, batch_size=args.batch_size, mm=mm))
        removal = {"windows": len(first), "tokens": first.n_tokens, "seconds": time.perf_counter() - start}
        removal["cost_in_calibration_forwards"] = removal["seconds"] / bare_forward_seconds(lm, first, args.batch_size)
        names.append("removal")
        print(f"removal scorer: {mm.n_layers} blocks bypassed on {len(first)} x {first.seq_len} calibration tokens in "
              f"{removal['seconds']:.0f} s (= {removal['cost_in_calibration_forwards']:.1f} bare forwards over them)")
    results: dict[str, dict[str, dict]] = {g: {} for g in grans}
    sizes, score_seconds, tables = [], [], []
    for chunk in chunks:
        stats = collect(lm.model, chunk, lm.task, cfg, batch_size=args.batch_size, progress=True, mm=mm)
        score_seconds.append(stats.meta["seconds"])
        merged.meta = merged.meta or dict(stats.meta)
        merged.merge(stats)
        tokens = int(merged.count("tokens"))
        sizes.append(tokens)
        table = build_table(merged, mm, names, meta={"tokens": tokens})
        tables.append(table)
        for g in grans:
            results[g][str(tokens)] = compare(table, truth, g)
    print(f"\n{'granularity':<12} {'scorer':<16} " + " ".join(f"{f'rho@{t}':>11}" for t in sizes)
          + f" {'tau@max':>8} {'bottom25':>9}")
    for g in grans:
        last = results[g][str(sizes[-1])]
        for s in last["scorers"]:
            rhos = " ".join(f"{results[g][str(t)]['scorers'][s]['spearman']:>11.3f}" for t in sizes)
            star = " *" if s == last["best"] else ""
            print(f"{g:<12} {s:<16} {rhos} {last['scorers'][s]['kendall']:>8.3f} "
                  f"{last['scorers'][s]['bottom_overlap']:>9.3f}{star}")
    goals = {}
    for g in grans:
        best = max((v["spearman"], s, t) for t in sizes for s, v in results[g][str(t)]["scorers"].items()
                   if v["spearman"] == v["spearman"])  # NaN (a constant ranking) never wins
        tokens = removal["tokens"] if best[1] == "removal" and removal else best[2]  # removal: its own windows
        goals[g] = {"goal": GOALS.get(g), "best_spearman": best[0], "scorer": best[1], "tokens": tokens,
                    "met": GOALS.get(g) is not None and best[0] >= GOALS[g]}
        print(f"goal {g}: best Spearman {best[0]:.3f} ({best[1]} at {tokens:,} tokens) vs >= {GOALS.get(g)}: "
              f"{'met' if goals[g]['met'] else 'NOT met'}")

    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("")
    figures = {}
    for g in grans:
        path = Path(f"{stem}_scatter_{g}.png")
        scatter_figure(tables[-1], truth, g, results[g][str(sizes[-1])]).savefig(path, dpi=110)
        figures[f"scatter_{g}"] = str(path)
    if "head" in grans:
        ablation_heatmap_figure(tables[-1], truth, "head").savefig(f"{stem}_heatmap.png", dpi=110)
        figures["heatmap"] = f"{stem}_heatmap.png"
    md = markdown(results, sizes, grans)
    ceiling = "; ".join(f"{g} {r['full_set']:.3f} (a perfect scorer would reach ~{r['ceiling']:.3f})"
                        for g, r in reliability.items() if r is not None)
    note = (f"\nremoval: measured on the first {removal['tokens']:,} calibration tokens at every size "
            f"({removal['seconds']:.0f} s, {removal['cost_in_calibration_forwards']:.1f} bare forwards over them)\n"
            if removal else "")
    Path(f"{stem}.md").write_text(f"Settings: {json.dumps(settings)}\n\n" + md + note
                                  + (f"\nReproducibility of the measured ranking (split-half Spearman, stepped up "
                                     f"to the full held-out set): {ceiling}\n" if ceiling else ""))
    write_json(out, {
        "settings": settings, "versions": versions(), "calibration_tokens": sizes,
        "ground_truth": {"base_nll": truth_result.base_nll, "held_out": dict(held_out.meta),
                         "predicted_tokens": truth_result.tokens, "seconds": truth_result.seconds,
                         "bare_forward_seconds": fwd, "shortcut": speed, "reliability": reliability,
                         "cost_in_bare_forwards": {g: truth_result.seconds[g] / fwd for g in grans},
                         "top": {g: sorted(([x.label, v] for x, v in zip(truth_result.groups[g],
                                                                        truth_result.values[g].tolist())),
                                           key=lambda r: -r[1])[:8] for g in grans}},
        "scoring_seconds_per_chunk": score_seconds, "removal": removal, "results": results, "goals": goals,
        "figures": figures,
    })
    print(f"\nwrote {out}, {stem}.md and {', '.join(figures.values())}")


if __name__ == "__main__":
    main()
