"""Families beyond the Llama layout, against computations written out here from their definitions: gpt_oss's
stacked experts (transposed [E, H, 2I] weights, interleaved gate / up columns, biases, clamped ``(up + 1) * glu``),
DeepSeek's multi-head latent attention (MLA: per head [k_nope | v] rows of ``kv_b_proj``, q / k / v of different
widths), and the tiny builder of composite and MoE configs (importance.models.tiny)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import fresh, random_windows, tiny

from importance.arch.canonical import model_map
from importance.engine.collect import CollectConfig, collect
from importance.errors import ImpruneError
from importance.models.load import load_model
from pruning.cli.core import main
from pruning.methods.surgery import cut_block


def _map(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model_map(model)


def _gpt_oss_expert(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """gpt_oss expert ``e`` from the raw parameters: columns 0::2 of gate_up are gate, 1::2 up (its definition)."""
    gu = x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]  # [n, 2I]
    gate, up = gu[:, 0::2].clamp(max=experts.limit), gu[:, 1::2].clamp(-experts.limit, experts.limit)
    h = (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
    return h @ experts.down_proj[e] + experts.down_proj_bias[e]


def test_gpt_oss_expert_views_are_the_interleaved_transposed_columns() -> None:
    lm = fresh("gpt_oss", scale=0.3)
    c = _map(lm.model).blocks[0].components
    experts = c["mlp.experts.down"].module
    e = 2
    w = experts.gate_up_proj[e]  # [H, 2I] as stored
    assert torch.equal(c["mlp.experts.gate"].weight[e], w[:, 0::2].T)
    assert torch.equal(c["mlp.experts.up"].weight[e], w[:, 1::2].T)
    assert torch.equal(c["mlp.experts.down"].weight[e], experts.down_proj[e].T)
    x = torch.randn(7, w.shape[0], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = experts(x, torch.full((7, 1), e), torch.ones(7, 1))
        torch.testing.assert_close(got, _gpt_oss_expert(experts, e, x), rtol=1e-4, atol=1e-6)
    before = experts.gate_up_proj.detach().clone()
    c["mlp.experts.up"].update_weight_(torch.zeros_like)  # writes only the up columns, through the transpose
    assert torch.equal(experts.gate_up_proj[:, :, 0::2], before[:, :, 0::2])
    assert not experts.gate_up_proj[:, :, 1::2].any()


def test_gpt_oss_expert_statistics_equal_a_direct_computation() -> None:
    """Per-expert sums of squared expert outputs (mlp.experts.down out_sq) over the tokens the real forward
    routed there, against the expert recomputed from the raw parameters on those tokens."""
    lm = fresh("gpt_oss", scale=0.3)
    mm = _map(lm.model)
    experts = mm.blocks[0].components["mlp.experts.down"].module
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = experts.register_forward_hook(lambda _m, a, _o: seen.append((a[0].detach(), a[1].detach())))
    windows = random_windows(n=2, t=8)
    try:
        stats = collect(lm.model, windows, lm.task, CollectConfig(grad=False, activation=True), batch_size=2,
                        progress=False)
    finally:
        hook.remove()
    x, index = seen[0]
    ref = torch.zeros(experts.num_experts, x.shape[-1])
    with torch.no_grad():
        for e in range(experts.num_experts):
            tok = torch.where(index == e)[0]
            if tok.numel():
                ref[e] = _gpt_oss_expert(experts, e, x[tok]).square().sum(0)
    torch.testing.assert_close(stats.get(0, "mlp.experts.down", "out_sq"), ref, rtol=1e-4, atol=1e-6)


def test_a_swapped_gate_up_reading_of_gpt_oss_fails_the_functional_check() -> None:
    from importance.arch import check
    from importance.arch import experts as ex

    lm = fresh("gpt_oss", scale=0.3)
    mm = _map(lm.model)
    mod = mm.blocks[0].components["mlp.experts.down"].module
    for name, part in (("mlp.experts.gate", 1), ("mlp.experts.up", 0)):  # gate and up rows exchanged
        mm.blocks[0].components[name].rows = ex.rows(ex.expert_layout(mod), mod.gate_up_proj.shape[-1], part)
    with pytest.raises(ImpruneError, match="not affine in the rows mapped as up|is not down"):
        check.check_experts(mm, mm.blocks[0])


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v2"], ids=str)
def test_mla_views_are_per_head_rows_of_kv_b(model_type: str) -> None:
    lm = fresh(model_type, scale=0.3)
    cfg = lm.model.config
    b = _map(lm.model).blocks[0]
    nope, v, heads = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.num_attention_heads
    kv_b = b.components["attn.k"].module.weight  # [H * (nope + v), kv_lora_rank]
    per_head = kv_b.view(heads, nope + v, -1)
    assert torch.equal(b.components["attn.k"].weight, per_head[:, :nope].reshape(heads * nope, -1))
    assert torch.equal(b.components["attn.v"].weight, per_head[:, nope:].reshape(heads * v, -1))
    assert (b.n_heads, b.n_kv_heads, b.head_dim) == (heads, heads, v)
    assert b.components["attn.q"].head_dim == nope + cfg.qk_rope_head_dim
    assert {"attn.kv_a", "norm.kv_a"} <= set(b.components)


def test_removing_an_mla_head_equals_zeroing_its_output_columns() -> None:
    lm = fresh("deepseek_v3", scale=0.3)
    ids = random_windows(n=1, t=8).input_ids
    mm = _map(lm.model)
    o = mm.blocks[0].components["attn.o"]
    v = o.head_dim
    with torch.no_grad():
        o.module.weight[:, 1 * v:2 * v] = 0  # head 1 contributes nothing
        ref = lm.model(input_ids=ids).logits
    cut_block(mm, 0, heads=[1], kv_heads=[1])
    after = _map(lm.model).blocks[0]
    assert (after.n_heads, after.components["attn.q"].shape[0]) == (3, 3 * after.components["attn.q"].head_dim)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-5)


def test_the_tiny_builder_shrinks_composite_and_moe_configs() -> None:
    g = tiny("gemma3")  # a vision + text composite: the text config gets the tiny sizes, the tower its smallest
    assert g.model.config.text_config.hidden_size == 64 and g.model.config.vision_config.num_hidden_layers == 1
    assert sum(p.numel() for p in g.model.parameters()) < 1_000_000
    d = tiny("deepseek_v3").model.config
    assert (d.n_routed_experts, d.kv_lora_rank, d.qk_rope_head_dim, d.head_dim) == (4, 32, 8, 8)


def test_a_type_transformers_cannot_build_tiny_refuses_in_one_line() -> None:
    with pytest.raises(ImpruneError) as err:
        load_model("random:cohere_compass_text")
    assert "transformers cannot build" in str(err.value) and "\n" not in str(err.value)


def test_info_score_prune_run_on_random_gpt_oss(tmp_path: Path, text_file: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data", f"file:{text_file}", "--seq-len", "32", "--tokens", "64", "--quiet"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["info", "--model", "random:gpt_oss", "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["experts"] == 4
        assert main(["score", "--model", "random:gpt_oss", *data, "--out", str(tmp_path / "s")]) == 0
        assert main(["prune", "--model", "random:gpt_oss", "--method", "heads", "--sparsity", "0.5", *data,
                     "--no-eval", "--out", str(tmp_path / "p")]) == 0
    meta = json.loads((tmp_path / "p" / "imprune.json").read_text())
    assert meta["params"]["after"] < meta["params"]["before"]
