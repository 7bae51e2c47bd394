"""GPTQ on the second-order core (pruning.second_order.gptq, pruning.second_order.core)."""

from __future__ import annotations

import pytest
import torch

from importance.errors import ImpruneError
from pruning.methods.masks import lowest_mask
from pruning.second_order.gptq import QuantSpec, dequantize, gptq, rtn


def _layer(seed: int = 0, n: int = 512, cols: int = 64, out: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=gen) @ torch.randn(cols, cols, generator=gen)  # correlated inputs [n, in]
    return x, torch.randn(out, cols, generator=gen)


def _plain_error(x: torch.Tensor, w: torch.Tensor, v: torch.Tensor) -> float:
    return float((x.double() @ (w - v).double().T).square().sum())


def _on_grid(q, spec: QuantSpec) -> None:
    """Every weight is (c - z) s with an integer code c in the width's range, recomputed from the parts."""
    qmin, qmax = spec.qrange
    out, cols = q.weight.shape
    assert q.scale.shape == (out, spec.groups(cols))
    assert int(q.codes.min()) >= qmin and int(q.codes.max()) <= qmax
    g = cols // q.scale.shape[1]
    s = q.scale.repeat_interleave(g, dim=1)
    z = q.zero.repeat_interleave(g, dim=1)
    assert torch.equal(z, z.round())
    c = q.weight / s + z
    assert torch.allclose(c, c.round(), atol=1e-3)
    assert torch.equal(c.round().to(torch.int8), q.codes)
    assert torch.equal(dequantize(q.codes, q.scale, q.zero), q.weight)
    if spec.sym:
        assert torch.equal(q.zero, torch.zeros_like(q.zero))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group", [None, 16], ids=["channel", "g16"])
def test_gptq_beats_round_to_nearest_and_stays_on_the_grid(bits: int, sym: bool, group: int | None) -> None:
    x, w = _layer()
    xtx = x.T.double() @ x.double()
    spec = QuantSpec(bits, sym, group)
    q, r = gptq(w, xtx, x.shape[0], spec, blocksize=32), rtn(w, spec)
    for res in (q, r):
        _on_grid(res, spec)
    e_q, e_r = _plain_error(x, w, q.weight), _plain_error(x, w, r.weight)
    assert q.error == pytest.approx(e_q, rel=1e-6)  # the reported error is the plain ||X (W - Q)^T||^2
    assert e_q < 0.8 * e_r


def test_round_to_nearest_uses_every_level_and_matches_a_plain_rounding() -> None:
    w = torch.linspace(-1.0, 3.0, 64).reshape(2, 32)  # row 0: [-1, 1], row 1: [1, 3]
    for bits in (2, 3, 4, 8):
        q = rtn(w, QuantSpec(bits, sym=False))
        qmin, qmax = QuantSpec(bits).qrange
        assert int(q.codes[0].min()) == qmin and int(q.codes[0].max()) == qmax  # the whole range is used
        assert len(torch.unique(q.codes[0])) <= 2**bits
        # row 1 is positive: the range is [0, 3]: scale 3 / (2^b - 1), zero point at qmin
        scale = 3.0 / (2**bits - 1)
        expect = torch.clamp(torch.round(w[1] / scale + qmin), qmin, qmax)
        assert torch.equal(q.codes[1].float(), expect)
        assert torch.allclose(q.weight[1], (expect - qmin) * scale)


def test_identity_hessian_reduces_gptq_to_round_to_nearest_in_any_order() -> None:
    x, w = _layer(1)
    scale = torch.rand(64, generator=torch.Generator().manual_seed(3)) + 0.5
    xtx = torch.diag(scale.double() ** 2) * 100  # independent inputs: no error can be compensated
    spec = QuantSpec(4, sym=False)
    r = rtn(w, spec)
    for act in (False, True):
        q = gptq(w, xtx, 100, spec, damp=0.0, act_order=act)
        assert torch.equal(q.codes, r.codes)
        assert torch.allclose(q.weight, r.weight, atol=1e-6)


@pytest.mark.parametrize("group", [None, 16], ids=["channel", "g16"])
def test_act_order_undoes_its_permutation(group: int | None) -> None:
    x, w = _layer(2)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(5))
    xp = x[:, perm]
    xtx, xtx_p = x.T.double() @ x.double(), xp.T.double() @ xp.double()
    spec = QuantSpec(4, False, group)
    if group is None:  # per channel: the result follows the columns (visiting order is by diag H only)
        a = gptq(w, xtx, 512, spec, act_order=True)
        b = gptq(w[:, perm], xtx_p, 512, spec, act_order=True)
        assert torch.allclose(a.weight[:, perm], b.weight, atol=1e-5)
    q = gptq(w, xtx, 512, spec, act_order=True)
    _on_grid(q, spec)
    assert _plain_error(x, w, q.weight) < _plain_error(x, w, rtn(w, spec).weight)
    assert not torch.equal(q.weight, gptq(w, xtx, 512, spec).weight)  # another order, another solution


@pytest.mark.parametrize("bits", [4, 8])
def test_joint_nm_and_quantization(bits: int) -> None:
    x, w = _layer(3)
    xtx = x.T.double() @ x.double()
    spec = QuantSpec(bits, False, 16)
    q = gptq(w, xtx, 512, spec, nm=(2, 4), blocksize=32)
    assert ((~q.pruned).reshape(24, -1, 4).sum(-1) == 2).all()  # exactly N of every M kept
    assert ((q.weight != 0).reshape(24, -1, 4).sum(-1) <= 2).all() and bool((q.weight[q.pruned] == 0).all())
    assert float((q.weight != 0).float().mean()) > 0.45  # a kept weight rounds to 0 rarely
    _on_grid(q, spec)  # kept weights on the grid; pruned ones are the zero code
    z = q.zero.repeat_interleave(16, dim=1)
    assert torch.equal(q.codes[q.weight == 0].float(), z[q.weight == 0])


def test_joint_unstructured_half_and_quantization() -> None:
    x, w = _layer(4)
    xtx = x.T.double() @ x.double()
    spec = QuantSpec(4, False, 32)
    q = gptq(w, xtx, 512, spec, choose=lambda sal, start: lowest_mask(sal, sal.numel() // 2, "row"), blocksize=32)
    assert int(q.pruned.sum()) == w.numel() // 2 and bool((q.weight[q.pruned] == 0).all())
    _on_grid(q, spec)


def test_bad_specs_are_one_line_errors() -> None:
    x, w = _layer()
    xtx = x.T.double() @ x.double()
    with pytest.raises(ImpruneError, match="divisors: 8, 16, 32, 64"):
        gptq(w, xtx, 512, QuantSpec(4, group_size=48))
    with pytest.raises(ImpruneError, match="unsupported width 5"):
        rtn(w, QuantSpec(5))
    with pytest.raises(ImpruneError, match="act-order"):
        gptq(w, xtx, 512, QuantSpec(4), nm=(2, 4), act_order=True)


def test_input_statistics_shared_inputs_equal_a_plain_sum_per_module() -> None:
    """q / k / v (and gate / up) read one tensor: the shared X^T X computation must leave every module with its
    own exact sum over batches, padding excluded, as a plain per-module accumulation computes it."""
    from pruning.second_order.sequential import InputStatistics

    torch.manual_seed(0)
    a, b, c = torch.nn.Linear(8, 3), torch.nn.Linear(8, 5), torch.nn.Linear(6, 2)
    plain: dict[str, list[torch.Tensor]] = {"a": [], "b": [], "c": []}
    st = InputStatistics({"a": a, "b": b, "c": c}, hessian=True)
    with st:
        for step in range(3):
            mask = torch.ones(2, 4, dtype=torch.bool)
            mask[1, 4 - step:] = False  # padding grows with the batch index
            st.mask = mask
            x, y = torch.randn(2, 4, 8), torch.randn(2, 4, 6)
            a(x), b(x), c(y)
            keep = mask.reshape(-1)
            for k, inp in (("a", x), ("b", x), ("c", y)):
                plain[k].append(inp.reshape(-1, inp.shape[-1])[keep])
    for k, xs in plain.items():
        xx = torch.cat(xs).double()
        assert st.tokens[k] == xx.shape[0] == 8 * 3 - 3
        assert torch.allclose(st.xtx[k], xx.T @ xx, rtol=1e-5, atol=1e-5)  # float32 products
        assert torch.allclose(st.sq[k].double(), xx.square().sum(0), atol=1e-5)
    assert st.xtx["a"] is not st.xtx["b"]


@pytest.mark.parametrize("act", [False, True])
def test_static_groups_take_round_to_nearest_parameters_of_the_initial_weights(act: bool) -> None:
    x, w = _layer(5, cols=64)
    xtx = (x.T @ x).double()
    spec = QuantSpec(4, group_size=16)
    r = rtn(w, spec)
    q = gptq(w, xtx, 512, spec, act_order=act, static_groups=True)
    assert torch.equal(q.scale, r.scale) and torch.equal(q.zero, r.zero)
    _on_grid(q, spec)
    assert _plain_error(x, w, q.weight) < _plain_error(x, w, r.weight)
    if not act:  # the default natural order re-derives each group from the updated weights: other parameters
        assert not torch.equal(gptq(w, xtx, 512, spec).scale, r.scale)
