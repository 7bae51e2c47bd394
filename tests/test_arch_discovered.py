"""Types the generic discovery (importance.arch.discover) maps beyond the Llama names, each proven by the
functional check as it maps (a discovered map is checked before it is returned), and the checks failing on a
wrong reading: CTRL / ModernBERT / CPM-Ant / Moshi names, an fc1 or Wi computing [gate | up], a sub-norm between
the gate product and down (BitNet), stacked experts after dense layers and routers taking a bias (HY-V3,
MiniMax-M2), mamba hybrids, composite models whose vision tower is not the block list; CodeGen's sharded q|v|k
against its own split; and head cuts of attentions that keep their width in ``embed_dim`` or normalise q / k
over all heads."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import fresh, tiny

from importance.arch import check
from importance.arch.canonical import model_map
from importance.errors import ImpruneError
from importance.models.load import load_model
from pruning.run.coverage import run_stages

ATTN = {"attn.q", "attn.k", "attn.v", "attn.o"}
GATED = ATTN | {"mlp.gate", "mlp.up", "mlp.down"}
EXPERTS = {"mlp.experts.gate", "mlp.experts.up", "mlp.experts.down", "mlp.router"}
# type -> components its map must hold (somewhere in the model)
MAPS = {"ctrl": ATTN | {"mlp.up", "mlp.down"}, "modernbert-decoder": GATED, "moshi": GATED, "cpmant": GATED,
        "got_ocr2": GATED, "hy_v3": GATED | EXPERTS, "minimax_m2": ATTN | EXPERTS, "kimi_linear": ATTN | EXPERTS,
        "bamba": GATED, "granitemoehybrid": ATTN | EXPERTS, "nemotron_h": ATTN, "beam": GATED | {"attn.gate"},
        "bitnet": GATED, "xmod": ATTN | {"mlp.up", "mlp.down"}, "sarvam_mla": GATED | {"attn.kv_a"},
        # MoE layers after dense ones: their experts are mapped too (they were left out in silence before)
        "glm4_moe": GATED | EXPERTS, "ernie4_5_moe": GATED | EXPERTS, "lfm2_moe": ATTN | EXPERTS,
        "gemma3n_text": GATED,  # (tiny-builder fixes: lfm2_moe's layer types, gemma3n's KV sharing)
        # norms after attention and after the MLP (Gemma-3 style): post_attention_layernorm is attn_out
        "gemma3": GATED | {"norm.attn_in", "norm.attn_out", "norm.mlp_in", "norm.mlp_out"}}


def _map(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model_map(model)


@pytest.mark.parametrize("model_type", sorted(MAPS))
def test_discovered_map_holds_the_components_and_passes_the_check(model_type: str) -> None:
    mm = _map(tiny(model_type).model)
    assert mm.discovered and MAPS[model_type] <= set(mm.component_names())
    if model_type == "got_ocr2":  # the language model's layers, not the vision tower's
        assert "language_model" in mm.blocks_path
    if model_type == "gemma3":
        assert mm.blocks[0].components["norm.attn_out"].path.endswith("post_attention_layernorm")


@pytest.mark.parametrize("model_type", ["lfm2", "bitnet", "moshi"])
def test_swapped_gate_and_up_fail_the_mlp_check_whatever_the_activation(model_type: str) -> None:
    lm = fresh(model_type, scale=0.3)
    mm = _map(lm.model)
    b = next(b for b in mm.blocks if "mlp.gate" in b.components)
    gate, up = b.components["mlp.gate"], b.components["mlp.up"]
    if gate.module is up.module:  # one fused module: swap the row slices
        gate.rows, up.rows = up.rows, gate.rows
    else:
        gate.module, up.module = up.module, gate.module
    mlp = b.module.get_submodule(mm.spec.mlp)
    call = check.capture_calls(mm, {"mlp": mlp}, upto=b.index)["mlp"]
    with pytest.raises(ImpruneError, match="does not reproduce the MLP module"):
        check.check_mlp(mm, b, call, mlp)


def test_codegen_views_are_its_own_split_of_the_sharded_qkv() -> None:
    lm = fresh("codegen", scale=0.3)
    b = _map(lm.model).blocks[0]
    q, k, v = (b.components[n] for n in ("attn.q", "attn.k", "attn.v"))
    x = torch.randn(5, q.module.weight.shape[1])
    with torch.no_grad():
        y = q.module(x).view(5, 4, -1)  # CodeGen: 4 shards, each [q | v | k] (its forward's own split)
        ref_q, ref_v, ref_k = (t.reshape(5, -1) for t in y.split(y.shape[-1] // 3, dim=-1))
        for comp, ref in ((q, ref_q), (k, ref_k), (v, ref_v)):
            torch.testing.assert_close(x @ comp.weight.T, ref)


def test_twin_block_stacks_refuse_in_one_line() -> None:
    with pytest.raises(ImpruneError, match="several stacks of the same blocks") as err:
        _map(load_model("random:hrm_text").model)
    assert "\n" not in str(err.value)


# mvp: the width of its heads in embed_dim; olmoe: q / k norms over all heads; gpt_bigcode: one KV head (MQA)
@pytest.mark.parametrize("model_type", ["mvp", "olmoe", "gpt_bigcode"])
def test_heads_leave_attentions_that_keep_their_width_elsewhere(model_type: str) -> None:
    cov = run_stages(model_type)
    assert {k: v.status for k, v in cov.stages.items()} == dict.fromkeys(cov.stages, "ok")
    assert 0 < cov.info["heads_after"] < sum(b.n_heads for b in _map(tiny(model_type).model).blocks)
