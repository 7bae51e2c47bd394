"""Measured importance: the loss increase when one group is removed (the ground truth scorers are judged by).

For every group at a granularity, ``measure_ablation`` removes that group alone, runs the held-out windows and
records ``delta = mean token NLL (group removed) - mean token NLL (nothing removed)`` on the same windows, in
nats per predicted token (``importance.engine.objective.token_nll``: the loss every scorer and perplexity uses).

What "removed" means (exactly the parameter sets of the table's groups, ``importance.scorers``):
  head h        the q rows of head h and the o columns of head h, zeroed through the canonical views
                (``Component.update_weight_``), so the head's output is zero whatever the keys and values are
  kv_group g    the k and v rows of KV head g together with its query heads (q rows + o columns)
  component     the whole component weight (a norm: its weight vector)
  layer         the whole block bypassed: its output is its input (the residual stream passes through)
  attn / mlp    one residual branch (sub-block) of the block adds zero: its last module's output is zeros
                (``importance.arch.branches.zeroed``; used by ``--method blocks``, not a table granularity)
Biases: a bias entry is zeroed with its row when the row belongs to the group (q/k/v rows of a head, every row
of a component, a norm's bias), and kept when the group only takes input columns (the o bias is shared by all
heads: zeroing it would remove more than the head). This is the same rule as the scorers' row statistics,
which include the bias term of a row and none for a column. Zeroing a parameter is what the scorers' mask
gradients estimate, so on Gemma-style norms (output ``(1 + w) * x_hat``) removing a norm means ``w = 0``
(scale 1), the same quantity taylor and fisher estimate. A layer is bypassed rather than zeroed because
zeroing a post-norm block (BERT) does not give the identity; on pre-norm models (Llama) the two agree exactly
(tested): zero attention and MLP outputs add exactly 0.0 to the residual. Weights are snapshotted before and
copied back afterwards, bit for bit, also when an exception interrupts.

The cached-input shortcut (``Replay``): removing a group of block l changes nothing that enters block l, so
one plain forward per batch records every block's output, and each ablation then runs the model's own forward
with blocks 0..l-1 replaced by their recorded outputs (a block's ``forward`` temporarily returns the cached
tensor). Only blocks l..L-1, the final norm and the head are computed, by the model's own code: no
per-architecture re-implementation of the tail (Gemma2's logit soft-capping, OPT's output projection, Granite's
logit scaling all stay), and masked LMs work too because ``token_nll`` masks deterministically. The recorded
outputs of every batch stay in memory (windows x seq_len x hidden x layers floats: 4 x 256 x 576 x 30 x 4 B =
71 MB for SmolLM2). The shortcut is used only where it is exact: every block must run once per forward, and a
check that replaying all blocks but the last reproduces the unablated loss must pass; otherwise every ablation
runs a full forward, and the result says so. This runner lives here for sharing; it replays recorded outputs
of an unchanged prefix, so it is not the block-by-block runner that sequential pruning needs.

Reliability: the per-window changes are kept, so ``Ablation.reliability`` can say how well the measured ranking
agrees with itself across two halves of the held-out windows: with few held-out tokens the small effects of
single heads are mostly noise, and no scorer can agree with a noisy measurement better than about the square
root of the measurement's agreement with a repeat of itself.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from importance.arch.branches import BRANCHES, block_branch, first_input, zeroed
from importance.arch.canonical import Block, Component, ModelMap, model_map
from importance.data.sources import Batch, Windows
from importance.engine.objective import require_loss, token_nll
from importance.engine.stats import Statistics
from importance.errors import ImpruneError
from importance.models.load import input_device
from importance.table import ImportanceTable, build_table

GRANULARITIES = ("head", "kv_group", "component", "layer")
SCORER = "ablation"  # the pseudo-scorer name of the ground truth inside an ImportanceTable
DEFINITION = ("mean token NLL increase on held-out windows when the group alone is removed: heads / KV groups / "
              "components zeroed through the canonical views (row biases with their rows, column-shared biases "
              "kept), layers bypassed (output = input)")


@dataclass(frozen=True)
class Group:
    """One removable group: ``granularity`` head | kv_group | component | layer, in block ``layer``;
    ``index`` the head / KV-group index or the component's column in the table; ``name`` the component."""

    layer: int
    granularity: str
    index: int = 0
    name: str = ""

    @property
    def label(self) -> str:
        if self.granularity in ("layer", *BRANCHES):
            return f"L{self.layer}" + ("" if self.granularity == "layer" else f" {self.granularity}")
        if self.granularity == "component":
            return f"L{self.layer} {self.name}"
        return f"L{self.layer} {'h' if self.granularity == 'head' else 'kv'}{self.index}"


def groups(mm: ModelMap, granularity: str) -> list[Group]:
    """Every group of ``mm`` at ``granularity`` (a component's index is its column in ``mm.component_names()``)."""
    if granularity not in GRANULARITIES:
        raise ImpruneError(f"unknown granularity '{granularity}'; use one of {', '.join(GRANULARITIES)}")
    names = mm.component_names()
    out = []
    for b in mm.blocks:
        if granularity == "layer":
            out.append(Group(b.index, "layer"))
        elif granularity == "component":
            out += [Group(b.index, "component", j, n) for j, n in enumerate(names) if n in b.components]
        elif {"attn.q", "attn.o"} <= set(b.components):
            count = b.n_heads if granularity == "head" else b.n_kv_heads
            out += [Group(b.index, granularity, i) for i in range(count)]
    if not out:
        raise ImpruneError(f"this model has no '{granularity}' groups to ablate; use --granularity component or layer")
    return out


# ----------------------------------------------------------------------------------------- removal

def _bias_rows(comp: Component) -> torch.Tensor | None:
    """Indices into the module's bias of this component's rows (None: no bias)."""
    bias = getattr(comp.module, "bias", None) if comp.param == "weight" and comp.kind != "experts" else None
    if not isinstance(bias, torch.Tensor):
        return None
    idx = torch.arange(bias.shape[0], device=bias.device)
    return idx if comp.rows is None else idx[comp.rows]


def _zero_rows(comp: Component, rows: slice) -> None:
    """Zero output rows ``rows`` of the view and the bias entries of those rows."""

    def fn(w: torch.Tensor) -> torch.Tensor:
        w = w.clone()
        w[rows] = 0
        return w

    comp.update_weight_(fn)
    idx = _bias_rows(comp)
    if idx is not None:
        with torch.no_grad():
            comp.module.bias.index_fill_(0, idx[rows], 0)


def _zero_cols(comp: Component, cols: slice) -> None:
    """Zero input columns ``cols`` of the view (the bias, shared by every column, is kept)."""

    def fn(w: torch.Tensor) -> torch.Tensor:
        w = w.clone()
        w[..., cols] = 0
        return w

    comp.update_weight_(fn)


def _zero_component(comp: Component) -> None:
    """The whole view and the bias entries of its rows (a LayerNorm's whole bias)."""
    comp.update_weight_(torch.zeros_like)
    idx = _bias_rows(comp)
    if idx is not None:
        with torch.no_grad():
            comp.module.bias.index_fill_(0, idx, 0)


def _touched(block: Block, group: Group) -> list[Component]:
    c = block.components
    if group.granularity == "component":
        return [c[group.name]]
    names = ("attn.q", "attn.o") + (("attn.k", "attn.v") if group.granularity == "kv_group" else ())
    return [c[n] for n in names if n in c]


def _zero(block: Block, group: Group) -> None:
    if group.granularity == "component":
        _zero_component(block.components[group.name])
        return
    d = block.head_dim
    if group.granularity == "kv_group":
        per = block.n_heads // max(block.n_kv_heads, 1)
        heads = range(group.index * per, (group.index + 1) * per)
        for name in ("attn.k", "attn.v"):
            if name in block.components:
                _zero_rows(block.components[name], slice(group.index * d, (group.index + 1) * d))
    else:
        heads = range(group.index, group.index + 1)
    span = slice(heads[0] * d, (heads[-1] + 1) * d)  # query heads of one group are contiguous
    _zero_rows(block.components["attn.q"], span)
    _zero_cols(block.components["attn.o"], span)


def _bypass(shift: torch.Tensor | None = None):
    """A forward hook making a block pass its input through, plus the constant ``shift`` [d] when given (its
    branches' means: a compensated removal)."""
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        hidden = first_input(args, kwargs)
        if shift is not None:
            hidden = hidden + shift.to(hidden.dtype)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden
    return hook


@contextlib.contextmanager
def removed(mm: ModelMap, group: Group | None, means: Mapping[tuple[int, str], torch.Tensor] | None = None
            ) -> Iterator[None]:
    """Inside the block, ``group`` is removed from the model (None: nothing is); restored bit for bit after.
    ``means``: {(layer, kind): [d]} constants that removed sub-blocks add instead of zero (a compensated removal;
    a removed layer adds the sum of its sub-blocks' constants)."""
    if group is None:
        yield
        return
    block = mm.blocks[group.layer]
    if group.granularity == "layer":
        shift = [v for (layer, _), v in (means or {}).items() if layer == group.layer]  # [d] each
        hook = _bypass(torch.stack(shift).sum(0) if shift else None)
        handle = block.module.register_forward_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
        return
    if group.granularity in BRANCHES:
        value = None if means is None else means.get((group.layer, group.granularity))
        with zeroed(mm, block_branch(block, mm, group.granularity), value):
            yield
        return
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for comp in _touched(block, group):
        for p in (getattr(comp.module, comp.param), getattr(comp.module, "bias", None)):
            if isinstance(p, torch.Tensor) and id(p) not in saved:
                saved[id(p)] = (p, p.detach().clone())
    try:
        _zero(block, group)
        yield
    finally:
        with torch.no_grad():
            for p, copy in saved.values():
                p.copy_(copy)


# ----------------------------------------------------------------------------------------- the shortcut

class Replay:
    """Held-out batches with every block's output recorded once; ``nll(start)`` re-runs from block ``start``.

    ``base`` is the unablated mean token NLL (a plain full forward), ``base_sums`` [N] its per-window NLL sums
    and ``window_tokens`` [N] the predicted tokens of each window; ``shortcut`` says whether ``nll`` replays the
    prefix (else it runs full forwards; ``reason`` says why).
    """

    def __init__(self, model: Any, mm: ModelMap, windows: Windows, task: str, batch_size: int = 4,
                 shortcut: bool = True) -> None:
        require_loss(task, "ablation (measured loss increase)")
        self.model, self.mm, self.task = model, mm, task
        device = input_device(model)
        self.batches: list[Batch] = [b.to(device) for b in windows.batches(batch_size)]
        self.outputs: list[list[Any]] = [[] for _ in self.batches]  # [batch][block] recorded block outputs
        self.shortcut, self.reason = shortcut, "" if shortcut else "disabled"
        calls = [0] * mm.n_layers
        current: dict[int, Any] = {}

        def record(i: int):
            def hook(module: torch.nn.Module, args: tuple, out: Any) -> None:
                calls[i] += 1
                current[i] = out
            return hook

        handles = [b.module.register_forward_hook(record(b.index)) for b in mm.blocks] if shortcut else []
        sums, counts = [], []
        try:
            with torch.no_grad():
                for k, batch in enumerate(self.batches):
                    current.clear()
                    nll, counted = token_nll(model, batch, task)
                    sums.append(nll.double().sum(1).cpu())
                    counts.append(counted.sum(1).cpu())
                    self.outputs[k] = [current.get(i) for i in range(mm.n_layers)]
        finally:
            for h in handles:
                h.remove()
        self.base_sums = torch.cat(sums)  # [N] float64
        self.window_tokens = torch.cat(counts)  # [N]
        self.tokens = int(self.window_tokens.sum())
        if self.tokens == 0:
            raise ImpruneError("the held-out windows have no predicted tokens; give longer windows or more data")
        self.base = float(self.base_sums.sum()) / self.tokens
        if shortcut and any(c != len(self.batches) for c in calls):
            self._disable("a block does not run exactly once per forward")
        elif shortcut and mm.n_layers > 1:
            check = self.nll(mm.n_layers - 1)
            if abs(check - self.base) > 1e-5 * max(1.0, abs(self.base)):
                self._disable(f"replaying the recorded block outputs gave NLL {check:.6f}, not {self.base:.6f}")

    def _disable(self, reason: str) -> None:
        self.shortcut, self.reason = False, reason
        self.outputs = [[] for _ in self.batches]
        warnings.warn(f"imprune: cached-input shortcut off ({reason}); every ablation runs a full forward",
                      stacklevel=3)

    @contextlib.contextmanager
    def _replayed(self, start: int, k: int) -> Iterator[None]:
        """Blocks 0..start-1 return their recorded outputs of batch ``k`` instead of computing."""
        patched = []
        try:
            for b in self.mm.blocks[:start]:
                out = self.outputs[k][b.index]
                if b.index == start - 1:  # the one that feeds computation: a private copy
                    out = out.clone() if isinstance(out, torch.Tensor) else out
                patched.append((b.module, b.module.__dict__.get("forward")))
                b.module.forward = lambda *a, _out=out, **kw: _out
            yield
        finally:
            for module, own in patched:
                if own is None:
                    del module.forward
                else:
                    module.forward = own

    @torch.no_grad()
    def window_sums(self, start: int = 0) -> torch.Tensor:
        """[N] float64 NLL sum of each window, blocks before ``start`` replayed (when the shortcut is on)."""
        start = start if self.shortcut else 0
        sums = []
        for k, batch in enumerate(self.batches):
            with self._replayed(start, k):
                nll, _ = token_nll(self.model, batch, self.task)
            sums.append(nll.double().sum(1).cpu())
        return torch.cat(sums)

    def nll(self, start: int = 0) -> float:
        """Mean token NLL over all windows, blocks before ``start`` replayed (when the shortcut is on)."""
        return float(self.window_sums(start).sum()) / self.tokens

    def window_deltas(self, group: Group | None, means: Mapping[tuple[int, str], torch.Tensor] | None = None
                      ) -> torch.Tensor:
        """[N] float64: each window's NLL sum with ``group`` removed minus without (None: nothing removed);
        ``means`` as in ``removed``."""
        with removed(self.mm, group, means):
            return self.window_sums(group.layer if group is not None else self.mm.n_layers) - self.base_sums

    def delta(self, group: Group | None, means: Mapping[tuple[int, str], torch.Tensor] | None = None) -> float:
        """Loss increase (nats per predicted token) when ``group`` alone is removed (None: nothing)."""
        return float(self.window_deltas(group, means).sum()) / self.tokens


# ----------------------------------------------------------------------------------------- measuring

@dataclass
class Ablation:
    """Measured loss increases: ``values[granularity]`` is [n_groups] aligned with ``groups[granularity]``;
    ``window_deltas[granularity]`` [n_groups, N] the NLL-sum change of each held-out window (for reliability)."""

    base_nll: float
    tokens: int
    window_tokens: torch.Tensor  # [N] predicted tokens per held-out window
    groups: dict[str, list[Group]] = field(default_factory=dict)
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    window_deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    shortcut: bool = True
    reason: str = ""

    def matrix(self, granularity: str, n_layers: int, width: int) -> torch.Tensor:
        """[L, width] (NaN where a block has no such group); for 'layer': [L]."""
        if granularity == "layer":
            m = torch.full((n_layers,), float("nan"))
            for g, v in zip(self.groups[granularity], self.values[granularity].tolist()):
                m[g.layer] = v
            return m
        m = torch.full((n_layers, width), float("nan"))
        for g, v in zip(self.groups[granularity], self.values[granularity].tolist()):
            m[g.layer, g.index] = v
        return m

    def reliability(self, granularity: str) -> dict[str, float] | None:
        """How reproducible the measured ranking is (classical test theory, applied to ranks):

        ``split_half``  Spearman correlation between the groups' loss increases measured on two interleaved
                        halves of the held-out windows
        ``full_set``    its Spearman-Brown step-up 2r / (1 + r): the expected agreement of this measurement with
                        a repeat of itself on as many fresh windows
        ``ceiling``     sqrt(full_set): about the best correlation ANY predictor, even one knowing the exact
                        expected loss increases, can reach against this noisy measurement
        None with fewer than two windows; when the split-half correlation is undefined or not positive,
        ``full_set`` and ``ceiling`` are NaN (too noisy for a ceiling) and ``split_half`` says why."""
        from importance.validate.faithfulness import spearman

        d = self.window_deltas[granularity]
        if d.shape[1] < 2:
            return None
        halves = [torch.arange(d.shape[1])[i::2] for i in (0, 1)]
        a, b = (d[:, h].sum(1) / self.window_tokens[h].sum().clamp_min(1) for h in halves)
        r = spearman(a, b)
        full = 2 * r / (1 + r) if r == r and r > 0 else float("nan")
        return {"split_half": r, "full_set": full, "ceiling": math.sqrt(full) if full == full else float("nan"),
                "windows": int(d.shape[1])}


def measure_ablation(model: Any, windows: Windows, task: str, granularities: tuple[str, ...] = ("head", "layer"),
                     batch_size: int = 4, shortcut: bool = True, progress: bool = True,
                     mm: ModelMap | None = None) -> Ablation:
    """Remove every group at each granularity alone and measure the mean token NLL increase on ``windows``."""
    mm = mm or model_map(model)
    for gran in granularities:
        groups(mm, gran)  # validate all before the slow part
    was_training = model.training
    model.eval()
    try:
        replay = Replay(model, mm, windows, task, batch_size, shortcut)
        result = Ablation(replay.base, replay.tokens, replay.window_tokens, shortcut=replay.shortcut,
                          reason=replay.reason)
        for gran in granularities:
            todo = groups(mm, gran)
            per_window = torch.empty(len(todo), len(replay.window_tokens), dtype=torch.float64)
            values = torch.empty(len(todo), dtype=torch.float64)
            start = time.perf_counter()
            bar = tqdm(todo, desc=f"ablate {gran}", unit="group", disable=not progress, leave=False)
            for i, group in enumerate(bar):
                per_window[i] = replay.window_deltas(group)
                values[i] = float(per_window[i].sum()) / replay.tokens
                bar.set_postfix(group=group.label, dnll=f"{values[i]:+.3f}", refresh=False)
            bar.close()
            result.groups[gran], result.values[gran], result.window_deltas[gran] = todo, values, per_window
            result.seconds[gran] = time.perf_counter() - start
    finally:
        model.train(was_training)
    return result


def ablation_table(result: Ablation, mm: ModelMap, meta: dict[str, Any] | None = None) -> ImportanceTable:
    """The measurement as an ImportanceTable with one pseudo-scorer ``ablation`` (same matrices as the scorers':
    ``ablation/{head|kv_group|component}`` [L, X] and ``ablation/layer`` [L]), so every table tool reads it."""
    table = build_table(Statistics(), mm, [], meta=meta)
    widths = {"head": mm.max_size("head"), "kv_group": mm.max_size("kv_group"), "component": len(table.components)}
    for gran in result.values:
        m = result.matrix(gran, mm.n_layers, widths.get(gran, 0))
        table.tensors[f"{SCORER}/{gran}"] = m.float()
    table.meta.update(scorers=[SCORER], estimators={SCORER: DEFINITION},
                      ablation={"base_nll": result.base_nll, "tokens": result.tokens, "shortcut": result.shortcut,
                                "shortcut_reason": result.reason, "granularities": list(result.values),
                                "reliability": {g: result.reliability(g) for g in result.values},
                                "seconds": {k: round(v, 3) for k, v in result.seconds.items()}})
    return table


def removal_statistics(model: Any, windows: Windows, task: str, batch_size: int = 4, progress: bool = True,
                       mm: ModelMap | None = None, granularities: tuple[str, ...] = ("layer",)) -> Statistics:
    """The measured scorers' sums: ``{l}|block|removal`` = NLL-sum increase over ``windows`` when block l is
    bypassed ('layer', the ``removal`` scorer), ``{l}|head|removal`` [H] the same with each head of block l zeroed
    alone ('head', ``head_removal``), and ``-|run|removal_tokens`` the predicted tokens; plain sums, so shards
    merge by addition."""
    result = measure_ablation(model, windows, task, granularities, batch_size=batch_size, progress=progress, mm=mm)
    mm = mm or model_map(model)
    stats = Statistics()
    for gran in granularities:
        if gran == "layer":
            for group, deltas in zip(result.groups[gran], result.window_deltas[gran]):
                stats.add(f"{group.layer}|block|removal", deltas.sum().reshape(1))
        else:
            sums = result.window_deltas[gran].sum(1)  # [n_groups] float64
            for b in mm.blocks:
                idx = [i for i, g in enumerate(result.groups[gran]) if g.layer == b.index]
                if idx:
                    stats.add(f"{b.index}|{gran}|removal", sums[idx].float())  # [H], groups in index order
    stats.add("-|run|removal_tokens", torch.tensor(float(result.tokens)))
    return stats
