"""The head scorers beyond token_fisher: ``token_second_order`` (-gate gradient + gate Fisher / 2, per token)
against autograd through explicit per-token gates and an exact hand-made case, and the measured ``head_removal``
against heads zeroed by hand in a copy of the model with plain full forwards."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import backprop_nll, fresh
from conftest import padded_windows as _windows
from conftest import scaled_model as _model

from importance.arch.canonical import model_map
from importance.engine.objective import token_nll
from importance.engine.stats import Statistics
from importance.errors import ImpruneError
from importance.scorers import Context
from importance.scorers import groups as group_scores
from importance.scoring import score


def _head_gate_grads(lm, windows) -> dict[int, torch.Tensor]:
    """d(summed NLL) / d a_bt for a gate a [B, T, H] (= 1) on each head's slice of the attn.o input, by autograd."""
    mm = model_map(lm.model)
    gates: dict[int, torch.Tensor] = {}

    def pre(block):
        def hook(module, args):
            x = args[0]  # [B, T, H * d]
            gates[block.index] = torch.ones(*x.shape[:2], block.n_heads, requires_grad=True)
            return (x * gates[block.index].repeat_interleave(block.head_dim, dim=-1), *args[1:])
        return hook

    handles = [b.components["attn.o"].module.register_forward_pre_hook(pre(b)) for b in mm.blocks]
    backprop_nll(lm, windows, handles)
    return {i: a.grad for i, a in gates.items()}


def test_token_second_order_equals_its_formula_on_autograd_gate_gradients() -> None:
    lm = _model("llama")
    w = _windows(seed=21, n=3)
    table = score(lm, w, ["token_second_order", "token_fisher"], batch_size=2, progress=False)
    valid = w.attention_mask.bool()
    n = float(valid[:, 1:].sum())  # predicted tokens: every counted token but the first of each window
    got = table.matrix("token_second_order", "head", "sum")
    for layer, g in _head_gate_grads(lm, w).items():
        p = g[valid].double()  # [tokens, H] d(summed NLL of its sequence) / d(gate at that token)
        want = (-p.sum(0) + 0.5 * p.square().sum(0)) / n
        torch.testing.assert_close(got[layer].double(), want, rtol=1e-3, atol=1e-5 * float(want.abs().max()))
        torch.testing.assert_close(table.matrix("token_fisher", "head", "sum")[layer].double(),
                                   p.square().sum(0) / n, rtol=1e-3, atol=0)
    assert not table.has("token_second_order", "layer") and table.has("token_second_order", "kv_group")


def test_token_second_order_exact_small_case() -> None:
    lm = _model("llama")
    mm = model_map(lm.model)
    stats = Statistics()
    stats.add("0|head|tok", torch.tensor([2.0, -1.0, 0.0, 4.0]))
    stats.add("0|head|tok_sq", torch.tensor([6.0, 1.0, 2.0, 8.0]))
    stats.add("-|run|targets", torch.tensor(4.0))
    out = group_scores("token_second_order", Context(stats, mm), mm.blocks[0])
    # (-tok + tok_sq / 2) / N: (-2 + 3) / 4, (1 + 0.5) / 4, (0 + 1) / 4, (-4 + 4) / 4
    torch.testing.assert_close(out["head"], torch.tensor([0.25, 0.375, 0.25, 0.0]))
    assert set(out) == {"head"}  # no KV-group sums in these statistics: no KV-group values


def _mean_nll(model, windows) -> float:
    with torch.no_grad():
        nll, counted = token_nll(model, next(windows.batches(len(windows))), "causal-lm")
    return float(nll.double().sum()) / float(counted.sum())


@pytest.mark.parametrize("removal_tokens", [None, 24])
def test_head_removal_equals_heads_zeroed_by_hand(removal_tokens: int | None) -> None:
    lm = fresh("llama", scale=0.3, seed=3)
    w = _windows(seed=22, n=4)
    table = score(lm, w, ["head_removal", "fisher"], batch_size=2, removal_tokens=removal_tokens, progress=False)
    used = w if removal_tokens is None else w.subset(slice(0, removal_tokens // w.seq_len))  # whole windows: 2
    assert table.meta["removal"]["windows"] == len(used)
    base = _mean_nll(lm.model, used)
    got = table.matrix("head_removal", "head", "sum")
    mm = model_map(lm.model)
    for b in mm.blocks:
        for h in range(b.n_heads):
            m = copy.deepcopy(lm.model)
            with torch.no_grad():  # zero head h's columns of o_proj: its output never reaches the residual
                m.model.layers[b.index].self_attn.o_proj.weight[:, h * b.head_dim:(h + 1) * b.head_dim] = 0
            want = _mean_nll(m, used) - base
            assert abs(float(got[b.index, h]) - want) < 1e-5 + 1e-4 * abs(want), (b.index, h)
    assert float(got.abs().max()) > 1e-3  # the heads matter in this model: the check compares real changes
    assert not table.has("head_removal", "layer") and table.has("fisher", "head")


def test_head_removal_refuses_blockwise() -> None:
    with pytest.raises(ImpruneError, match="removal scorers"):
        score(_model("llama"), _windows(seed=23, n=2), ["head_removal"], blockwise=True, progress=False)


def test_heatmaps_prefer_a_measured_head_removal_but_the_probe_default_is_one_pass() -> None:
    from importance.scorers import HEAD_SCORER, MEASURED, head_scorer

    assert head_scorer(["fisher", "token_second_order", "head_removal"]) == "head_removal"
    assert head_scorer(["fisher", "token_fisher", "token_second_order"]) == "token_second_order"
    assert HEAD_SCORER == "token_second_order" and HEAD_SCORER not in MEASURED  # score_parts refuses measured ones
