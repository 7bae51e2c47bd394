"""Hybrid architectures (softmax attention among linear-attention / state-space blocks), gated attention and
attention side modules in the generic discovery (importance.arch.discover), against the modules themselves:
blocks without attention map no attention component (their token mixer is left alone, said in a warning), a
q projection computing per head [q | gate] is read as two views proven by the functional check, DeepSeek-V3.2's
indexer is not taken for the attention's k, and OLMo-2-style post norms keep their meaning."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import fresh, tiny

from importance.arch import check
from importance.arch.branches import branches
from importance.arch.canonical import model_map
from importance.errors import ImpruneError
from pruning.run.coverage import run_stages

ATTN = {"attn.q", "attn.k", "attn.v", "attn.o"}


def _map(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model_map(model)


# the tiny models' block without softmax attention and its token mixer (bailing_hybrid's linear attention even
# names its projections q_proj / k_proj / v_proj / o_proj, like the attention of block 1)
HYBRIDS = [("qwen3_5_text", 0, "linear_attn"), ("olmo_hybrid", 0, "linear_attn"), ("minimax", 1, "self_attn"),
           ("lara_mini", 0, "linear_attn"), ("bailing_hybrid", 0, "self_attn")]


@pytest.mark.parametrize(("model_type", "layer", "mixer"), HYBRIDS, ids=[h[0] for h in HYBRIDS])
def test_a_hybrid_maps_its_attention_blocks_and_leaves_the_token_mixers(model_type: str, layer: int,
                                                                         mixer: str) -> None:
    lm = tiny(model_type)
    with pytest.warns(UserWarning, match=f"'{model_type}' is a hybrid: blocks {layer} mix tokens without softmax "
                      f"attention \\({mixer}: "):
        mm = model_map(lm.model)
    plain, attn = mm.blocks[layer], mm.blocks[1 - layer]
    assert not {n for n in plain.components if n.startswith(("attn.", "norm.attn", "norm.q", "norm.k"))}
    assert plain.n_heads == 0 and set(attn.components) >= ATTN and attn.n_heads > 0
    mapped = {id(c.module) for c in plain.components.values()}
    assert not {id(m) for m in plain.module.get_submodule(mixer).modules()} & mapped  # left unscored, unpruned
    assert set(plain.components) & {"mlp.down", "mlp.experts.down"}  # its MLP is mapped


def test_gated_q_views_are_per_head_halves_of_q_proj() -> None:
    lm = fresh("qwen3_5_text", scale=0.3)
    b = _map(lm.model).blocks[1]
    q, gate = b.components["attn.q"], b.components["attn.gate"]
    w = q.module.weight  # [H * 2 * d, hidden]: per head [q_h | gate_h]
    per_head = w.view(b.n_heads, 2, b.head_dim, -1)
    assert q.module is gate.module
    assert torch.equal(q.weight, per_head[:, 0].reshape(-1, w.shape[1]))
    assert torch.equal(gate.weight, per_head[:, 1].reshape(-1, w.shape[1]))


def test_a_swapped_q_gate_reading_fails_the_functional_check() -> None:
    lm = fresh("qwen3_5_text", scale=0.3)
    mm = _map(lm.model)
    b = mm.blocks[1]
    q, gate = b.components["attn.q"], b.components["attn.gate"]
    q.rows, gate.rows = gate.rows, q.rows
    attn = b.module.get_submodule(mm.spec.attn)
    call = check.capture_calls(mm, {"attn": attn}, upto=1)["attn"]
    with pytest.raises(ImpruneError, match="attn.gate .* are not a sigmoid gate"):
        check.check_gate(mm, b, call, attn)


def test_gated_hybrid_runs_every_coverage_stage_and_loses_heads() -> None:
    cov = run_stages("qwen3_5_text")
    assert {k: v.status for k, v in cov.stages.items()} == dict.fromkeys(cov.stages, "ok")
    assert 0 < cov.info["heads_after"] < sum(b.n_heads for b in _map(tiny("qwen3_5_text").model).blocks)


def test_the_indexer_beside_mla_is_not_taken_for_the_attention() -> None:
    mm = _map(tiny("deepseek_v32").model)
    b = mm.blocks[0]
    assert {*ATTN, "attn.kv_a"} <= set(b.components) and mm.spec.mla
    assert not [c.path for c in b.components.values() if "indexer" in c.path]
    assert b.components["attn.k"].path.endswith("kv_b_proj")


def test_post_norm_blocks_keep_the_meaning_of_post_attention_layernorm() -> None:
    b = _map(tiny("flex_olmo").model).blocks[0]  # OLMo-2 style: norms after attention and after the MLP
    c = b.components
    assert c["norm.attn_out"].path.endswith("post_attention_layernorm") and "norm.mlp_in" not in c
    assert c["norm.mlp_out"].path.endswith("post_feedforward_layernorm")


def test_sub_blocks_of_a_hybrid_refuse_in_one_line() -> None:
    with pytest.raises(ImpruneError, match="'qwen3_5_text' is a hybrid .* use --method layers") as err:
        branches(_map(tiny("qwen3_5_text").model))
    assert "\n" not in str(err.value)
