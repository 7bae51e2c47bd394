"""pruning.methods.allocate: uniform, importance-guided and global ratios, and exact whole-element counts."""

from __future__ import annotations

import pytest
import torch

from importance.errors import ImpruneError
from pruning.methods.allocate import (
    allocate,
    element_counts,
    global_ratios,
    importance_ratios,
    split_counts,
    uniform_ratios,
)


def _weighted_mean(r: torch.Tensor, sizes: torch.Tensor) -> float:
    return float((r.double() * sizes.double()).sum() / sizes.double().sum())


def test_uniform_ratios_are_the_target() -> None:
    sizes = torch.tensor([3.0, 5.0, 7.0])
    assert uniform_ratios(sizes, 0.3).tolist() == [0.3, 0.3, 0.3]


@pytest.mark.parametrize("transform", ["linear", "log", "rank"])
@pytest.mark.parametrize("target, band", [(0.5, 0.1), (0.05, 0.1), (0.95, 0.1), (0.3, 0.25), (0.0, 0.2)])
def test_importance_ratios_bounded_with_exact_weighted_mean(target: float, band: float, transform: str) -> None:
    gen = torch.Generator().manual_seed(1)
    importance = torch.rand(12, generator=gen, dtype=torch.float64) * 10 + 0.01
    sizes = torch.randint(1, 1000, (12,), generator=gen).double()
    r = importance_ratios(importance, sizes, target, band, transform)
    assert abs(_weighted_mean(r, sizes) - target) < 1e-9
    assert (r >= max(0.0, target - band) - 1e-12).all() and (r <= min(target + band, 1.0) + 1e-12).all()
    assert (r < 1.0).all()
    # more important -> never a higher ratio
    order = torch.argsort(importance)
    assert (r[order].diff() <= 1e-12).all()


def test_importance_ratios_use_the_band_and_equal_importance_is_uniform() -> None:
    sizes = torch.ones(4, dtype=torch.float64)
    r = importance_ratios(torch.tensor([1.0, 2.0, 3.0, 4.0]), sizes, 0.5, 0.1, "linear")
    # linear signal -1, -1/3, 1/3, 1 -> 0.6, 0.5333, 0.4667, 0.4 (already mean 0.5: no shift)
    assert torch.allclose(r, torch.tensor([0.6, 0.5 + 0.1 / 3, 0.5 - 0.1 / 3, 0.4], dtype=torch.float64))
    same = importance_ratios(torch.full((4,), 2.0), sizes, 0.5, 0.1)
    assert torch.allclose(same, torch.full((4,), 0.5, dtype=torch.float64))
    assert torch.allclose(importance_ratios(torch.tensor([1.0, 5.0]), torch.ones(2), 0.4, 0.0),
                          torch.full((2,), 0.4, dtype=torch.float64))


@pytest.mark.parametrize("target, band, msg", [(1.0, 0.1, "outside [0, 1)"), (-0.1, 0.1, "outside [0, 1)"),
                                               (0.5, -0.1, "--band")])
def test_bad_targets_are_refused(target: float, band: float, msg: str) -> None:
    with pytest.raises(ImpruneError, match=msg.replace("[", r"\[").replace(")", r"\)")):
        importance_ratios(torch.ones(3), torch.ones(3), target, band)


def test_global_ratios_match_one_threshold() -> None:
    gen = torch.Generator().manual_seed(0)
    units = [torch.rand(5, 7, generator=gen) * s for s in (1.0, 3.0, 0.5)]
    r = global_ratios(units, 0.4)
    flat = torch.cat([u.flatten() for u in units])
    k = round(0.4 * flat.numel())
    threshold = flat.sort().values[k - 1]  # distinct random values: the k-th smallest
    expected = torch.tensor([float((u <= threshold).double().mean()) for u in units], dtype=torch.float64)
    assert torch.equal(r, expected)
    sizes = torch.tensor([u.numel() for u in units], dtype=torch.float64)
    assert round(float((r * sizes).sum())) == k


def test_element_counts_sum_exactly_and_stay_within_one_element() -> None:
    ratios = torch.tensor([0.33, 0.5, 0.71, 0.0, 0.12], dtype=torch.float64)
    sizes = torch.tensor([7, 10, 13, 5, 9], dtype=torch.float64)
    counts = element_counts(ratios, sizes, 17)
    assert int(counts.sum()) == 17
    assert ((counts.double() - ratios * sizes).abs() < 1.0).all()
    assert counts[3] == 0
    assert split_counts(7, [3, 3, 3]) == [3, 2, 2]
    assert split_counts(0, [3, 3]) == [0, 0]


def test_allocate_from_a_table(tiny_table) -> None:
    table = tiny_table
    comps = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]
    sizes = table.tensors["count/component"][:, [table.components.index(c) for c in comps]].double()
    per_layer = allocate(table, "fisher", 0.5, "importance", 0.2, comps, granularity="layer", transform="linear")
    r = torch.tensor([[per_layer[i][c] for c in comps] for i in range(table.n_layers)], dtype=torch.float64)
    assert (r == r[:, :1]).all()  # one ratio per layer
    assert abs(float((r * sizes).sum() / sizes.sum()) - 0.5) < 1e-9
    # independent: the layer with the larger size-weighted mean fisher per weight gets the lower ratio
    imp = table.matrix("fisher", "component", aggregation="mean")[:, [table.components.index(c) for c in comps]]
    layer_imp = (imp.double() * sizes).sum(1) / sizes.sum(1)
    assert (r[layer_imp.argmax(), 0] < r[layer_imp.argmin(), 0])
    per_comp = allocate(table, "fisher", 0.5, "importance", 0.2, comps, granularity="component")
    rc = torch.tensor([[per_comp[i][c] for c in comps] for i in range(table.n_layers)], dtype=torch.float64)
    assert abs(float((rc * sizes).sum() / sizes.sum()) - 0.5) < 1e-9
    assert len(set(rc.flatten().tolist())) > 2
    uni = allocate(table, "fisher", 0.3, "uniform", components=comps)
    assert all(v == 0.3 for row in uni.values() for v in row.values())


def test_allocate_refuses_unknown_components_and_scorers(tiny_table) -> None:
    with pytest.raises(ImpruneError, match="not in the importance table"):
        allocate(tiny_table, "fisher", 0.5, "importance", components=["attn.x"])
    with pytest.raises(ImpruneError, match="needs scores for 'taylor'"):
        allocate(tiny_table, "taylor", 0.5, "importance", components=["attn.q"])
    with pytest.raises(ImpruneError, match="not a table allocation"):
        allocate(tiny_table, "fisher", 0.5, "global")


@pytest.fixture(scope="module")
def tiny_table():
    from importance.scoring import score
    from tests.conftest import random_windows, tiny

    return score(tiny("llama"), random_windows(4, 16), ["fisher"], progress=False)
