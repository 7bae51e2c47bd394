"""The structured OBS choice (``--select obs``): its cost against independent least-squares fits
(torch.linalg.lstsq), the greedy choice against brute force, a case built so that the criterion's ranking
removes what cannot be recovered, the wiring into width pruning, the CLI end to end and its bad input."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
import torch

from importance.arch.canonical import model_map
from importance.data.sources import Windows
from importance.models.load import load_model
from pruning.cli import main
from pruning.methods.structured import StructuredConfig, prune_structured
from pruning.second_order.core import obs_select


def _problem(seed: int = 0, n: int = 300, d_in: int = 12, d_out: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64) @ torch.randn(d_in, d_in, generator=g,
                                                                             dtype=torch.float64)  # correlated
    return x, torch.randn(d_out, d_in, generator=g, dtype=torch.float64)  # X [n, in], W [out, in]


def _fit_error(x: torch.Tensor, w: torch.Tensor, removed: list[int], lam: float = 0.0) -> float:
    """Independent: min over W' (W'_removed = 0) of ||X W^T - X W'^T||^2 + lam ||W - W'||^2, by lstsq on the
    ridge-augmented system [X; sqrt(lam) I] Z = [X W^T; sqrt(lam) W^T]."""
    keep = [j for j in range(w.shape[1]) if j not in set(removed)]
    a = torch.cat([x, lam ** 0.5 * torch.eye(x.shape[1], dtype=x.dtype)])  # [n + in, in]
    b = a @ w.T  # [n + in, out]
    z = torch.linalg.lstsq(a[:, keep], b).solution  # [k, out]
    return float((b - a[:, keep] @ z).square().sum())


@pytest.mark.parametrize("damp", [0.0, 0.05])
@pytest.mark.parametrize("size", [1, 3])
def test_the_cost_of_removing_one_unit_is_its_least_squares_refit_error(damp: float, size: int) -> None:
    x, w = _problem(d_in=12)
    xtx, n = x.T @ x, x.shape[0]
    lam = damp * float(torch.diagonal(xtx).mean())  # damp x mean diag, in output-error units
    groups = torch.arange(12).view(-1, size)  # [G, size]
    for j in range(groups.shape[0]):
        picked, cost = obs_select(w, xtx, n, groups[j: j + 1], 1, damp=damp)
        assert picked == [0]
        ref = _fit_error(x, w, groups[j].tolist(), lam)
        assert cost == pytest.approx(ref, rel=1e-7)


def test_greedy_choice_of_one_unit_is_the_brute_force_best() -> None:
    for seed in range(4):
        x, w = _problem(seed)
        for size in (1, 2):
            groups = torch.arange(12).view(-1, size)
            picked, cost = obs_select(w, x.T @ x, x.shape[0], groups, 1, damp=0.0)
            errors = [_fit_error(x, w, g.tolist()) for g in groups]
            assert picked == [min(range(len(errors)), key=errors.__getitem__)]
            assert cost == pytest.approx(min(errors), rel=1e-7)


def test_greedy_steps_are_exact_given_what_is_already_gone() -> None:
    """The summed greedy cost is the re-fit error of the whole chosen set (the downdates are exact), and each
    step is the best single addition to the earlier ones (brute force over 2 of 6 and 3 of 8)."""
    for seed, (d_in, k) in itertools.product(range(3), ((6, 2), (8, 3))):
        x, w = _problem(seed, d_in=d_in)
        picked, cost = obs_select(w, x.T @ x, x.shape[0], torch.arange(d_in).view(-1, 1), k, damp=0.0)
        assert len(set(picked)) == k and cost == pytest.approx(_fit_error(x, w, picked), rel=1e-7)
        for i in range(1, k):
            best = min(_fit_error(x, w, [*picked[:i], j]) for j in range(d_in) if j not in picked[:i])
            assert _fit_error(x, w, picked[: i + 1]) == pytest.approx(best, rel=1e-7)
        assert cost >= min(_fit_error(x, w, list(s)) for s in itertools.combinations(range(d_in), k)) * (1 - 1e-9)


def test_buckets_each_lose_the_count_and_the_cost_is_still_exact() -> None:
    x, w = _problem(1, d_in=12)
    bucket = torch.arange(12) // 4  # 3 buckets of 4 single columns
    picked, cost = obs_select(w, x.T @ x, x.shape[0], torch.arange(12).view(-1, 1), 2, bucket, damp=0.0)
    assert sorted(int(bucket[p]) for p in picked) == [0, 0, 1, 1, 2, 2]
    assert cost == pytest.approx(_fit_error(x, w, picked), rel=1e-7)


def test_obs_keeps_what_cannot_be_recovered_where_magnitude_removes_it() -> None:
    """Inputs 2 = 3 and 4 = 5 (up to 1e-3 noise) with large weights, 0 and 1 independent with small ones:
    magnitude removes 0 and 1, which no re-fit recovers; OBS removes one of each duplicate pair, which the
    re-fit recovers almost exactly (the twin takes its weight)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(400, 4, generator=g, dtype=torch.float64)  # [n, 4] independent
    x = base[:, [0, 1, 2, 2, 3, 3]] + 1e-3 * torch.randn(400, 6, generator=g, dtype=torch.float64)
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    w = w / w.norm(dim=0) * torch.tensor([0.5, 0.5, 3.0, 3.0, 3.0, 3.0], dtype=torch.float64)
    magnitude = sorted(range(6), key=lambda j: float(w[:, j].norm()))[:2]
    picked, _cost = obs_select(w, x.T @ x, 400, torch.arange(6).view(-1, 1), 2, damp=1e-6)
    assert sorted(magnitude) == [0, 1]
    assert len(set(picked) & {2, 3}) == 1 and len(set(picked) & {4, 5}) == 1
    assert _fit_error(x, w, picked) < 1e-3 * _fit_error(x, w, magnitude)


# ----------------------------------------------------------------------------------------- in width pruning

def _windows(vocab: int, n: int = 6, t: int = 16, seed: int = 0) -> Windows:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    return Windows(ids, torch.ones(n, t, dtype=torch.long), torch.ones(n, t, dtype=torch.bool), {})


def _dense_stats(lm, name: str, w: Windows) -> tuple[torch.Tensor, int]:
    """X^T X and token count of block 0's ``name`` inputs on the dense model (what the sequential runner sees
    in block 0), recomputed here with a plain hook."""
    comp = model_map(lm.model).blocks[0].components[name]
    got = {}
    h = comp.module.register_forward_pre_hook(
        lambda m, a: got.update(x=a[0].detach().float().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        lm.model(input_ids=w.input_ids)
    h.remove()
    return (got["x"].T @ got["x"]).double(), got["x"].shape[0]


@pytest.mark.parametrize("part, gqa", [("channels", "groups"), ("heads", "groups"), ("heads", "per-group")])
def test_width_with_obs_keeps_the_counts_and_chooses_by_the_block_statistics(part: str, gqa: str) -> None:
    base = load_model("random:llama:layers=2,heads=8,kv_heads=2")
    w = _windows(base.model.config.vocab_size)
    block = model_map(base.model).blocks[0]
    layers = {}
    for select in ("fisher", "obs"):
        lm = copy.deepcopy(base)
        cfg = StructuredConfig(0.5, part, criterion="magnitude", gqa=gqa, reconstruct=True, select=select)
        res = prune_structured(lm, cfg, windows=w)
        layers[select] = res.record["structured"]["layers"]
        assert res.record["structured"]["select"] == select
    for key in layers["fisher"]:  # the same counts, so the same parameters and shapes
        f, o = layers["fisher"][key], layers["obs"][key]
        assert [len(f[k]) for k in ("heads_removed", "kv_heads_removed", "channels_removed")] == \
               [len(o[k]) for k in ("heads_removed", "kv_heads_removed", "channels_removed")]
        assert f["params_removed"] == o["params_removed"] and f["intermediate"] == o["intermediate"]
    got = layers["obs"]["0"]
    if part == "channels":
        n = block.intermediate
        picked, _ = obs_select(block.components["mlp.down"].weight, *_dense_stats(base, "mlp.down", w),
                               torch.arange(n).view(n, 1), len(got["channels_removed"]), damp=0.01)
        assert got["channels_removed"] == sorted(picked)
        return
    d, h, g = block.head_dim, block.n_heads, block.n_heads // block.n_kv_heads
    stats = _dense_stats(base, "attn.o", w)
    if gqa == "groups":
        picked, _ = obs_select(block.components["attn.o"].weight, *stats, torch.arange(h * d).view(-1, g * d),
                               len(got["kv_heads_removed"]), damp=0.01)
        assert got["kv_heads_removed"] == sorted(picked)
        assert got["heads_removed"] == [q for j in sorted(picked) for q in range(j * g, (j + 1) * g)]
    else:
        count = len(got["heads_removed"]) // block.n_kv_heads
        picked, _ = obs_select(block.components["attn.o"].weight, *stats, torch.arange(h * d).view(h, d), count,
                               torch.arange(h) // g, damp=0.01)
        assert got["heads_removed"] == sorted(picked) and not got["kv_heads_removed"]


def _cli(tmp_path: Path, *extra: str) -> list[str]:
    return ["prune", "--model", "random:llama", "--method", "width", "--sparsity", "0.3", "--criterion", "magnitude",
            "--tokens", "256", "--seq-len", "32", "--no-eval", "--quiet", "--out", str(tmp_path / "p"), *extra]


def test_cli_select_obs_writes_a_model_that_reloads(tmp_path: Path) -> None:
    assert main(_cli(tmp_path, "--select", "obs")) == 0
    record = json.loads((tmp_path / "p" / "imprune.json").read_text())
    s = record["structured"]
    assert s["select"] == "obs" and "structured OBS" in s["selection"] and s["reconstruct"]
    assert any(k.endswith(" obs") for k in s["reconstruction_error"])
    back = load_model(str(tmp_path / "p"))
    assert sum(p.numel() for p in back.model.parameters()) == record["params_plan"]["after"]
    with torch.no_grad():
        assert torch.isfinite(back.model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits).all()


@pytest.mark.parametrize("extra, message", [
    (["--select", "obs", "--no-reconstruct"], "--select obs chooses the units the re-fit recovers best"),
    (["--select", "obs", "--bias-compensation"], "--select obs chooses the units the re-fit recovers best"),
    (["--select", "obs", "--data", ""], "needs calibration data")])
def test_cli_refuses_select_obs_without_the_refit(tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    assert main(_cli(tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra, select", [([], "obs"), (["--select", "fisher"], "fisher"),
                                           (["--no-reconstruct"], "fisher"), (["--bias-compensation"], "fisher")])
def test_cli_selects_by_obs_by_default_where_it_refits(tmp_path: Path, extra: list[str], select: str) -> None:
    assert main(_cli(tmp_path, *extra)) == 0
    s = json.loads((tmp_path / "p" / "imprune.json").read_text())["structured"]
    refit = not {"--no-reconstruct", "--bias-compensation"} & set(extra)
    assert s["select"] == select and s["reconstruct"] == refit
