"""The one-pass statistics against autograd and plain math, on tiny models of every mapped architecture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import backprop_nll
from conftest import padded_windows as _windows
from conftest import scaled_model as _model

from importance.arch.canonical import model_map
from importance.data.sources import Windows
from importance.engine.collect import CollectConfig, Statistics, collect
from importance.engine.objective import token_nll
from importance.errors import ImpruneError
from importance.models.load import load_model

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "granite", "olmo2", "gpt2",
         "gpt_neox", "opt", "bert", "mixtral", "qwen3_moe", "qwen2_moe"]


def per_sequence_grads(lm, windows: Windows) -> list[dict[str, torch.Tensor]]:
    """Reference: a plain backward per sequence, every parameter requiring grad."""
    out = []
    for i in range(len(windows)):
        lm.model.zero_grad(set_to_none=True)
        batch = next(windows.subset([i]).batches(1))
        nll, _ = token_nll(lm.model, batch, lm.task)
        nll.sum().backward()
        out.append({n: p.grad.detach().clone() for n, p in lm.model.named_parameters() if p.grad is not None})
    lm.model.zero_grad(set_to_none=True)
    return out


def _view(comp, g: torch.Tensor) -> torch.Tensor:
    if comp.transposed:
        g = g.transpose(-1, -2)
    if comp.rows is None:
        return g
    return g[..., comp.rows, :] if comp.kind == "experts" else g[comp.rows]


def _row_sums(comp, grads: dict[str, torch.Tensor], names: dict[int, str]) -> torch.Tensor:
    """sum over each output row of w * g (+ its bias term): [out] ([E, out] for experts, [d] for norms)."""
    w = comp.weight.detach()
    g = _view(comp, grads[names[id(getattr(comp.module, comp.param))]])
    r = w * g if comp.kind == "norm" else (w * g).sum(-1)
    bias = getattr(comp.module, "bias", None) if comp.kind != "experts" else None
    if isinstance(bias, torch.Tensor):
        gb = grads[names[id(bias)]]
        r = r + comp.bias.detach() * (gb if comp.rows is None else gb[comp.rows])
    return r


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 2e-4, scale: torch.Tensor | None = None) -> None:
    """|a - b| <= rtol * scale, the scale being the largest |b| or the size of the summed terms if given."""
    scale = (b.abs().max() if scale is None else scale).clamp_min(1e-12)
    assert (a - b).abs().max() <= rtol * scale, f"max abs err {(a - b).abs().max():.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("model_type", ARCHS)
def test_gradient_statistics_equal_autograd(model_type: str) -> None:
    lm = _model(model_type)
    w = _windows()
    stats = collect(lm.model, w, lm.task, CollectConfig(elements=True), batch_size=3, progress=False)
    refs = per_sequence_grads(lm, w)
    names = {id(p): n for n, p in lm.model.named_parameters()}
    mm = model_map(lm.model)
    for comp in mm.components():
        gs = [_view(comp, r[names[id(getattr(comp.module, comp.param))]]) for r in refs]
        _close(stats.get(comp.layer, comp.name, "grad"), sum(gs))
        _close(stats.get(comp.layer, comp.name, "grad_sq"), sum(g.square() for g in gs))
        rows = [_row_sums(comp, r, names) for r in refs]
        _close(stats.get(comp.layer, comp.name, "row_wg"), sum(rows))
        _close(stats.get(comp.layer, comp.name, "row_wg_sq"), sum(r.square() for r in rows))
        _close(stats.get(comp.layer, comp.name, "comp_wg_sq"), sum(r.sum().square() for r in rows).reshape(1),
               scale=sum(r.abs().sum().square() for r in rows))
        if comp.in_group:
            cols = [(comp.weight.detach() * g).sum(0) for g in gs]
            _close(stats.get(comp.layer, comp.name, "col_wg_sq"), sum(c.square() for c in cols))


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox", "mixtral"])
def test_group_fisher_is_square_of_per_sequence_group_sums(model_type: str) -> None:
    """head = q rows + o columns; KV group = k, v rows + its query heads; MLP channel = gate/up rows + down
    column; expert = its three slices + its router row; layer = every parameter of the block."""
    lm = _model(model_type)
    w = _windows(seed=1)
    stats = collect(lm.model, w, lm.task, CollectConfig(), batch_size=2, progress=False)
    refs = per_sequence_grads(lm, w)
    names = {id(p): n for n, p in lm.model.named_parameters()}
    for block in model_map(lm.model).blocks:
        c, hd = block.components, block.head_dim
        per_seq: dict[str, list[torch.Tensor]] = {"head": [], "kv_group": [], "mlp_channel": [], "expert": [],
                                                  "layer": []}
        for r in refs:
            rows = {n: _row_sums(comp, r, names) for n, comp in c.items()}
            o = c["attn.o"]
            o_cols = (o.weight.detach() * _view(o, r[names[id(o.module.weight)]])).sum(0)
            head = rows["attn.q"].reshape(-1, hd).sum(-1) + o_cols.reshape(-1, hd).sum(-1)
            per_seq["head"].append(head)
            kv = (rows["attn.k"] + rows["attn.v"]).reshape(-1, hd).sum(-1)
            per_seq["kv_group"].append(kv + head.reshape(kv.numel(), -1).sum(-1))
            if "mlp.down" in c:
                d = c["mlp.down"]
                d_cols = (d.weight.detach() * _view(d, r[names[id(d.module.weight)]])).sum(0)
                per_seq["mlp_channel"].append(rows["mlp.up"] + rows.get("mlp.gate", 0) + d_cols)
            if "mlp.router" in c:
                per_seq["expert"].append(sum(rows[n].sum(-1) for n in rows if n.startswith("mlp.experts"))
                                         + rows["mlp.router"])
            per_seq["layer"].append(sum(v.sum() for v in rows.values()).reshape(1))
        for group, vals in per_seq.items():
            if not vals:
                assert stats.get(block.index, group, "wg") is None
                continue
            _close(stats.get(block.index, group, "wg"), sum(vals))
            _close(stats.get(block.index, group, "wg_sq"), sum(v.square() for v in vals))


def test_activation_and_block_influence_equal_a_hook_free_computation() -> None:
    """q's input is input_layernorm(hidden_states[l]); block influence is 1 - cos(h_l, h_l+1); padding excluded."""
    lm = _model("llama")
    w = _windows(seed=2)
    stats = collect(lm.model, w, lm.task, CollectConfig(grad=False), batch_size=3, progress=False)
    with torch.no_grad():
        out = lm.model(input_ids=w.input_ids, attention_mask=w.attention_mask, output_hidden_states=True)
    valid = w.attention_mask.bool()
    mm = model_map(lm.model)
    for block in mm.blocks:
        x = block.components["norm.attn_in"].module(out.hidden_states[block.index])[valid]  # [tokens, hidden]
        _close(stats.get(block.index, "attn.q", "in_sq"), x.square().sum(0))
        if block.index + 1 < mm.n_layers:  # the last hidden state is after the final norm
            h0, h1 = out.hidden_states[block.index][valid], out.hidden_states[block.index + 1][valid]
            want = (1 - F.cosine_similarity(h0, h1, dim=-1)).sum()
            _close(stats.get(block.index, "block", "influence"), want.reshape(1))
            assert float(stats.get(block.index, "block", "influence_tokens")[0]) == float(valid.sum())


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen3_moe", "bert"])
def test_one_batch_of_four_equals_two_batches_of_two(model_type: str) -> None:
    lm = _model(model_type)
    w = _windows(seed=3, n=4)
    a = collect(lm.model, w, lm.task, CollectConfig(elements=True), batch_size=4, progress=False)
    b = collect(lm.model, w, lm.task, CollectConfig(elements=True), batch_size=2, progress=False)
    assert a.sums.keys() == b.sums.keys()
    # scale: the largest value of the same statistic in the same layer. A statistic that is zero in exact
    # arithmetic (with QK-norm, scaling all of q or all of k leaves the loss unchanged: comp_wg of attn.q/k is
    # pure rounding noise) must be small against its siblings, not reproduce its own noise.
    scale: dict[tuple[str, str], torch.Tensor] = {}
    for k, v in a.sums.items():
        layer, _, stat = k.split("|")
        scale[layer, stat] = torch.maximum(scale.get((layer, stat), torch.tensor(0.0)), v.abs().max().float())
    for k in a.sums:
        if not k.endswith("batches"):
            layer, _, stat = k.split("|")
            _close(b.sums[k], a.sums[k], rtol=1e-4, scale=scale[layer, stat])


def test_statistics_merge_by_addition() -> None:
    lm = _model("qwen2")
    w = _windows(seed=4, n=4)
    whole = collect(lm.model, w, lm.task, batch_size=2, progress=False)
    parts = Statistics()
    for idx in ([0, 1], [2, 3]):
        parts.merge(collect(lm.model, w.subset(idx), lm.task, batch_size=2, progress=False))
    for k in whole.sums:
        _close(parts.sums[k], whole.sums[k], rtol=1e-5)


def test_padding_changes_nothing() -> None:
    """A sequence padded to a longer window gives the same statistics as the same sequence unpadded."""
    lm = _model("llama")
    ids = torch.randint(5, 250, (1, 8), generator=torch.Generator().manual_seed(5))
    short = Windows(ids, torch.ones_like(ids), torch.ones(1, 8, dtype=torch.bool))
    padded_ids = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1)
    att = torch.cat([torch.ones(1, 8, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)], 1)
    padded = Windows(padded_ids, att, att.bool())
    a = collect(lm.model, short, lm.task, CollectConfig(elements=True), progress=False)
    b = collect(lm.model, padded, lm.task, CollectConfig(elements=True), progress=False)
    for k in a.sums:
        _close(b.sums[k], a.sums[k], rtol=1e-4)


def test_loss_mask_selects_the_tokens_that_drive_the_gradient() -> None:
    lm = _model("llama")
    ids = torch.randint(5, 250, (2, 10), generator=torch.Generator().manual_seed(6))
    loss_mask = torch.zeros(2, 10, dtype=torch.bool)
    loss_mask[:, -3:] = True  # an "answer" of three tokens
    w = Windows(ids, torch.ones_like(ids), loss_mask)
    stats = collect(lm.model, w, lm.task, CollectConfig(elements=True), progress=False)
    lm.model.zero_grad(set_to_none=True)
    logits = lm.model(input_ids=ids).logits  # independent loss: CE on the last three targets only
    F.cross_entropy(logits[:, -4:-1].flatten(0, 1), ids[:, -3:].flatten(), reduction="sum").backward()
    q = model_map(lm.model).blocks[1].components["attn.q"]
    _close(stats.get(1, "attn.q", "grad"), q.module.weight.grad)
    assert stats.count("targets") == 6
    lm.model.zero_grad(set_to_none=True)


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("model_type", ["llama", "mixtral"])
def test_no_hook_or_grad_left_after_success_or_error(model_type: str) -> None:
    lm = _model(model_type)
    before = _hook_count(lm.model)
    flags = [p.requires_grad for p in lm.model.parameters()]
    collect(lm.model, _windows(), lm.task, CollectConfig(elements=True), progress=False)
    assert _hook_count(lm.model) == before
    bad = _windows()
    bad.input_ids[0, 3] = 10_000  # out of the vocabulary: the forward fails half-way through the pass
    with pytest.raises(IndexError):
        collect(lm.model, bad, lm.task, progress=False)
    assert _hook_count(lm.model) == before
    assert [p.requires_grad for p in lm.model.parameters()] == flags
    assert all(p.grad is None for p in lm.model.parameters())


def test_non_finite_loss_is_a_clear_error() -> None:
    lm = load_model("random:llama")
    with torch.no_grad():
        model_map(lm.model).blocks[0].components["attn.q"].module.weight[0, 0] = float("inf")
    with pytest.raises(ImpruneError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight holds NaN or inf") as err:
        collect(lm.model, _windows(), lm.task, progress=False)
    assert "float32" not in str(err.value)  # the model already is float32: that advice would be wrong


def test_gradient_scorers_need_a_loss() -> None:
    lm = _model("bert")  # as an encoder without its LM head: no loss
    with pytest.raises(ImpruneError, match="activation"):
        collect(lm.model, _windows(), "encoder", progress=False)


def test_fisher_unit_batch_squares_the_batch_sum() -> None:
    lm = _model("llama")
    w = _windows(seed=7, n=2, pad_last=0)
    seq = collect(lm.model, w, lm.task, CollectConfig(elements=True), batch_size=2, progress=False)
    bat = collect(lm.model, w, lm.task, CollectConfig(elements=True, fisher_unit="batch"), batch_size=2,
                  progress=False)
    refs = per_sequence_grads(lm, w)
    q = model_map(lm.model).blocks[0].components["attn.q"]
    name = next(n for n, p in lm.model.named_parameters() if p is q.module.weight)
    _close(bat.get(0, "attn.q", "grad_sq"), (refs[0][name] + refs[1][name]).square())
    _close(seq.get(0, "attn.q", "grad_sq"), refs[0][name].square() + refs[1][name].square())


def _gate_gradients(lm, windows: Windows) -> dict[int, torch.Tensor]:
    """Reference for residual_fisher: an explicit per-token gate a [B, T, 1] (= 1, so the forward is unchanged) on
    every block's update, out' = in + a * (out - in); autograd gives d(summed NLL)/da per token: {layer: [B, T]}."""
    mm = model_map(lm.model)
    gates: dict[int, torch.Tensor] = {}
    held: dict[int, torch.Tensor] = {}

    def pre(i):
        def hook(module, args, kwargs):
            held[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def post(i):
        def hook(module, args, kwargs, out):
            h = out[0] if isinstance(out, tuple) else out
            gates[i] = torch.ones(*h.shape[:2], 1, requires_grad=True)
            x = held.pop(i)
            new = x + gates[i] * (h - x)
            return (new, *out[1:]) if isinstance(out, tuple) else new
        return hook

    handles = [h for b in mm.blocks for h in (b.module.register_forward_pre_hook(pre(b.index), with_kwargs=True),
                                              b.module.register_forward_hook(post(b.index), with_kwargs=True))]
    backprop_nll(lm, windows, handles)
    return {i: a.grad[..., 0] for i, a in gates.items()}


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bert", "qwen3_moe"])
def test_residual_fisher_equals_autograd_through_explicit_token_gates(model_type: str) -> None:
    """sum over valid tokens of (dL/da_t)^2 for a gate a_t on the block's update, from autograd on the gate."""
    lm = _model(model_type)
    w = _windows(seed=8, n=3)
    stats = collect(lm.model, w, lm.task, CollectConfig(residual_fisher=True), batch_size=2, progress=False)
    grads = _gate_gradients(lm, w)
    valid = w.attention_mask.bool()
    for layer, g in grads.items():
        want = g[valid].double().square().sum().reshape(1)
        assert float(want) > 0
        _close(stats.get(layer, "block", "residual_fisher"), want.float(), rtol=1e-3)


def test_residual_fisher_is_off_unless_asked_and_needs_the_gradient_pass() -> None:
    lm = _model("llama")
    w = _windows(seed=9, n=2)
    plain = collect(lm.model, w, lm.task, CollectConfig(), batch_size=2, progress=False)
    fwd = collect(lm.model, w, lm.task, CollectConfig(grad=False, residual_fisher=True), batch_size=2, progress=False)
    assert not any(k.endswith("|residual_fisher") for s in (plain, fwd) for k in s.sums)
