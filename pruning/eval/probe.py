"""``imprune probe`` as a function: per-task head maps, each task's accuracy, the maps' split-half reliability and
similarity to the other tasks (``importance.validate.task_maps``), optionally the causal matrix of removing each
map's top heads (``pruning.eval.causal``), and the markdown report of all of it.

Per task, the items of ``tasks:<name>`` (``samples`` of them, seed ``seed``) are scored in two interleaved halves
(``importance.scoring.score_parts``: the whole task's table comes from the halves' summed statistics, so the
reliability costs no extra pass); accuracy is measured on the same items (``pruning.eval.tasks``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from importance.data.sources import load_data
from importance.errors import ImpruneError
from importance.models.load import LoadedModel
from importance.scorers import HEAD_SCORER
from importance.scoring import score_parts
from importance.table import ImportanceTable
from importance.validate.task_maps import MapAgreement, map_agreement
from importance.viz.tasks import SHARED_MARK
from pruning.eval.causal import CausalMatrix, causal_matrix
from pruning.eval.tasks import TaskAccuracy, probe_accuracy

MIN_SAMPLES = 4  # two halves of at least two items each


@dataclass(frozen=True)
class ProbeConfig:
    samples: int = 64
    scorers: tuple[str, ...] = ("fisher", "token_fisher", "token_second_order", "taylor")
    scorer: str = HEAD_SCORER  # drawn, and the one whose top heads the causal check removes
    seq_len: int = 128
    seed: int = 0
    batch_size: int = 16
    validate: bool = False
    validate_heads: int = 10
    validate_items: int = 32


@dataclass
class ProbeResult:
    tasks: list[str]
    tables: list[ImportanceTable]
    halves: list[tuple[ImportanceTable, ImportanceTable]]
    accuracy: list[TaskAccuracy]
    agreement: dict[str, list[MapAgreement]]  # per scorer with head values
    cross: dict[str, list[list[float]]]
    causal: CausalMatrix | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def panels(self, scorer: str) -> dict[str, dict[str, Any]]:
        """Per task, what its grid panel shows (``importance.viz.tasks.task_grid_figure``)."""
        acc = {a.task: a for a in self.accuracy}
        return {g.task: {"acc": acc[g.task].acc, "chance": acc[g.task].chance, "reliability": g.reliability,
                         "similarity": g.similarity, "specific": g.specific} for g in self.agreement[scorer]}

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": [a.to_dict() for a in self.accuracy],
                "agreement": {s: [g.to_dict() for g in v] for s, v in self.agreement.items()},
                "cross": self.cross, "causal": self.causal.to_dict() if self.causal else None,
                "seconds": self.seconds}


def run_probe(lm: LoadedModel, names: Sequence[str], cfg: ProbeConfig, progress: bool = False) -> ProbeResult:
    """Everything of the module docstring for tasks ``names`` (validated registry names)."""
    if cfg.samples < MIN_SAMPLES:
        raise ImpruneError(f"--samples {cfg.samples}: split-half reliability needs at least {MIN_SAMPLES} items")
    if cfg.scorer not in cfg.scorers:
        raise ImpruneError(f"--scorer {cfg.scorer} is not among --scorers {','.join(cfg.scorers)}; add it")
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    t0 = time.perf_counter()
    tables, halves = [], []
    for name in names:
        windows = load_data(f"tasks:{name}", lm.tokenizer, seq_len=cfg.seq_len, samples=cfg.samples, seed=cfg.seed,
                            max_positions=limit)
        if len(windows) < MIN_SAMPLES:
            raise ImpruneError(f"task '{name}' has only {len(windows)} items; split-half reliability needs "
                               f"{MIN_SAMPLES}")
        start = time.perf_counter()
        whole, a, b = score_parts(lm, windows, list(cfg.scorers), 2, seed=cfg.seed, batch_size=cfg.batch_size,
                                  progress=progress)
        tables.append(whole)
        halves.append((a, b))
        if progress:
            print(f"  {name:<10} {len(windows)} items, {int(whole.meta['counts'].get('targets', 0))} answer tokens, "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
    if not tables[0].has(cfg.scorer, "head"):
        raise ImpruneError(f"scorer '{cfg.scorer}' has no head values; draw fisher, token_fisher, "
                           "token_second_order or taylor")
    t1 = time.perf_counter()
    accuracy = probe_accuracy(lm, list(names), cfg.samples, cfg.seed, cfg.batch_size)
    agreement, cross = {}, {}
    for s in cfg.scorers if len(names) > 1 else ():  # similarity needs other tasks
        if tables[0].has(s, "head"):
            agreement[s], m = map_agreement(dict(zip(names, halves)), s)
            cross[s] = m.tolist()
    result = ProbeResult(list(names), tables, halves, accuracy, agreement, cross,
                         seconds={"scoring": t1 - t0, "accuracy": time.perf_counter() - t1})
    if cfg.validate:
        add_causal(lm, result, cfg, progress)
    return result


def add_causal(lm: LoadedModel, result: ProbeResult, cfg: ProbeConfig, progress: bool = False) -> ProbeResult:
    """The causal matrix of ``result``'s maps (``pruning.eval.causal``), set on ``result``."""
    start = time.perf_counter()
    base = result.accuracy if cfg.validate_items == cfg.samples else None
    result.causal = causal_matrix(lm, dict(zip(result.tasks, result.tables)), cfg.scorer, cfg.validate_heads,
                                  cfg.validate_items, cfg.seed, cfg.batch_size, base, progress)
    result.seconds["causal"] = time.perf_counter() - start
    return result


def markdown(result: ProbeResult, scorer: str, model: str = "") -> str:
    """The probe report: per-task accuracy / reliability / similarity table, every scorer's reliability, the causal
    matrix with its diagonal and off-diagonal means."""
    acc = {a.task: a for a in result.accuracy}
    lines = [f"# imprune probe{': ' + model if model else ''}", "",
             f"Head maps by **{scorer}** (split-half: Spearman between the maps of two disjoint halves of the items; "
             "others: mean Spearman to the other tasks' half maps).", "",
             "| task | acc | chance | n | split-half | others | map |", "|---|---|---|---|---|---|---|"]
    for g in result.agreement[scorer]:
        a = acc[g.task]
        mark = "task-specific" if g.specific else f"**{SHARED_MARK}**"
        lines.append(f"| {g.task} | {a.acc:.3f} | {a.chance:.3f} | {a.n} | {g.reliability:.3f} | {g.similarity:.3f} "
                     f"| {mark} |")
    if len(result.agreement) > 1:
        lines += ["", "Split-half reliability / similarity per scorer (mean over tasks; tasks marked specific):", "",
                  "| scorer | split-half | others | specific |", "|---|---|---|---|"]
        for s, gs in result.agreement.items():
            n = len(gs)
            lines.append(f"| {s} | {sum(g.reliability for g in gs) / n:.3f} | {sum(g.similarity for g in gs) / n:.3f}"
                         f" | {sum(g.specific for g in gs)} / {n} |")
    c = result.causal
    if c is not None:
        summ = c.summary()
        lines += ["", f"## Causal check: top {c.k} heads of each task's {c.scorer} map removed",
                  "", "Answer NLL increase (nats per answer token); rows: whose heads were removed, columns: task "
                  "measured.", "", "| removed \\ measured | " + " | ".join(c.tasks) + " | specificity |",
                  "|---|" + "---|" * (len(c.tasks) + 1)]
        for i, t in enumerate(c.tasks):
            row = " | ".join(f"{float(v):+.3f}" for v in c.nll_rise[i])
            lines.append(f"| {t} | {row} | {summ['nll_rise']['specificity'][t]:+.3f} |")
        for name, what in (("nll_rise", "answer NLL increase"), ("acc_drop", "accuracy drop")):
            lines.append("")
            lines.append(f"{what}: diagonal mean {summ[name]['diagonal_mean']:+.3f}, off-diagonal mean "
                         f"{summ[name]['off_diagonal_mean']:+.3f}")
        lines += ["", "Accuracy drop:", "", "| removed \\ measured | " + " | ".join(c.tasks) + " |",
                  "|---|" + "---|" * len(c.tasks)]
        for i, t in enumerate(c.tasks):
            lines.append(f"| {t} | " + " | ".join(f"{float(v):+.3f}" for v in c.acc_drop[i]) + " |")
    return "\n".join(lines) + "\n"
