"""Ablation ground truth, rank statistics and ``imprune validate``: exact small cases, independent computations."""

from __future__ import annotations

import contextlib
import itertools
import json
import math

import numpy as np
import pytest
import torch
from test_collect import _model, _windows

from importance.arch.canonical import model_map
from importance.data.sources import Windows
from importance.engine.objective import token_nll
from importance.errors import ImpruneError
from importance.models.load import load_model
from importance.scoring import score
from importance.table import ImportanceTable
from importance.validate.ablation import Ablation, Group, Replay, ablation_table, groups, measure_ablation, removed
from importance.validate.faithfulness import agreement, bottom_overlap, compare, kendall_tau_b, rank, spearman

SHORTCUT_ARCHS = ["llama", "gpt2", "gpt_neox", "gemma2", "qwen3", "bert", "phi3", "qwen2_moe"]


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _full_nll(lm, windows: Windows) -> float:
    """Reference: the plain model over all windows at once, no replay, no hooks."""
    with torch.no_grad():
        nll, counted = token_nll(lm.model, next(windows.batches(len(windows))), lm.task)
    return float(nll.double().sum()) / int(counted.sum())


# ----------------------------------------------------------------------------------------- rank statistics

def _tau_b_by_pairs(x: list[float], y: list[float]) -> float:
    c = d = tx = ty = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        a, b = (x[i] > x[j]) - (x[i] < x[j]), (y[i] > y[j]) - (y[i] < y[j])
        tx += a == 0
        ty += b == 0
        c += a * b > 0
        d += a * b < 0
    n0 = len(x) * (len(x) - 1) / 2
    return (c - d) / math.sqrt((n0 - tx) * (n0 - ty))


def test_ranks_average_ties() -> None:
    assert rank(torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0])).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]
    assert rank(torch.tensor([2.0, 2.0])).tolist() == [1.5, 1.5]


@pytest.mark.parametrize("n", [2, 7, 60, 700])
def test_kendall_and_spearman_against_plain_definitions(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    x = torch.randint(0, 6, (n,), generator=g).double()  # many ties
    y = x + torch.randint(0, 4, (n,), generator=g).double()
    assert kendall_tau_b(x, y, chunk=64) == pytest.approx(_tau_b_by_pairs(x.tolist(), y.tolist()), abs=1e-12)
    rx, ry = rank(x), rank(y)
    pearson = torch.corrcoef(torch.stack([rx, ry]))[0, 1]
    assert spearman(x, y) == pytest.approx(float(pearson), abs=1e-12)


def test_rank_statistics_against_scipy_when_installed() -> None:
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 9, (120,), generator=g).double(), torch.randn(120, generator=g).double()
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-10)
    assert kendall_tau_b(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-10)


def test_exact_small_cases() -> None:
    up, down = torch.arange(8.0), -torch.arange(8.0)
    assert spearman(up, up ** 3) == pytest.approx(1.0) and kendall_tau_b(up, up ** 3) == pytest.approx(1.0)
    assert spearman(up, down) == pytest.approx(-1.0) and kendall_tau_b(up, down) == pytest.approx(-1.0)
    assert math.isnan(spearman(up, torch.zeros(8)))  # a constant has no ranking
    # bottom 25% of 8 = 2 groups: prediction says {0, 1}, measurement says {1, 5}
    assert bottom_overlap(up, torch.tensor([3.0, 0.0, 4.0, 5.0, 6.0, 1.0, 7.0, 8.0])) == 0.5
    assert bottom_overlap(up, down) == 0.0
    with pytest.raises(ImpruneError):
        spearman(up, up[:3])


# ----------------------------------------------------------------------------------------- removal

@pytest.mark.parametrize("model_type", SHORTCUT_ARCHS)
def test_cached_input_shortcut_equals_a_full_forward(model_type: str) -> None:
    lm = _model(model_type)
    mm = model_map(lm.model)
    w = _windows(seed=5)
    fast = Replay(lm.model, mm, w, lm.task, batch_size=2)
    slow = Replay(lm.model, mm, w, lm.task, batch_size=2, shortcut=False)
    assert fast.shortcut and not slow.shortcut
    assert fast.base == pytest.approx(_full_nll(lm, w), rel=1e-6)
    for start in range(mm.n_layers + 1):  # replaying blocks < start changes nothing
        assert fast.nll(start) == fast.base
    some = groups(mm, "head") + groups(mm, "layer") + groups(mm, "component")[::5]
    for group in some:
        assert fast.delta(group) == pytest.approx(slow.delta(group), abs=1e-6), group.label


def test_ablating_nothing_gives_zero() -> None:
    lm = _model("llama")
    mm = model_map(lm.model)
    replay = Replay(lm.model, mm, _windows(), lm.task, batch_size=2)
    assert replay.delta(None) == 0.0
    group = Group(1, "head", 3)
    with removed(mm, group):  # a head whose weights are already zero: removing it again changes nothing
        inner = Replay(lm.model, mm, _windows(), lm.task, batch_size=2)
        assert inner.delta(group) == 0.0
        assert inner.delta(Group(1, "head", 2)) != 0.0


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox", "phi3", "qwen2_moe", "bert"])
def test_every_removal_is_restored_bit_for_bit(model_type: str) -> None:
    lm = _model(model_type)
    mm = model_map(lm.model)
    before = _state(lm.model)
    hooks_before = [dict(b.module._forward_hooks) for b in mm.blocks]  # transformers may own some hooks
    result = measure_ablation(lm.model, _windows(), lm.task, ("head", "kv_group", "component", "layer"),
                              batch_size=2, progress=False, mm=mm)
    assert _same_state(lm.model, before)
    assert all(torch.isfinite(v).all() for v in result.values.values())
    with pytest.raises(RuntimeError), removed(mm, Group(0, "component", 0, "attn.q")):
        raise RuntimeError("interrupted")
    assert _same_state(lm.model, before)
    assert [dict(b.module._forward_hooks) for b in mm.blocks] == hooks_before  # no bypass hook left behind


def test_head_removal_equals_zeroing_the_modules_by_hand() -> None:
    """Llama: head h = q_proj rows h*d:(h+1)*d and o_proj columns, computed without the canonical views."""
    lm = load_model("random:llama")
    mm = model_map(lm.model)
    w = _windows(seed=2)
    replay = Replay(lm.model, mm, w, lm.task, batch_size=2)
    attn = lm.model.model.layers[1].self_attn
    d = mm.blocks[1].head_dim
    measured = replay.delta(Group(1, "head", 2))
    with torch.no_grad():
        attn.q_proj.weight[2 * d:3 * d] = 0
        attn.o_proj.weight[:, 2 * d:3 * d] = 0
    assert measured == pytest.approx(_full_nll(lm, w) - replay.base, abs=1e-6)


def test_biases_follow_rows_and_shared_biases_stay() -> None:
    lm = load_model("random:gpt2")
    with torch.no_grad():
        for p in lm.model.parameters():
            p.add_(0.1)  # non-zero biases
    mm = model_map(lm.model)
    attn = lm.model.transformer.h[0].attn
    d = mm.blocks[0].head_dim
    hidden = attn.c_proj.weight.shape[0]
    with removed(mm, Group(0, "kv_group", 1)):  # GPT-2 has no GQA: a KV group is q, k, v of one head
        for part in range(3):  # c_attn bias = [q | k | v]; head 1's slice of each is zero, the rest is not
            b = attn.c_attn.bias[part * hidden:(part + 1) * hidden]
            assert (b[d:2 * d] == 0).all() and (b[:d] != 0).all()
        assert (attn.c_proj.bias != 0).all()  # the output bias is shared by every head: kept
        assert (attn.c_proj.weight[d:2 * d] == 0).all() and (attn.c_proj.weight[:d] != 0).all()  # Conv1D [in, out]
    with removed(mm, Group(0, "component", 0, "mlp.down")):
        assert (lm.model.transformer.h[0].mlp.c_proj.bias == 0).all()
    with removed(mm, Group(0, "component", 0, "norm.attn_in")):
        ln = lm.model.transformer.h[0].ln_1
        assert (ln.weight == 0).all() and (ln.bias == 0).all()


def test_layer_bypass_equals_zeroing_every_component_on_llama() -> None:
    lm = load_model("random:llama")
    mm = model_map(lm.model)
    w = _windows(seed=4)
    replay = Replay(lm.model, mm, w, lm.task, batch_size=3)
    for block in mm.blocks:
        bypassed = replay.delta(Group(block.index, "layer"))
        zeroed = [Group(block.index, "component", 0, n) for n in block.components]
        with contextlib.ExitStack() as stack:
            for g in zeroed:
                stack.enter_context(removed(mm, g))
            assert _full_nll(lm, w) - replay.base == pytest.approx(bypassed, abs=1e-6)
        assert bypassed != 0.0


def test_reliability_splits_the_windows_in_two_halves() -> None:
    lm = _model("llama")
    w = _windows(n=4, pad_last=0)
    result = measure_ablation(lm.model, w, lm.task, ("head",), batch_size=3, progress=False)
    d = result.window_deltas["head"]  # [groups, windows]
    assert d.shape == (len(result.groups["head"]), 4)
    assert torch.allclose(d.sum(1) / result.tokens, result.values["head"], rtol=0, atol=1e-12)
    halves = [d[:, [0, 2]].sum(1), d[:, [1, 3]].sum(1)]  # equal token counts: sums rank like means
    rel = result.reliability("head")
    assert rel["split_half"] == pytest.approx(spearman(*halves)) and rel["windows"] == 4
    if rel["split_half"] > 0:
        assert rel["full_set"] == pytest.approx(2 * rel["split_half"] / (1 + rel["split_half"]))
        assert rel["ceiling"] == pytest.approx(math.sqrt(rel["full_set"]))
    a = Ablation(0.0, 4, torch.ones(4), values={"x": torch.zeros(3)},
                 window_deltas={"x": torch.tensor([[1.0, 1.0, 2.0, 2.0], [2.0, 3.0, 4.0, 5.0], [5.0, 5.0, 6.0, 6.0]])})
    assert a.reliability("x") == {"split_half": 1.0, "full_set": 1.0, "ceiling": 1.0, "windows": 4}
    one = measure_ablation(lm.model, w.subset([0]), lm.task, ("layer",), progress=False)
    assert one.reliability("layer") is None


# ----------------------------------------------------------------------------------------- the one-head model

def _periodic(n: int, seed: int, t: int = 24) -> Windows:
    """Sequences repeating three random tokens: the next token is predictable only by looking back."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 25, (n, 3), generator=g).repeat(1, t // 3)
    ones = torch.ones_like(ids)
    return Windows(ids, ones, ones.bool(), {"data": "periodic"})


def _one_head_model(keep: tuple[int, int] = (1, 2)):
    """Tiny Llama trained to continue periodic sequences with every attention head but ``keep`` zeroed (their q
    rows and o columns held at 0): the one head that can look back carries the whole signal."""
    lm = load_model("random:llama")
    mm = model_map(lm.model)
    d = mm.blocks[0].head_dim
    masks = []
    for b in mm.blocks:
        for h in range(b.n_heads):
            if (b.index, h) == keep:
                continue
            masks.append((b.components["attn.q"].module.weight, (slice(h * d, (h + 1) * d), slice(None))))
            masks.append((b.components["attn.o"].module.weight, (slice(None), slice(h * d, (h + 1) * d))))

    def clamp() -> None:
        with torch.no_grad():
            for p, idx in masks:
                p[idx] = 0

    clamp()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        opt = torch.optim.Adam(lm.model.parameters(), lr=3e-3)
        for step in range(120):  # fresh sequences every step: it learns to copy, not to memorise
            opt.zero_grad()
            nll, counted = token_nll(lm.model, next(_periodic(16, seed=100 + step).batches(16)), lm.task)
            (nll.sum() / counted.sum()).backward()
            opt.step()
            clamp()
    lm.model.zero_grad(set_to_none=True)
    return lm, mm


def test_one_head_carrying_the_signal_is_first_for_every_gradient_scorer_and_the_ablation() -> None:
    keep = (1, 2)
    lm, mm = _one_head_model(keep)
    table = score(lm, _periodic(6, seed=1), ["taylor", "fisher"], batch_size=3, progress=False)
    result = measure_ablation(lm.model, _periodic(6, seed=2), lm.task, ("head",), batch_size=3, progress=False, mm=mm)
    truth = ablation_table(result, mm)
    measured = truth.matrix("ablation", "head")
    assert result.base_nll < 1.5 and measured[keep] > 1.0  # it learned the task, and only through that head
    others = torch.ones_like(measured, dtype=torch.bool)
    others[keep] = False
    assert (measured[others] == 0).all()  # zero weights: removing them changes nothing, exactly
    for scorer in ("taylor", "fisher"):
        m = table.matrix(scorer, "head")
        assert m[keep] > 0 and (m[others] == 0).all(), scorer
        assert divmod(int(m.argmax()), m.shape[1]) == keep
    res = compare(table, truth, "head")
    assert res["scorers"]["taylor"]["spearman"] == pytest.approx(1.0)  # one positive value, the rest tied at 0


# ----------------------------------------------------------------------------------------- tables, agreement

def _oracle(truth: ImportanceTable, transform) -> ImportanceTable:
    """A score table whose scorer 'oracle' is ``transform`` of the measurement (an independent predictor)."""
    tensors = {k.replace("ablation/", "oracle/"): transform(v) for k, v in truth.tensors.items()
               if k.startswith("ablation/")}
    tensors.update({k: v for k, v in truth.tensors.items() if k.startswith("count/")})
    return ImportanceTable(tensors, {**truth.meta, "scorers": ["oracle"]})


def test_ablation_table_has_the_scorer_layout_and_round_trips(tmp_path) -> None:
    lm = _model("qwen3")
    mm = model_map(lm.model)
    scores = score(lm, _windows(), ["taylor", "magnitude"], batch_size=3, progress=False)
    result = measure_ablation(lm.model, _windows(seed=1), lm.task, ("head", "component", "layer"), batch_size=3,
                              progress=False, mm=mm)
    truth = ablation_table(result, mm)
    for gran in ("head", "component"):
        assert truth.matrix("ablation", gran).shape == scores.matrix("taylor", gran).shape
    assert truth.components == scores.components
    assert torch.equal(torch.isnan(truth.matrix("ablation")), torch.isnan(scores.matrix("taylor")))
    assert truth.layer_scores("ablation").shape == (mm.n_layers,)
    back = ImportanceTable.load(truth.save(tmp_path / "ablation"))
    assert all(torch.equal(back.tensors[k], v) for k, v in truth.tensors.items())
    # a perfect monotone predictor and a reversed one
    for gran in ("head", "component", "layer"):
        good = compare(_oracle(truth, lambda v: torch.exp(v)), truth, gran)["scorers"]["oracle"]
        bad = compare(_oracle(truth, lambda v: -v), truth, gran)["scorers"]["oracle"]
        assert good["spearman"] == pytest.approx(1.0) and good["kendall"] == pytest.approx(1.0)
        assert good["bottom_overlap"] == 1.0
        assert bad["spearman"] == pytest.approx(-1.0)
    assert agreement(torch.arange(4.0), torch.arange(4.0))["n"] == 4


def _random_table(scorers: list[str], n_layers: int, seed: int) -> ImportanceTable:
    g = torch.Generator().manual_seed(seed)
    comps = ["norm.attn_in", "attn.q", "attn.k", "mlp.up"]
    tensors = {}
    for name in scorers:
        tensors.update({f"{name}/component": torch.rand(n_layers, len(comps), generator=g),
                        f"{name}/head": torch.rand(n_layers, 4, generator=g),
                        f"{name}/layer": torch.rand(n_layers, generator=g)})
    return ImportanceTable(tensors, {"scorers": scorers, "components": comps, "layers": n_layers})


def test_ablation_heatmap_panels_are_rank_percentiles_in_the_table_layout() -> None:
    from importance.viz.validate import ablation_heatmap_figure

    scores, truth = _random_table(["taylor", "fisher"], 30, seed=1), _random_table(["ablation"], 30, seed=2)

    def percentiles(v: torch.Tensor) -> torch.Tensor:  # no ties in random values: rank = position when sorted
        flat = v.flatten()
        return (flat.argsort().argsort().double() / (flat.numel() - 1)).reshape(v.shape)

    for gran, labels in (("component", ["norm.attn_in", "attn.q", "attn.k", "mlp.up"]),
                         ("head", ["h0", "h1", "h2", "h3"])):
        axs = [ax for ax in ablation_heatmap_figure(scores, truth, gran).axes if hasattr(ax, "imprune")]
        assert [ax.imprune.title for ax in axs] == ["ablation (measured)", "taylor", "fisher"]
        for ax, (table, name) in zip(axs, [(truth, "ablation"), (scores, "taylor"), (scores, "fisher")]):
            assert list(ax.imprune.xlabels) == labels and ax.imprune.scale.kind == "rank"
            assert np.allclose(ax.imprune.matrix, percentiles(table.tensors[f"{name}/{gran}"]).numpy())
        assert [t.get_text() for t in axs[0].get_yticklabels()] == [str(i) for i in range(0, 30, 2)]  # thinned
    (ax,) = [ax for ax in ablation_heatmap_figure(scores, truth, "layer").axes if hasattr(ax, "imprune")]
    assert list(ax.imprune.xlabels) == ["ablation", "taylor", "fisher"]
    expected = torch.stack([percentiles(truth.tensors["ablation/layer"]), percentiles(scores.tensors["taylor/layer"]),
                            percentiles(scores.tensors["fisher/layer"])], 1)
    assert np.allclose(ax.imprune.matrix, expected.numpy())


def test_layer_scores_figure_ranks_every_scorer_layer_only_ones_first() -> None:
    from importance.viz.validate import layer_scores_figure

    table = _random_table(["taylor", "fisher"], 12, seed=3)
    g = torch.Generator().manual_seed(4)
    table.tensors["residual_fisher/layer"] = torch.rand(12, generator=g)
    table.meta["scorers"] = ["taylor", "residual_fisher", "fisher"]
    (ax,) = [ax for ax in layer_scores_figure(table).axes if hasattr(ax, "imprune")]
    assert list(ax.imprune.xlabels) == ["residual_fisher", "taylor", "fisher"] and ax.imprune.scale.kind == "rank"
    for j, name in enumerate(ax.imprune.xlabels):
        v = table.tensors[f"{name}/layer"]
        assert np.allclose(ax.imprune.matrix[:, j], (v.argsort().argsort().double() / 11).numpy())


# ----------------------------------------------------------------------------------------- command line

def test_validate_command_writes_everything(tmp_path) -> None:
    from pruning.cli.core import main

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 37} and more{i % 11}." for i in range(800)))
    scores = tmp_path / "scores"
    common = ["--model", "random:llama", "--scores", str(scores), "--data", f"file:{text}", "--tokens", "192",
              "--seq-len", "32", "--eval-data", f"file:{text}", "--eval-tokens", "96", "--eval-seq-len", "32",
              "--quiet"]
    assert main(["validate", *common, "--granularity", "component"]) == 0
    out = scores / "validation"
    doc = json.loads((out / "validation.json").read_text())
    assert doc["schema"] == "imprune.validation/1"
    assert set(doc["granularities"]) == {"component", "layer"}
    assert doc["ground_truth"]["shortcut"] is True and doc["ground_truth"]["groups"]["layer"] == 2
    for res in doc["granularities"].values():
        assert res["best"] in res["scorers"]
        for s in res["scorers"].values():
            assert -1 <= s["spearman"] <= 1 and 0 <= s["bottom_overlap"] <= 1
    for name in doc["figures"].values():
        assert (out / name).stat().st_size > 1000
    truth = ImportanceTable.load(out / "ablation")
    assert truth.scorers == ["ablation"] and truth.has("ablation", "component")
    assert main(["validate", *common]) == 2  # exists, no --overwrite
    assert main(["validate", *common, "--granularity", "head", "--overwrite"]) == 0
    assert json.loads((out / "validation.json").read_text())["granularities"].keys() == {"head", "layer"}
    other = ["--model", "random:llama:layers=3", *common[2:]]
    assert main(["validate", *other, "--out", str(tmp_path / "v2")]) == 2  # table of another model
    assert not (tmp_path / "v2").exists()


# ----------------------------------------------------------------------------------------- SmolLM2

@pytest.mark.integration
def test_smollm2_first_layer_is_catastrophic_and_the_shortcut_is_exact() -> None:
    from importance.data.sources import load_data

    lm = load_model("builtin:smollm2-135m")
    mm = model_map(lm.model)
    w = load_data("austen:eval", lm.tokenizer, seq_len=128, samples=1, seed=0)
    replay = Replay(lm.model, mm, w, lm.task)
    assert replay.shortcut  # replaying all blocks but the last reproduced the loss
    first, middle = replay.delta(Group(0, "layer")), replay.delta(Group(15, "layer"))
    assert first > 2.0 and first > 5 * abs(middle)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_removal_scorer_is_the_layer_ablation_on_the_first_calibration_windows(model_type: str) -> None:
    lm = _model(model_type)
    w = _windows(seed=31, n=5, t=16, pad_last=0)
    t = score(lm, w, ["removal"], batch_size=2, removal_tokens=3 * 16 + 5, progress=False)  # 3 whole windows
    truth = measure_ablation(lm.model, w.subset(slice(0, 3)), lm.task, ("layer",), batch_size=2, progress=False)
    assert torch.allclose(t.layer_scores("removal").double(), truth.values["layer"], rtol=1e-5, atol=1e-7)
    assert t.meta["removal"] == {"windows": 3, "tokens": 48}
    everything = score(lm, w, ["removal"], batch_size=2, removal_tokens=None, progress=False)
    assert everything.meta["removal"]["windows"] == 5
    assert compare(everything, ablation_table(measure_ablation(lm.model, w, lm.task, ("layer",), progress=False),
                                              model_map(lm.model)), "layer")["scorers"]["removal"]["spearman"] > 0.999
    with pytest.raises(ImpruneError, match="at least 1"):
        score(lm, w, ["removal"], removal_tokens=0, progress=False)
    with pytest.raises(ImpruneError, match="need the model in memory"):
        score(lm, w, ["removal"], blockwise=True, progress=False)
