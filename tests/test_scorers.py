"""Scorers and the ImportanceTable: estimators against independent computations, invariants, persistence."""

from __future__ import annotations

import json

import pytest
import torch
from test_collect import ARCHS, _close, _model, _windows, per_sequence_grads

from importance.arch.canonical import model_map
from importance.data.sources import Windows
from importance.errors import ImpruneError
from importance.models.load import load_model
from importance.scorers import layer_only
from importance.scoring import parse_scorers, score
from importance.table import ImportanceTable, layer_map_matrix, normalize

ALL = ["taylor", "fisher", "activation", "magnitude", "block_influence", "residual_fisher"]


@pytest.mark.parametrize("model_type", ARCHS)
def test_every_architecture_gives_a_complete_table(model_type: str) -> None:
    lm = _model(model_type)
    scorers = ALL if lm.task != "encoder" else ["activation", "magnitude", "block_influence"]
    t = score(lm, _windows(), scorers, batch_size=3, progress=False)
    mm = model_map(lm.model)
    for s in scorers:
        layer = t.layer_scores(s)
        assert layer.shape == (mm.n_layers,) and torch.isfinite(layer).all() and (layer >= 0).all()
        if layer_only(s):
            assert not t.has(s, "component")
            continue
        comp = t.matrix(s)
        present = torch.tensor([[n in b.components for n in t.components] for b in mm.blocks])
        assert torch.isfinite(comp[present]).all() and (comp[present] >= 0).all()
        assert torch.isnan(comp[~present]).all()
        heads = t.matrix(s, "head")
        assert heads.shape == (mm.n_layers, mm.blocks[0].n_heads) and torch.isfinite(heads).all()
        assert torch.isfinite(t.matrix(s, "kv_group")).all()
        if mm.blocks[0].n_experts:
            assert t.matrix(s, "expert").shape == (mm.n_layers, mm.blocks[0].n_experts)


def test_group_scores_equal_sums_computed_from_autograd() -> None:
    """taylor head = |sum_b (q rows + o columns of w*g_b)| / N; fisher head = sum_b (...)^2 / N."""
    lm = _model("llama")
    w = _windows(seed=11)
    t = score(lm, w, ["taylor", "fisher"], batch_size=3, progress=False)
    refs = per_sequence_grads(lm, w)
    n_targets = t.meta["counts"]["targets"]
    params = dict(lm.model.named_parameters())
    for block in model_map(lm.model).blocks:
        q, o = block.components["attn.q"], block.components["attn.o"]
        per_seq = []
        for r in refs:
            gq = r[next(n for n, p in params.items() if p is q.module.weight)]
            go = r[next(n for n, p in params.items() if p is o.module.weight)]
            heads = (q.weight.detach() * gq).sum(-1).reshape(-1, block.head_dim).sum(-1)
            heads = heads + (o.weight.detach() * go).sum(0).reshape(-1, block.head_dim).sum(-1)
            per_seq.append(heads)
        _close(t.matrix("taylor", "head")[block.index], sum(per_seq).abs() / n_targets)
        _close(t.matrix("fisher", "head")[block.index], sum(h.square() for h in per_seq) / n_targets)


def test_elements_and_additive_groups_equal_plain_math() -> None:
    lm = _model("qwen2")
    w = _windows(seed=12)
    t = score(lm, w, ["activation", "magnitude", "taylor", "fisher"], elements=True, obd=True, batch_size=3,
              progress=False)
    block = model_map(lm.model).blocks[1]
    q, o = block.components["attn.q"], block.components["attn.o"]
    wq, wo = q.weight.detach(), o.weight.detach()
    norms = t.tensors["activation/in_norm/1/attn.q"]
    _close(t.element("activation", 1, "attn.q"), wq.abs() * norms)
    _close(t.element("magnitude", 1, "attn.o"), wo.abs())
    head_mag = wq.abs().sum(-1).reshape(-1, 16).sum(-1) + wo.abs().sum(0).reshape(-1, 16).sum(-1)
    _close(t.matrix("magnitude", "head")[1], head_mag)
    # OBD saliency: w^2 F / 2 with F the element Fisher
    plain = score(lm, w, ["fisher"], elements=True, batch_size=3, progress=False)
    _close(t.element("fisher", 1, "attn.q"), wq.square() * plain.element("fisher", 1, "attn.q") / 2)
    # component sums = sums of channel (row) scores
    for s in ("magnitude", "activation"):
        _close(t.matrix(s)[1, t.components.index("mlp.up")], t.channels(s, 1, "mlp.up").sum())


@pytest.mark.parametrize("scorer", ["taylor", "fisher", "activation", "magnitude"])
def test_zeroed_head_ranks_last(scorer: str) -> None:
    lm = load_model("random:llama:seed=3")
    block = model_map(lm.model).blocks[1]
    hd = block.head_dim
    victim = 2
    cut = torch.arange(victim * hd, (victim + 1) * hd)
    block.components["attn.q"].update_weight_(lambda w: w.index_fill(0, cut, 0))
    block.components["attn.o"].update_weight_(lambda w: w.index_fill(1, cut, 0))
    t = score(lm, _windows(seed=13, n=4), [scorer], batch_size=2, progress=False)
    heads = t.matrix(scorer, "head")
    assert float(heads[1, victim]) == 0.0
    assert int(heads.flatten().argmin()) == 1 * heads.shape[1] + victim
    assert (heads.flatten().sort().values[1:] > 0).all()


def test_bilinear_pairs_have_equal_mask_scores() -> None:
    """Scaling q or k scales the same attention logits; v and o, up and down the same outputs: so the
    first-order and Fisher mask scores of each pair are equal (no biases in llama)."""
    lm = _model("llama")
    t = score(lm, _windows(seed=14), ["taylor", "fisher"], batch_size=3, progress=False)
    for s in ("taylor", "fisher"):
        m = t.matrix(s)
        for a, b in (("attn.q", "attn.k"), ("attn.v", "attn.o"), ("mlp.up", "mlp.down")):
            _close(m[:, t.components.index(a)], m[:, t.components.index(b)], rtol=1e-3)
        assert not torch.allclose(m[:, t.components.index("mlp.gate")], m[:, t.components.index("mlp.up")])


def test_one_batch_of_four_equals_two_batches_of_two_in_the_table() -> None:
    lm = _model("gpt2")
    w = _windows(seed=15, n=4)
    a = score(lm, w, ALL, batch_size=4, progress=False)
    b = score(lm, w, ALL, batch_size=2, progress=False)
    for k in a.tensors:
        _close(b.tensors[k], a.tensors[k], rtol=1e-4)


def test_aggregation_normalization_and_counts() -> None:
    lm = _model("llama")
    t = score(lm, _windows(seed=16), ["magnitude", "taylor"], batch_size=3, progress=False)
    counts = t.tensors["count/component"]
    assert counts[0, t.components.index("attn.k")] == 32 * 64
    assert torch.equal(t.matrix("taylor", aggregation="mean"), t.matrix("taylor") / counts)
    head_count = t.tensors["count/head"][0, 0]
    assert head_count == 16 * 64 + 64 * 16
    m = t.matrix("magnitude")
    assert torch.allclose(t.matrix("magnitude", norm="layer").sum(1), torch.ones(m.shape[0]))
    assert torch.allclose(t.matrix("magnitude", norm="component").sum(0), torch.ones(m.shape[1]))
    assert torch.allclose(t.matrix("magnitude", norm="global").sum(), torch.tensor(1.0))
    nan_row = torch.tensor([[1.0, float("nan"), 3.0]])
    assert torch.allclose(normalize(nan_row, "layer")[0, [0, 2]], torch.tensor([0.25, 0.75]))
    with pytest.raises(ImpruneError):
        t.matrix("magnitude", norm="rows")
    with pytest.raises(ImpruneError):
        t.matrix("nonexistent")


def test_save_load_is_bit_exact(tmp_path) -> None:
    lm = _model("phi3")
    t = score(lm, _windows(seed=17), ALL, elements=True, batch_size=3, progress=False)
    t.save(tmp_path / "tbl")
    back = ImportanceTable.load(tmp_path / "tbl")
    assert back.tensors.keys() == t.tensors.keys()
    assert all(torch.equal(back.tensors[k], t.tensors[k]) for k in t.tensors)
    assert back.meta == json.loads(json.dumps(t.meta))
    for key in ("model", "data", "seed", "estimators", "versions", "counts", "fisher_unit"):
        assert key in back.meta
    rows = (tmp_path / "tbl" / "components.csv").read_text().splitlines()
    assert rows[0].split(",") == ["scorer", "layer", *t.components]
    assert len(rows) == 1 + 4 * t.n_layers  # block_influence has no component values
    frame = back.to_frame()
    assert {"scorer", "granularity", "layer", "component", "head", "value"} <= set(frame.columns)
    assert set(frame.granularity) >= {"component", "head", "kv_group", "layer"}
    with pytest.raises(ImpruneError, match="exists"):
        t.save(tmp_path / "tbl")


def test_layer_map_matrix_and_scorer_parsing() -> None:
    m = layer_map_matrix({"1": {"attn.q": 0.5}, 0: {"mlp.up": 0.25, "bogus": 1.0}}, ["attn.q", "mlp.up"], 2)
    assert m[1, 0] == 0.5 and m[0, 1] == 0.25 and torch.isnan(m[0, 0])
    assert parse_scorers("taylor, fisher,taylor") == ["taylor", "fisher"]
    with pytest.raises(ImpruneError, match="unknown scorer"):
        parse_scorers("tayl")


def test_data_spec_needs_a_tokenizer() -> None:
    lm = _model("llama")
    with pytest.raises(ImpruneError, match="tokenizer"):
        score(lm.model, "austen:train", ["magnitude"], progress=False)
    ids = torch.randint(5, 200, (2, 8))
    t = score(lm.model, Windows(ids, torch.ones_like(ids), torch.ones(2, 8, dtype=torch.bool)), ["magnitude"],
              progress=False)
    assert t.meta["model"]["model_type"] == "llama"


@pytest.mark.integration
def test_smollm2_scores_every_layer_component_and_head(tmp_path) -> None:
    from pruning.cli.core import main

    out = tmp_path / "scores"
    assert main(["score", "--model", "builtin:smollm2-135m", "--data", "austen:train", "--tokens", "256",
                 "--seq-len", "128", "--quiet", "--out", str(out)]) == 0
    t = ImportanceTable.load(out)
    for s in ("taylor", "fisher", "activation", "magnitude"):
        comp, heads = t.matrix(s), t.matrix(s, "head")
        assert comp.shape == (30, 9) and heads.shape == (30, 9)
        assert torch.isfinite(comp).all() and (comp >= 0).all() and torch.isfinite(heads).all()
    assert t.layer_scores("block_influence").shape == (30,)


def test_package_exports_are_the_documented_callables() -> None:
    import importance
    import importance.scoring  # a loaded submodule must not shadow the exported function of the same role

    for name in importance.__all__:
        obj = getattr(importance, name)
        assert not isinstance(obj, type(importance)), f"importance.{name} is a module, not the exported object"
    from importance import score

    assert score is importance.scoring.score


def test_an_identity_block_scores_zero_for_every_layer_scorer_and_layer_only_scorers_have_no_groups() -> None:
    """Zeroing o_proj and down_proj makes block 1 the identity: its update is exactly zero, so residual_fisher and
    removal are exactly 0 (bypassing it changes nothing), block_influence 1 - cos(h, h) zero up to rounding."""
    lm = load_model("random:llama:seed=4")
    block = model_map(lm.model).blocks[1]
    for name in ("attn.o", "mlp.down"):
        block.components[name].update_weight_(lambda w: torch.zeros_like(w))
    names = ["block_influence", "residual_fisher", "removal"]
    t = score(lm, _windows(seed=17, n=4), names, batch_size=2, progress=False)
    for s in names:
        v = t.layer_scores(s)
        assert abs(float(v[1])) <= (1e-6 if s == "block_influence" else 0.0), s
        if s != "removal":  # removing a block of a random model may even lower the loss
            assert (torch.cat([v[:1], v[2:]]) > 1e-4).all(), s
        assert not t.has(s, "component") and not t.has(s, "head")
