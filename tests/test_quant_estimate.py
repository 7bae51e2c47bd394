"""Validation of the width estimate (pruning.quant.estimate_check): what is measured is one unit's GPTQ result alone,
checked against a plain recomputation; the correlations on known orders."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import fresh, random_windows

from importance.scoring import score
from pruning.quant.bits import quant_units
from pruning.quant.estimate_check import check_estimate, correlations, sample_units
from pruning.quant.gptq_model import GPTQConfig, gptq_errors
from pruning.second_order.gptq import gptq


def test_sample_covers_every_component_kind_in_model_order():
    lm = fresh("llama")
    units, _ = quant_units(lm.model, group_size=16)
    picked = sample_units(units, 7, seed=3)
    assert len(picked) == 7 and len({u.name for u in picked}) == 7
    assert {u.components for u in picked} == {u.components for u in units}  # all 7 kinds of a llama block
    order = [u.name for u in units]
    assert [order.index(u.name) for u in picked] == sorted(order.index(u.name) for u in picked)
    assert sample_units(units, 7, seed=3) == picked and sample_units(units, 99) == units


def test_correlations_on_known_orders():
    rows = [{"bits": b, "measured": m, "predicted": p, "rtn_fisher": r}
            for b, m, p, r in [(2, 4.0, 40, 1), (2, 3.0, 30, 2), (2, 1.0, 10, 3), (4, 0.5, 5, 1), (4, 0.1, 1, 2)]]
    out = correlations(rows, (2, 4))
    assert out["spearman"]["pooled"] == pytest.approx(1.0)
    assert out["spearman"]["per_width"] == {2: pytest.approx(1.0), 4: pytest.approx(1.0)}
    assert out["spearman_rtn_fisher"]["per_width"] == {2: pytest.approx(-1.0), 4: pytest.approx(-1.0)}
    # pooled baseline: ranks (1.5, 3.5, 5, 1.5, 3.5) against measured ranks (5, 4, 3, 2, 1): -2 / sqrt(9 * 10)
    assert out["spearman_rtn_fisher"]["pooled"] == pytest.approx(-2 / math.sqrt(90), abs=1e-9)


def test_measured_rows_are_one_unit_alone_and_the_model_is_left_as_it_was():
    lm = fresh("llama", scale=0.1)
    calib = random_windows(6, 24, seed=0, high=261)
    evalw = random_windows(4, 24, seed=1, high=261)
    table = score(lm, calib, ["fisher"], elements=True, progress=False)
    units, _ = quant_units(lm.model, group_size=16)
    unit = next(u for u in units if u.layer == 0 and u.components == ("attn.q",))
    cfg = GPTQConfig("gptq", observer="minmax")  # the grid this exact case was written for
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    out = check_estimate(lm, [unit], (2, 4), calib, evalw, cfg, table, batch_size=3)
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    assert [r["bits"] for r in out["rows"]] == [2, 4]
    predicted, _ = gptq_errors(lm.model, [unit], (2, 4), calib, cfg, table, 3)
    assert [r["predicted"] for r in out["rows"]] == [predicted[unit.name][2], predicted[unit.name][4]]

    # independent: X^T X of the first block's q_proj input by a hook, GPTQ on it, the loss by the model's own
    mod = lm.model.get_submodule(unit.name)
    xs = []
    hook = mod.register_forward_hook(lambda m, a, o: xs.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        lm.model(input_ids=calib.input_ids)
        hook.remove()
        x = torch.cat(xs).double()  # [tokens, in]
        dense = lm.model(input_ids=evalw.input_ids, labels=evalw.input_ids).loss.item()
        for row in out["rows"]:
            q = gptq(mod.weight.detach().float(), (x.T @ x).float(), x.shape[0], cfg.spec(row["bits"], unit),
                     act_order=cfg.act_order, error=False, observer=cfg.observer)
            mod.weight.copy_(q.weight)
            loss = lm.model(input_ids=evalw.input_ids, labels=evalw.input_ids).loss.item()
            mod.weight.copy_(before[f"{unit.name}.weight"])
            assert row["measured"] == pytest.approx(loss - dense, rel=1e-3, abs=1e-6)
    assert out["rows"][0]["measured"] > out["rows"][1]["measured"] > 0  # 2 bits cost more than 4 here
