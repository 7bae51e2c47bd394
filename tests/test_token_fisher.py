"""token_fisher: the per-token gate Fisher (and the signed gate gradient) of heads / KV groups / MLP channels against
autograd through explicit per-token gates, and the split scoring (score_parts) against one pass over every window."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import backprop_nll
from conftest import padded_windows as _windows
from conftest import scaled_model as _model

from importance.arch.canonical import model_map
from importance.data.sources import Windows
from importance.engine.collect import CollectConfig, collect
from importance.engine.gates import token_gate_sums
from importance.errors import ImpruneError
from importance.scoring import score, score_parts


def _explicit_gates(lm, windows: Windows, comp_name: str, width: int, spread: int) -> dict[int, torch.Tensor]:
    """A gate a [B, T, width] (= 1: the forward is unchanged) multiplying the input of ``comp_name`` in every block,
    each gate entry covering ``spread`` consecutive input columns; autograd gives d(summed NLL)/da per token."""
    mm = model_map(lm.model)
    gates: dict[int, torch.Tensor] = {}

    def pre(i):
        def hook(module, args):
            x = args[0]  # [B, T, width * spread]
            gates[i] = torch.ones(*x.shape[:2], width, requires_grad=True)
            return (x * gates[i].repeat_interleave(spread, dim=-1), *args[1:])
        return hook

    handles = [b.components[comp_name].module.register_forward_pre_hook(pre(b.index)) for b in mm.blocks]
    backprop_nll(lm, windows, handles)
    return {i: a.grad for i, a in gates.items()}  # [B, T, width]


def _reference(grads: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return grads[valid].double().square().sum(0).float()  # [width] over counted tokens


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_token_fisher_equals_autograd_through_explicit_per_token_gates(model_type: str) -> None:
    lm = _model(model_type)
    w = _windows(seed=11, n=3)
    stats = collect(lm.model, w, lm.task, CollectConfig(token_fisher=True), batch_size=2, progress=False)
    block = model_map(lm.model).blocks[0]
    H, Hkv, d = block.n_heads, block.n_kv_heads, block.head_dim
    valid = w.attention_mask.bool()
    inter = block.components["mlp.down"].shape[1]
    cases = [("head", "attn.o", H, d), ("kv_group", "attn.o", Hkv, d * H // Hkv), ("mlp_channel", "mlp.down", inter, 1)]
    for group, comp, width, spread in cases:
        grads = _explicit_gates(lm, w, comp, width, spread)
        for layer, g in grads.items():
            want = _reference(g, valid)
            got = stats.get(layer, group, "tok_sq")
            assert got.shape == (width,) and float(want.min()) > 0
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6 * float(want.max()))
            signed = g[valid].double().sum(0).float()  # d(summed NLL) / d(one gate shared by every token)
            torch.testing.assert_close(stats.get(layer, group, "tok"), signed, rtol=1e-3,
                                       atol=1e-5 * float(g[valid].abs().sum(0).max()))
    # the per-sequence mask Fisher of the same column products is a different number (cross-token terms)
    assert not torch.allclose(stats.get(0, "head", "tok_sq"), stats.get(0, "head", "wg_sq"), rtol=1e-2)


def test_token_fisher_table_is_group_only_and_divides_by_predicted_tokens() -> None:
    lm = _model("llama")
    w = _windows(seed=12, n=4)
    table = score(lm, w, ["token_fisher", "fisher"], batch_size=2, progress=False)
    stats = collect(lm.model, w, lm.task, CollectConfig(token_fisher=True, activation=False, block_influence=False),
                    batch_size=4, progress=False)  # one batch of 4 = two batches of 2
    n = stats.count("targets")
    for g in ("head", "kv_group", "mlp_channel"):
        m = table.matrix("token_fisher", g, "sum")
        for layer in range(m.shape[0]):
            torch.testing.assert_close(m[layer], stats.get(layer, g, "tok_sq") / n, rtol=1e-4, atol=0)
    assert not table.has("token_fisher", "component") and not table.has("token_fisher", "layer")
    assert table.has("fisher", "component")


def test_token_gate_sums_small_exact_case() -> None:
    p = torch.tensor([[[1.0, 2.0, -3.0, 1.0], [0.5, 0.5, 1.0, 1.0]]])  # [B=1, T=2, 2 heads x d=2]
    out = token_gate_sums(p, "head", head_dim=2, n_kv_heads=1, mask=torch.tensor([[[1.0], [0.0]]]))
    torch.testing.assert_close(out["head"]["tok_sq"], torch.tensor([9.0, 4.0]))  # (1+2)^2, (-3+1)^2; token 2 masked
    torch.testing.assert_close(out["head"]["tok"], torch.tensor([3.0, -2.0]))
    torch.testing.assert_close(out["kv_group"]["tok_sq"], torch.tensor([1.0]))  # (3 - 2)^2
    mlp = token_gate_sums(p, "mlp_channel", 1, 1)["mlp_channel"]
    torch.testing.assert_close(mlp["tok_sq"], torch.tensor([1.25, 4.25, 10.0, 2.0]))
    torch.testing.assert_close(mlp["tok"], torch.tensor([1.5, 2.5, -2.0, 2.0]))


def test_score_parts_whole_equals_one_pass_and_parts_are_the_interleaved_halves() -> None:
    lm = _model("llama")
    w = _windows(seed=13, n=5)
    names = ["fisher", "taylor", "token_fisher"]
    whole, a, b = score_parts(lm, w, names, 2, batch_size=2, progress=False)
    one = score(lm, w, names, batch_size=2, progress=False)
    half_a = score(lm, w.subset(slice(0, None, 2)), names, batch_size=2, progress=False)
    for s in names:
        torch.testing.assert_close(whole.matrix(s, "head", "sum"), one.matrix(s, "head", "sum"), rtol=1e-4, atol=0)
        torch.testing.assert_close(a.matrix(s, "head", "sum"), half_a.matrix(s, "head", "sum"), rtol=1e-4, atol=0)
    assert (a.meta["data"]["windows"], b.meta["data"]["windows"]) == (3, 2)
    assert not torch.allclose(a.matrix("fisher", "head"), b.matrix("fisher", "head"))
    with pytest.raises(ImpruneError, match="cannot be split"):
        score_parts(lm, w.subset([0]), names, 2, progress=False)
    with pytest.raises(ImpruneError, match="removal"):
        score_parts(copy.deepcopy(lm), w, ["removal"], 2, progress=False)
