"""The canonical component views (importance.arch.canonical) against what each real module computes in a model forward.

Every check runs on a private copy of a tiny random model whose parameters (biases and norms too) are refilled
with noise, so that a view that drops a bias, reads the wrong rows or forgets a transpose cannot pass.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ARCH_TYPES,
    DISCOVERED_TYPES,
    FUSED_TYPES,
    MOE_TYPES,
    UNKNOWN_FUSED_TYPES,
    fresh,
    random_windows,
    tiny,
)
from torch import nn

from importance.arch.canonical import model_map
from importance.errors import ImpruneError
from importance.models.load import load_model
from pruning.cli.core import main


def _map(model: nn.Module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # discovered types warn; tested on its own below
        return model_map(model)


def _capture(model: nn.Module, modules: list[nn.Module], t: int = 10) -> dict[int, tuple[tuple, torch.Tensor]]:
    """Run one real forward and record each module's positional inputs and (first) output, by id(module)."""
    seen: dict[int, tuple[tuple, torch.Tensor]] = {}

    def hook(mod: nn.Module, args: tuple, out) -> None:
        if id(mod) not in seen:  # the first call (layer 0 modules are called once per forward anyway)
            y = out[0] if isinstance(out, tuple) else out
            seen[id(mod)] = (tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args), y.detach().clone())

    handles = [m.register_forward_hook(hook) for m in {id(m): m for m in modules}.values()]
    try:
        w = random_windows(n=2, t=t, pad_last=3)
        with torch.no_grad():
            model(input_ids=w.input_ids, attention_mask=w.attention_mask)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == len({id(m) for m in modules}), "some mapped module was never called in the forward"
    return seen


def _rows_index(comp, out_total: int) -> torch.Tensor:
    """The module output rows this component owns, as a sorted index tensor."""
    full = torch.arange(out_total)
    return full if comp.rows is None else full[comp.rows]


def _out_total(comp) -> int:
    w = getattr(comp.module, comp.param)
    return int(w.shape[-1] if comp.transposed else w.shape[-2])


# ----------------------------------------------------------------------------------------- linear views

@pytest.mark.parametrize("model_type", ARCH_TYPES + FUSED_TYPES + DISCOVERED_TYPES, ids=str)
def test_linear_views_reproduce_module_outputs_in_a_real_forward(model_type: str) -> None:
    lm = fresh(model_type, scale=0.1)
    mm = _map(lm.model)
    comps = [c for c in mm.components() if c.kind == "linear"]
    assert {"attn.q", "attn.k", "attn.v", "attn.o"} <= {c.name for c in comps}
    seen = _capture(lm.model, [c.module for c in comps])
    for c in comps:
        (x, *_), y = seen[id(c.module)]
        w = c.weight  # [out, in]
        got = x @ w.T + (c.bias if c.bias is not None else 0)
        ref = c.select_out(y)
        assert got.shape == ref.shape, c.path
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5, msg=f"{model_type} {c.name} ({c.path})")


@pytest.mark.parametrize("model_type", ARCH_TYPES + FUSED_TYPES, ids=str)
def test_fused_row_slices_partition_the_module_output(model_type: str) -> None:
    mm = _map(tiny(model_type).model)
    by_module: dict[int, list] = {}
    for c in mm.blocks[0].components.values():
        if c.kind == "linear" and c.rows is not None:
            by_module.setdefault(id(c.module), []).append(c)
    for comps in by_module.values():
        total = _out_total(comps[0])
        rows = torch.cat([_rows_index(c, total) for c in comps])
        assert sorted(rows.tolist()) == list(range(total)), [c.name for c in comps]  # each row exactly once


# ----------------------------------------------------------------------------------------- geometry

def _config_intermediate(cfg) -> int:
    for key in ("n_inner", "ffn_dim", "intermediate_size"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    raise AssertionError("config has no intermediate size")


@pytest.mark.parametrize("model_type", ARCH_TYPES, ids=str)
def test_geometry_matches_the_config(model_type: str) -> None:
    lm = tiny(model_type)
    cfg = lm.model.config
    mm = _map(lm.model)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv = cfg.num_key_value_heads if mm.spec.gqa else heads
    assert mm.n_layers == cfg.num_hidden_layers
    for b in mm.blocks:
        assert (b.n_heads, b.n_kv_heads, b.head_dim) == (heads, kv, head_dim)
        comps = b.components
        assert comps["attn.q"].shape == (heads * head_dim, cfg.hidden_size)
        assert comps["attn.k"].shape == comps["attn.v"].shape == (kv * head_dim, cfg.hidden_size)
        assert comps["attn.o"].shape == (cfg.hidden_size, heads * head_dim)
        if model_type in MOE_TYPES:
            n_exp = getattr(cfg, "num_local_experts", None) or cfg.num_experts
            inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
            assert b.n_experts == n_exp
            assert comps["mlp.experts.gate"].shape == comps["mlp.experts.up"].shape == (n_exp, inter, cfg.hidden_size)
            assert comps["mlp.experts.down"].shape == (n_exp, cfg.hidden_size, inter)
            assert comps["mlp.router"].shape == (n_exp, cfg.hidden_size)
        else:
            assert b.n_experts == 0
            assert b.intermediate == _config_intermediate(cfg)
            assert comps["mlp.down"].shape == (cfg.hidden_size, b.intermediate)
    if model_type == "qwen2_moe":
        shared = mm.blocks[0].components
        assert shared["mlp.shared.up"].shape == (cfg.shared_expert_intermediate_size, cfg.hidden_size)
        assert shared["mlp.shared.router"].shape == (1, cfg.hidden_size)


# ----------------------------------------------------------------------------------------- MLP / attention semantics

_POST_NORM = ("bert", "roberta")  # the attention module ends in LayerNorm(o(...) + residual)
_PLAIN_MLP = [t for t in ARCH_TYPES if t not in MOE_TYPES and t not in ("opt", *_POST_NORM)]  # own MLP module


@pytest.mark.parametrize("model_type", _PLAIN_MLP, ids=str)
def test_mlp_module_equals_down_of_gated_views(model_type: str) -> None:
    """The MLP module computes down(act(gate x) * up x) (or down(act(up x))) from the views: gate and up are not
    swapped, and nothing else happens between them."""
    from transformers.activations import ACT2FN

    lm = fresh(model_type, scale=0.1)
    cfg = lm.model.config
    mm = _map(lm.model)
    block = mm.blocks[0]
    mlp = block.module.get_submodule(mm.spec.mlp)
    (x, *_), y = _capture(lm.model, [mlp])[id(mlp)]
    act = ACT2FN[getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
                 or cfg.activation_function]

    def lin(name: str, h: torch.Tensor) -> torch.Tensor:
        c = block.components[name]
        return h @ c.weight.T + (c.bias if c.bias is not None else 0)

    up = lin("mlp.up", x)
    hidden = act(lin("mlp.gate", x)) * up if "mlp.gate" in block.components else act(up)
    torch.testing.assert_close(lin("mlp.down", hidden), y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", [t for t in ARCH_TYPES if t not in _POST_NORM], ids=str)
def test_zeroing_the_value_view_leaves_only_the_output_bias(model_type: str) -> None:
    """With v (weights and bias) zeroed through its view, attention mixes zeros: the attention module returns
    exactly attn.o's bias, whatever q and k are."""
    lm = fresh(model_type, scale=0.1)
    mm = _map(lm.model)
    block = mm.blocks[0]
    v, o = block.components["attn.v"], block.components["attn.o"]
    v.update_weight_(torch.zeros_like)
    if v.bias is not None:
        with torch.no_grad():
            v.module.bias[_rows_index(v, _out_total(v))] = 0
    attn = block.module.get_submodule(mm.spec.attn)
    o_bias = o.bias if o.bias is not None else torch.zeros(o.shape[0])
    _, y = _capture(lm.model, [attn])[id(attn)]  # (attention modules take keyword arguments)
    torch.testing.assert_close(y, o_bias.expand_as(y), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------- head semantics

def _uniform_heads(attn: torch.Tensor, causal: bool) -> torch.Tensor:
    """[B, H, T, T] attention probabilities -> [H] bool: the head attends uniformly (1 / visible positions)."""
    t = attn.shape[-1]
    visible = torch.tril(torch.ones(t, t)) if causal else torch.ones(t, t)
    expect = visible / visible.sum(-1, keepdim=True)
    return ((attn - expect).abs().amax(dim=(0, 2, 3)) < 1e-5)


@pytest.mark.parametrize("model_type", ARCH_TYPES, ids=str)
def test_zeroing_one_query_head_or_kv_group_makes_exactly_those_heads_uniform(model_type: str) -> None:
    """q / k views hold the rows of the heads the model actually uses (interleaving and GQA grouping included)."""
    lm = fresh(model_type, scale=0.3)
    lm.model.set_attn_implementation("eager")
    causal = lm.task == "causal-lm"
    ids = random_windows(n=1, t=8).input_ids
    block = _map(lm.model).blocks[0]
    d, group = block.head_dim, block.n_heads // block.n_kv_heads

    def zero(name: str, index: int) -> None:
        c = block.components[name]
        rows = slice(index * d, (index + 1) * d)
        c.update_weight_(lambda w: torch.cat([w[:rows.start], torch.zeros_like(w[rows]), w[rows.stop:]]))
        if c.bias is not None:  # the bias rows of the same head, through the same row selection
            with torch.no_grad():
                c.module.bias[_rows_index(c, _out_total(c))[rows]] = 0

    def uniform() -> list[int]:
        with torch.no_grad():
            attn = lm.model(input_ids=ids, output_attentions=True).attentions[0]
        return torch.nonzero(_uniform_heads(attn, causal)).flatten().tolist()

    assert uniform() == []
    zero("attn.q", 2)
    assert uniform() == [2]
    zero("attn.k", 0)  # KV group 0 serves query heads 0 .. group-1
    assert uniform() == sorted({2, *range(group)})


# ----------------------------------------------------------------------------------------- writing through views

@pytest.mark.parametrize("model_type", ARCH_TYPES + FUSED_TYPES, ids=str)
def test_update_weight_writes_exactly_the_view(model_type: str) -> None:
    """Zero each linear view: its output columns become the bias, every other column and parameter is untouched;
    then write the old values back through the view and get the original parameters bit for bit."""
    lm = fresh(model_type, scale=0.1)
    comps = [c for c in _map(lm.model).blocks[0].components.values() if c.kind == "linear"]
    seen = _capture(lm.model, [c.module for c in comps])
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    for c in comps:
        (x, *_), _ = seen[id(c.module)]
        with torch.no_grad():
            y0 = c.module(x)
        y0 = y0[0] if isinstance(y0, tuple) else y0
        saved = c.weight.detach().clone()
        c.update_weight_(torch.zeros_like)
        with torch.no_grad():
            y1 = c.module(x)
        y1 = y1[0] if isinstance(y1, tuple) else y1
        total = _out_total(c)
        mine = torch.zeros(total, dtype=torch.bool)
        mine[_rows_index(c, total)] = True
        bias = c.bias if c.bias is not None else torch.zeros(int(mine.sum()))
        torch.testing.assert_close(y1[..., mine], bias.expand_as(y1[..., mine]), msg=f"{c.name}: not bias-only")
        assert torch.equal(y1[..., ~mine], y0[..., ~mine]), f"{c.name}: zeroing changed other output columns"
        changed = [k for k, v in lm.model.state_dict().items() if not torch.equal(v, before[k])]
        assert len(changed) == 1, f"{c.name} changed {changed}"
        c.update_weight_(lambda w, s=saved: s)
        assert torch.equal(c.weight, saved)
        changed = [k for k, v in lm.model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed == [], f"{c.name}: writing the old view back left {changed} different"


# ----------------------------------------------------------------------------------------- MoE experts

def _expert_reference(comps: dict, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e computed from the canonical views alone: down_e @ (silu(gate_e x) * up_e x)."""
    gate, up, down = (comps[f"mlp.experts.{n}"].weight[e] for n in ("gate", "up", "down"))
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


@pytest.mark.parametrize("model_type", MOE_TYPES, ids=str)
@pytest.mark.parametrize("expert", [0, 3])
def test_expert_views_reproduce_the_experts_module(model_type: str, expert: int) -> None:
    lm = fresh(model_type, scale=0.1)
    assert lm.model.config.hidden_act == "silu"
    comps = _map(lm.model).blocks[0].components
    experts = comps["mlp.experts.down"].module
    (x, *_), _ = _capture(lm.model, [experts])[id(experts)]  # the hidden states the real forward routed, [N, H]
    n = x.shape[0]
    only = torch.full((n, 1), expert, dtype=torch.long)  # every token to `expert` alone, weight 1
    with torch.no_grad():
        got = experts(x, only, torch.ones(n, 1))
        ref = _expert_reference(comps, expert, x)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
        # router view = the logits the router returns
        router = comps["mlp.router"]
        torch.testing.assert_close(router.module(x)[0], x @ router.weight.T, rtol=1e-4, atol=1e-6)
    other = (expert + 1) % 4
    with torch.no_grad():
        other_before = experts(x, torch.full((n, 1), other), torch.ones(n, 1))
    comps["mlp.experts.gate"].update_weight_(lambda w: torch.stack([torch.zeros_like(w[i]) if i == expert else w[i]
                                                                    for i in range(w.shape[0])]))
    with torch.no_grad():
        assert torch.equal(experts(x, only, torch.ones(n, 1)), torch.zeros_like(x))  # silu(0) * up = 0
        assert torch.equal(experts(x, torch.full((n, 1), other), torch.ones(n, 1)), other_before)
    assert torch.count_nonzero(experts.gate_up_proj[expert, experts.gate_up_proj.shape[1] // 2:]) > 0  # up intact


# ----------------------------------------------------------------------------------------- discovery

@pytest.mark.parametrize("model_type", DISCOVERED_TYPES, ids=str)
def test_discovered_type_maps_with_a_warning(model_type: str) -> None:
    with pytest.warns(UserWarning, match=f"'{model_type}' has no registered map.*register_arch"):
        mm = model_map(tiny(model_type).model)
    assert mm.discovered
    names = set(mm.component_names())
    assert {"attn.q", "attn.k", "attn.v", "attn.o"} <= names and names & {"mlp.down", "mlp.experts.down"}
    assert mm.n_layers == tiny(model_type).model.config.num_hidden_layers


@pytest.mark.parametrize("model_type", UNKNOWN_FUSED_TYPES, ids=str)
def test_unknown_fused_layout_raises_naming_register_arch(model_type: str) -> None:
    lm = load_model(f"random:{model_type}")
    lm.model.config.model_type = unregistered = f"{model_type}_unregistered"  # the discovery reads [q | k | v]
    with pytest.raises(ImpruneError, match=f"'{unregistered}'.*register_arch") as err:
        _map(lm.model)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------- imprune info

@pytest.mark.parametrize("model_type", ARCH_TYPES + FUSED_TYPES + DISCOVERED_TYPES, ids=str)
def test_info_prints_the_map_for_every_type(model_type: str, capsys: pytest.CaptureFixture[str]) -> None:
    spec = f"random:{model_type}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["info", "--model", spec]) == 0
        text = capsys.readouterr().out
        assert main(["info", "--model", spec, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    mm = _map(tiny(model_type).model)
    ba = next(b for b in mm.blocks if b.n_heads)  # the first block with attention (lfm2: block 0 is a conv block)
    experts = next((b.n_experts for b in mm.blocks if b.n_experts), 0)
    assert spec in text and mm.blocks_path in text
    for name in mm.component_names():
        assert f"\n{name} " in text, name
    assert (doc["layers"], doc["heads"], doc["kv_heads"], doc["head_dim"], doc["experts"]) == \
        (mm.n_layers, ba.n_heads, ba.n_kv_heads, ba.head_dim, experts)
    assert doc["attention_layers"] == sum(1 for b in mm.blocks if b.n_heads)
    assert doc["discovered"] is (model_type in DISCOVERED_TYPES)
    assert doc["params_total"] == sum(p.numel() for p in tiny(model_type).model.parameters())
    by_name = {row["component"]: row for row in doc["components"]}
    assert list(by_name) == mm.component_names()
    for name, row in by_name.items():
        comps = [b.components[name] for b in mm.blocks if name in b.components]
        assert row["layers"] == len(comps) and row["params"] == sum(c.weight.numel() for c in comps)
