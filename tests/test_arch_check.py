"""The functional check of canonical maps (importance.arch.check), the fused families it proves, the structural
refusals of discovered maps, and a fixed sample of the architecture coverage benchmark (pruning.run.coverage)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from conftest import ARCH_TYPES, DISCOVERED_TYPES, FUSED_TYPES, fresh, random_windows

from importance.arch import canonical as arch
from importance.arch.canonical import Fused, model_map
from importance.arch.check import check_map
from importance.errors import ImpruneError
from pruning.run.coverage import run_stages
from pruning.run.coverage_report import counts, readme_block, replace_readme_block


def _map(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model_map(model)


@pytest.mark.parametrize("model_type", ARCH_TYPES + FUSED_TYPES + DISCOVERED_TYPES, ids=str)
def test_every_mapped_type_passes_the_functional_check(model_type: str) -> None:
    lm = fresh(model_type, scale=0.1)  # noisy biases and norms: a dropped bias cannot pass
    check_map(_map(lm.model))


def _with_linears(lm, model_type: str, edit: dict) -> None:
    """Register a deliberately wrong copy of the model's map under a new type name and point the model at it."""
    mm = _map(lm.model)
    linears = {k: v for k, v in {**mm.spec.linears, **edit}.items() if v is not None}
    arch._REGISTRY[f"{model_type}_wrong"] = dataclasses.replace(mm.spec, linears=linears, layout_of=None)
    lm.model.config.model_type = f"{model_type}_wrong"


_QKV = ("attn.q", "attn.k", "attn.v")
_WRONG = {
    "gate and up swapped": ("glm4", {"mlp.gate": Fused("mlp.gate_up_proj", "halves", 1),
                                     "mlp.up": Fused("mlp.gate_up_proj", "halves", 0)}, "down\\(act"),
    "fused gate_up as mlp.up": ("glm4", {"mlp.up": "mlp.gate_up_proj", "mlp.gate": None}, "256 rows"),
    "bloom's interleaved qkv read as blocks": (
        "bloom", {n: Fused("self_attention.query_key_value", "qkv", i) for i, n in enumerate(_QKV)}, "attn.v view"),
    "falcon's multi-query qkv read per head": (
        "falcon", {n: Fused("self_attention.query_key_value", "qkv_heads", i) for i, n in enumerate(_QKV)},
        "attn.q has"),
}


@pytest.mark.parametrize("case", list(_WRONG), ids=str)
def test_a_wrong_layout_fails_the_check_in_one_line(case: str) -> None:
    model_type, edit, match = _WRONG[case]
    lm = fresh(model_type, scale=0.1)
    _with_linears(lm, model_type, edit)
    try:
        with pytest.raises(ImpruneError, match=match) as err:
            check_map(model_map(lm.model))
    finally:
        arch._REGISTRY.pop(f"{model_type}_wrong")
    assert "\n" not in str(err.value) and "register_arch" in str(err.value)


def test_olmo_and_cohere_map_the_norms_they_have() -> None:
    olmo, cohere = _map(fresh("olmo").model), _map(fresh("cohere").model)
    assert not [n for n in olmo.component_names() if n.startswith("norm.")]  # OLMo-1: LayerNorm without weights
    assert [n for n in cohere.component_names() if n.startswith("norm.")] == ["norm.attn_in"]  # one parallel norm


def _falcon(**cfg):
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(vocab_size=261, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                          ffn_hidden_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, **cfg)
    torch.manual_seed(0)
    model = FalconForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("layout", ["multi_query", "per_head", "grouped"])
def test_falcon_layouts_check_and_cut_heads(layout: str) -> None:
    """Each of Falcon's three fused q|k|v layouts is proven by the check; removing KV group 0 from layer 0 gives
    the same logits as zeroing its rows and columns in place (the layout picked the right rows)."""
    from pruning.methods.surgery import cut_block

    cfg = {"multi_query": dict(multi_query=True), "per_head": dict(multi_query=False),
           "grouped": dict(new_decoder_architecture=True, num_kv_heads=2)}[layout]
    model = _falcon(**cfg)
    mm = model_map(model)
    check_map(mm)
    b = mm.blocks[0]
    assert (b.n_heads, b.n_kv_heads) == (4, {"multi_query": 1, "per_head": 4, "grouped": 2}[layout])
    ids = random_windows(n=1, t=8).input_ids
    g = b.n_heads // b.n_kv_heads
    heads, kv = (list(range(g)), [0]) if b.n_kv_heads > 1 else ([0], [])
    d = b.head_dim
    c = b.components
    c["attn.o"].update_weight_(lambda w: torch.cat([torch.zeros_like(w[:, :len(heads) * d]),
                                                    w[:, len(heads) * d:]], 1))  # their output contributes 0
    with torch.no_grad():
        zeroed = model(input_ids=ids).logits
    cut_block(mm, 0, heads=heads, kv_heads=kv)
    mm2 = model_map(model)
    check_map(mm2)
    assert mm2.blocks[0].n_heads == b.n_heads - len(heads)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, zeroed, rtol=1e-4, atol=1e-5)


def test_discovered_heads_that_cannot_be_cut_refuse_before_touching_the_model() -> None:
    from pruning.methods.structured import StructuredConfig, prune_structured

    lm = fresh("mpt")  # its attention reshapes by the hidden size it was built with
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    match = "attention of discovered model type 'mpt' cannot be cut"
    with pytest.raises(ImpruneError, match=match) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune_structured(lm, StructuredConfig(0.5, part="heads"), windows=random_windows(n=2, t=8))
    assert "\n" not in str(err.value)
    after = lm.model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


# ----------------------------------------------------------------------------------------- coverage sample

_SAMPLE = {  # model type -> (map kind, the stages that must end ok, {stage: status} for the others)
    "llama": ("registered", ("score", "prune", "heads", "eval"), {}),
    "falcon": ("registered", ("score", "prune", "heads", "eval"), {}),
    "glm4": ("discovered", ("score", "prune", "heads", "eval"), {}),
    "bloom": ("registered", ("score", "prune", "eval"), {"heads": "refused"}),
    "gpt_oss": ("discovered", ("score", "prune", "heads", "eval"), {}),
    "deepseek_v3": ("discovered", ("score", "prune", "heads", "eval"), {}),
    "mamba": ("refused", (), {"score": "skipped"}),
}


@pytest.mark.parametrize("model_type", list(_SAMPLE), ids=str)
def test_coverage_stages_on_a_fixed_sample(model_type: str) -> None:
    kind, ok, other = _SAMPLE[model_type]
    cov = run_stages(model_type)
    assert cov.map_kind == kind
    assert all(cov.stages[s].status == "ok" for s in ok), {s: cov.stages[s] for s in ok}
    for stage, status in other.items():
        assert cov.stages[stage].status == status, cov.stages[stage]
        assert "\n" not in cov.stages[stage].detail
    if "eval" in ok:
        ppl = cov.info["perplexity"]
        assert set(ppl) >= {"dense", "unstructured"} and all(1.0 < p < 1e4 for p in ppl.values())
    if kind == "refused":
        assert "no attention layers" in cov.stages["map"].detail


def test_coverage_counts_and_readme_block() -> None:
    def row(t, attn, *statuses):
        stages = {s: {"status": st, "detail": "no" if st == "refused" else ""}
                  for s, st in zip(("build", "map", "score", "prune", "heads", "eval"), statuses, strict=True)}
        return {"model_type": t, "has_attention": attn, "map_kind": "registered", "stages": stages}

    rows = [row("a", True, *["ok"] * 6), row("b", True, "ok", "ok", "ok", "ok", "refused", "ok"),
            row("c", False, "ok", "refused", *["skipped"] * 4), row("d", True, "ok", "ok", "crash", *["skipped"] * 3)]
    c = counts(rows)
    assert c["score_prune_eval_on_attention"] == {"ok": 2, "of": 3, "share": 0.667}
    assert c["heads_on_attention"] == {"ok": 1, "of": 3, "share": 0.333}
    assert c["crashes"] == 1 and c["stages"]["heads"] == {"ok": 1, "refused": 1, "skipped": 2}
    block = readme_block({"transformers": "x", "counts": c, "types": rows})
    assert "- `b`: heads: no" in block and "- `c`: map: no" in block and "- `d`: score: " in block
    text = replace_readme_block("# T\n\nold\n", block)
    assert replace_readme_block(text, block) == text  # regenerating replaces, never appends twice


def test_every_registered_map_is_in_the_test_grid() -> None:
    """The README's registered maps come from the registry; each one is proven by the grid above."""
    from importance.arch.canonical import registered_types

    assert set(registered_types()) <= set(ARCH_TYPES + FUSED_TYPES)
