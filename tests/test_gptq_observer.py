"""The range observers of the GPTQ / RTN grid (pruning.second_order.gptq: minmax, mse, mse-h)."""

from __future__ import annotations

import pytest
import torch

from importance.errors import ImpruneError
from pruning.second_order.gptq import SHRINK, QuantSpec, dequantize, gptq, grid_params, rtn


def _groups(seed: int, rows: int = 64, k: int = 32) -> torch.Tensor:
    """Rows of weights with outliers (Student-t like: normal / sqrt(chi2 / 3)), the case clipping is for."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, k, generator=gen)
    chi = torch.randn(rows, k, 3, generator=gen).square().sum(-1) / 3
    return z / chi.sqrt() * 0.02


def _plain_params(lo: float, hi: float, bits: int, sym: bool) -> tuple[float, float]:
    """compressed-tensors' formula for one range, written out in plain Python floats."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if sym:
        return max(abs(lo), hi) / ((qmax - qmin) / 2), 0.0
    s = (hi - lo) / (qmax - qmin)
    return s, float(round(min(max(qmin - lo / s, qmin), qmax)))


def _plain_error(row: list[float], s: float, z: float, bits: int, h: list[float] | None = None) -> float:
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    e = 0.0
    for j, w in enumerate(row):
        q = min(max(round(w / s + z), qmin), qmax)
        e += (1.0 if h is None else h[j]) * ((q - z) * s - w) ** 2
    return e


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_mse_range_is_the_best_shrunk_range_and_never_worse_than_minmax(bits: int, sym: bool) -> None:
    x = _groups(bits + 10 * sym)
    spec = QuantSpec(bits, sym)
    s_mm, z_mm = grid_params(x, spec, "minmax")
    s, z = grid_params(x, spec, "mse")
    shrunk = 0
    for i in range(x.shape[0]):  # an independent brute force over the same factors, in float64 Python
        row = x[i].tolist()
        lo, hi = min(min(row), 0.0), max(max(row), 0.0)
        errs = [_plain_error(row, *_plain_params(lo * f, hi * f, bits, sym), bits) for f in SHRINK]
        chosen = _plain_error(row, float(s[i]), float(z[i]), bits)
        assert chosen == pytest.approx(min(errs), rel=1e-4, abs=1e-12)  # the best factor of the grid
        assert chosen <= _plain_error(row, float(s_mm[i]), float(z_mm[i]), bits) * (1 + 1e-6)
        assert any(float(s[i]) == pytest.approx(_plain_params(lo * f, hi * f, bits, sym)[0], rel=1e-5)
                   for f in SHRINK)  # the scale of one shrunk range: the format's own formula
        shrunk += float(s[i]) < float(s_mm[i]) * (1 - 1e-6)
    if bits < 8:
        assert shrunk > 0  # heavy tails: some rows are clipped
    else:  # 255 levels: clipping rarely pays
        assert shrunk < x.shape[0]
    assert torch.equal(z, z.round()) and bool((z >= spec.qrange[0]).all()) and bool((z <= spec.qrange[1]).all())
    if sym:
        assert torch.equal(z, torch.zeros_like(z))


def test_mse_h_weights_the_columns_by_the_hessian_diagonal() -> None:
    x = _groups(7, rows=32, k=16)
    spec = QuantSpec(3)
    h = torch.rand(16, generator=torch.Generator().manual_seed(1)) * 10
    s, z = grid_params(x, spec, "mse-h", h)
    s_u, z_u = grid_params(x, spec, "mse-h", torch.ones(16))
    s_m, z_m = grid_params(x, spec, "mse")
    assert torch.equal(s_u, s_m) and torch.equal(z_u, z_m)  # unit weights: the plain mse observer
    assert not torch.equal(s, s_m)  # other weights, other ranges (on some rows)
    for i in range(x.shape[0]):
        row, hl = x[i].tolist(), h.tolist()
        lo, hi = min(min(row), 0.0), max(max(row), 0.0)
        best = min(_plain_error(row, *_plain_params(lo * f, hi * f, 3, False), 3, hl) for f in SHRINK)
        assert _plain_error(row, float(s[i]), float(z[i]), 3, hl) == pytest.approx(best, rel=1e-4, abs=1e-12)


@pytest.mark.parametrize("observer", ["mse", "mse-h"])
@pytest.mark.parametrize("act", [False, True], ids=["natural", "act-order"])
def test_gptq_and_rtn_with_an_observer_stay_on_the_stored_grid(observer: str, act: bool) -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(512, 64, generator=gen) @ torch.randn(64, 64, generator=gen)  # [n, in]
    w = _groups(4, rows=24, k=64)  # [out, in]
    xtx = x.T.double() @ x.double()
    spec = QuantSpec(4, False, 16)
    r_mm, r = rtn(w, spec, xtx), rtn(w, spec, xtx, observer)
    for q in (r, gptq(w, xtx, 512, spec, act_order=act, observer=observer)):
        assert torch.equal(dequantize(q.codes, q.scale, q.zero), q.weight)  # w' = (code - z) s, exactly
        assert int(q.codes.min()) >= -8 and int(q.codes.max()) <= 7 and torch.equal(q.zero, q.zero.round())
    hd = torch.diagonal(xtx).float()
    weighted = lambda q: float(((q.weight - w).square() * (hd if observer == "mse-h" else 1)).sum())  # noqa: E731
    assert weighted(r) < weighted(r_mm)  # rounding error of round-to-nearest: clipped ranges win on heavy tails
    if act:  # static groups: GPTQ's parameters are the observer's on the initial weights, group by group
        q = gptq(w, xtx, 512, spec, act_order=True, observer=observer)
        assert torch.equal(q.scale, r.scale) and torch.equal(q.zero, r.zero)


def test_unknown_observer_is_a_one_line_error() -> None:
    with pytest.raises(ImpruneError, match="unknown --observer 'l1'; use one of minmax, mse, mse-h"):
        grid_params(torch.randn(4, 8), QuantSpec(4), "l1")
    from pruning.quant.gptq_model import GPTQConfig

    with pytest.raises(ImpruneError, match="unknown --observer"):
        GPTQConfig(observer="percentile").validate()


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_compressed_tensors_round_trip_with_the_mse_observer(tmp_path, sym: bool) -> None:
    import transformers
    from conftest import fresh, random_windows

    from pruning.quant.bits import BitPlan, quant_units
    from pruning.quant.ct_format import save_compressed_tensors
    from pruning.quant.gptq_model import GPTQConfig, quantize_model_gptq_

    lm = fresh("llama", scale=0.1)
    windows = random_windows(6, 24, seed=0, high=min(lm.model.config.vocab_size, 261))
    units, _ = quant_units(lm.model, group_size=16)
    plan = BitPlan({u.name: (2, 3, 4, 8)[i % 4] for i, u in enumerate(units)}, tuple(units), (2, 3, 4, 8), 4.0,
                   "test", "test", 0.0)
    quantized = quantize_model_gptq_(lm.model, plan, windows, GPTQConfig("gptq", sym=sym, observer="mse"), 3)
    with torch.no_grad():
        fake = lm.model(input_ids=windows.input_ids).logits
    minmax = fresh("llama", scale=0.1)
    q_mm = quantize_model_gptq_(minmax.model, plan, windows, GPTQConfig("gptq", sym=sym, observer="minmax"), 3)
    assert any(not torch.equal(quantized[n].scale, q_mm[n].scale) for n in plan.bits)  # the observer was used
    save_compressed_tensors(lm, tmp_path / "ct", plan, quantized, {"test": True})
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    with torch.no_grad():
        assert torch.allclose(again(input_ids=windows.input_ids).logits, fake, atol=1e-5, rtol=1e-5)


def test_cli_observer_is_recorded_and_nm_takes_the_natural_order(tmp_path) -> None:
    """--observer reaches the quantizer and imprune.json; --nm 2:4 without an order flag runs in the natural order
    (N:M groups need it) instead of failing on the act-order default; --act-order with --nm is still refused."""
    import json

    from pruning.cli.core import main

    base = ["quantize", "--model", "random:llama", "--data", "austen:train", "--tokens", "512", "--seq-len", "32",
            "--budget", "4", "--choices", "4", "--group-size", "16", "--no-eval", "--quiet"]
    assert main([*base, "--observer", "mse", "--nm", "2:4", "--out", str(tmp_path / "a")]) == 0
    grid = json.loads((tmp_path / "a" / "imprune.json").read_text())["grid"]
    assert grid["observer"] == "mse" and grid["act_order"] is False and grid["joint"]["nm"] == [2, 4]
    assert main([*base, "--out", str(tmp_path / "b")]) == 0
    grid = json.loads((tmp_path / "b" / "imprune.json").read_text())["grid"]
    from pruning.quant.gptq_model import GPTQConfig

    assert grid["act_order"] is True and grid["observer"] == GPTQConfig.observer  # the defaults
    assert main([*base, "--nm", "2:4", "--act-order", "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()
