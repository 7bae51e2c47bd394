"""Unstructured and N:M pruning (pruning.methods.unstructured, pruning.second_order: sparsegpt, sequential)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from importance.arch.canonical import model_map
from importance.engine.blockwise import BlockInput
from importance.errors import ImpruneError
from pruning.methods.masks import lowest_mask, nm_mask
from pruning.methods.unstructured import (
    UnstructuredConfig,
    default_signal,
    prune_unstructured,
    select_components,
)
from pruning.second_order.sequential import run_sequential
from pruning.second_order.sparsegpt import sparsegpt
from tests.conftest import fresh, random_windows

CRITERIA = ["magnitude", "wanda", "taylor", "fisher", "sparsegpt"]


def _zeros(lm, names=None) -> dict[tuple[int, str], torch.Tensor]:
    return {(c.layer, c.name): (c.weight == 0) for c in select_components(model_map(lm.model), names)}


# ----------------------------------------------------------------------------------------- masks

def test_lowest_mask_counts_and_positions() -> None:
    gen = torch.Generator().manual_seed(0)
    s = torch.rand(5, 8, generator=gen)
    m = lowest_mask(s, 13, "matrix")
    assert int(m.sum()) == 13
    assert s[m].max() < s[~m].min()  # the 13 smallest, found independently by the order
    r = lowest_mask(s, 13, "row")
    assert r.sum(1).tolist() == [3, 3, 3, 2, 2]
    for i in range(5):
        k = int(r[i].sum())
        assert torch.equal(r[i], s[i] <= s[i].sort().values[k - 1])
    ties = lowest_mask(torch.zeros(2, 4), 3, "matrix")
    assert ties.flatten().tolist() == [True, True, True, False, False, False, False, False]


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (3, 8)])
def test_nm_mask_keeps_n_of_every_m(n: int, m: int) -> None:
    s = torch.rand(6, 16, generator=torch.Generator().manual_seed(3))
    mask = nm_mask(s, n, m)
    kept = (~mask).reshape(6, -1, m)
    assert (kept.sum(-1) == n).all()
    groups = s.reshape(6, -1, m)
    assert (torch.where(kept, groups, torch.inf).amin(-1) >= torch.where(~kept, groups, -torch.inf).amax(-1)).all()


# ----------------------------------------------------------------------------------------- exact sparsity

@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("allocation", ["uniform", "importance", "global"])
def test_achieved_sparsity_is_the_target_per_module_layer_and_overall(criterion: str, allocation: str) -> None:
    lm = fresh("llama", scale=0.1)
    cfg = UnstructuredConfig(0.37, criterion, allocation=allocation, band=0.2, alloc_scorer="owl")
    res = prune_unstructured(lm, cfg, windows=random_windows(4, 16), batch_size=2)
    zeros = _zeros(lm)
    comps = select_components(model_map(lm.model))
    ratios = res.record["allocation"]["ratios"]
    total = sum(c.numel for c in comps)
    assert abs(sum(int(z.sum()) for z in zeros.values()) - 0.37 * total) <= 0.5  # overall: round(target x N)
    for c in comps:
        z = int(zeros[(c.layer, c.name)].sum())
        assert abs(z - ratios[str(c.layer)][c.name] * c.numel) < 1.0 + 1e-6  # per module: one element
        assert res.sparsity[c.layer][c.name] == z / c.numel
    if allocation == "uniform":
        for layer in range(model_map(lm.model).n_layers):
            n = sum(c.numel for c in comps if c.layer == layer)
            z = sum(int(zeros[(c.layer, c.name)].sum()) for c in comps if c.layer == layer)
            assert abs(z - 0.37 * n) <= 7  # per layer: within one element per module
    assert res.record["achieved"]["overall"] == pytest.approx(round(0.37 * total) / total)


def test_guided_allocation_defaults_to_fisher_and_follows_it() -> None:
    from importance.scoring import score

    lm = fresh("llama", scale=0.1)
    windows = random_windows(4, 16)
    table = score(lm, windows, ["fisher", "activation"], progress=False)
    assert default_signal(None) == "fisher" and default_signal(table) == "fisher"
    assert default_signal(score(lm, windows, ["magnitude", "block_influence"], progress=False)) == "magnitude"
    res = prune_unstructured(lm, UnstructuredConfig(0.5, "wanda", allocation="importance", band=0.1), table,
                             windows, batch_size=2)
    how = res.record["allocation"]
    assert how["signal"] == "fisher" and how["transform"] == "log"
    per_layer = table.matrix("fisher", "component", aggregation="mean").double().mean(1)  # [L]
    layer_ratio = [sum(v.values()) / len(v) for _, v in sorted(res.record["allocation"]["ratios"].items())]
    # the more important layer (by mean Fisher per weight) loses less
    hi, lo = int(per_layer.argmax()), int(per_layer.argmin())
    assert layer_ratio[hi] < layer_ratio[lo]


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_nm_groups_have_exactly_n_nonzeros(model_type: str, criterion: str) -> None:
    lm = fresh(model_type, scale=0.1)
    prune_unstructured(lm, UnstructuredConfig(0.5, criterion, nm=(2, 4)), windows=random_windows(4, 16))
    for c in select_components(model_map(lm.model)):
        nz = (c.weight != 0).reshape(c.shape[0], -1, 4).sum(-1)
        assert (nz == 2).all(), (c.layer, c.name)


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gpt2"])
@pytest.mark.parametrize("criterion", CRITERIA)
def test_ratio_zero_leaves_logits_identical(model_type: str, criterion: str) -> None:
    lm = fresh(model_type, scale=0.1)
    ids = random_windows(2, 12, seed=5).input_ids
    with torch.no_grad():
        before = lm.model(input_ids=ids).logits
    prune_unstructured(lm, UnstructuredConfig(0.0, criterion), windows=random_windows(3, 16))
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids).logits, before)


def test_components_selection_prunes_only_those() -> None:
    lm = fresh("llama", scale=0.1)
    prune_unstructured(lm, UnstructuredConfig(0.5, "magnitude", components=("attn.q", "mlp.down")))
    for c in model_map(lm.model).components():
        if c.kind == "linear":
            assert bool((c.weight == 0).any()) == (c.name in ("attn.q", "mlp.down"))
    with pytest.raises(ImpruneError, match="not prunable linears"):
        select_components(model_map(lm.model), ["attn.x"])


# ----------------------------------------------------------------------------------------- criteria

def _inputs_sq(lm, windows) -> dict[int, torch.Tensor]:
    """Sum over non-padding tokens of x^2 per input channel of every module, by plain hooks (independent)."""
    sums: dict[int, torch.Tensor] = {}
    mask = windows.attention_mask.bool().reshape(-1)

    def hook(mod, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1])[mask]
        sums[id(mod)] = sums.get(id(mod), 0) + x.square().sum(0)

    hs = [c.module.register_forward_pre_hook(hook) for c in select_components(model_map(lm.model))]
    with torch.no_grad():
        lm.model(input_ids=windows.input_ids, attention_mask=windows.attention_mask)
    for h in hs:
        h.remove()
    return sums


def test_wanda_equals_an_independent_computation() -> None:
    lm = fresh("llama", scale=0.1)
    windows = random_windows(3, 16, pad_last=5)
    sq = _inputs_sq(lm, windows)
    expected = {}
    for c in select_components(model_map(lm.model)):
        s = c.weight.abs() * sq[id(c.module)].sqrt()[None, :]
        k = c.shape[1] // 2  # row scope at 50%: every row loses half of its (even) inputs
        expected[(c.layer, c.name)] = s <= s.sort(dim=1).values[:, k - 1:k]
    prune_unstructured(lm, UnstructuredConfig(0.5, "wanda", sequential=False), windows=windows, batch_size=3)
    for key, z in _zeros(lm).items():
        assert torch.equal(z, expected[key]), key


def test_sparsegpt_reconstructs_better_than_wanda_on_one_layer() -> None:
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(32, 32, generator=gen)
    x = torch.randn(512, 32, generator=gen) @ mix  # correlated inputs [n, in]
    w = torch.randn(16, 32, generator=gen)
    xtx = x.T.double() @ x.double()
    wanda = w.abs() * x.square().sum(0).sqrt()
    w_wanda = w.masked_fill(lowest_mask(wanda, w.numel() // 2, "row"), 0)
    w_sgpt = sparsegpt(w, xtx, x.shape[0], choose=lambda sal, start: lowest_mask(sal, sal.numel() // 2, "row"),
                       blocksize=8)
    assert int((w_sgpt == 0).sum()) == w.numel() // 2
    err = lambda v: float((x @ (w - v).T).square().sum())  # noqa: E731
    assert err(w_sgpt) < 0.8 * err(w_wanda)
    w_nm = sparsegpt(w, xtx, x.shape[0], nm=(2, 4), blocksize=8)
    assert ((w_nm != 0).reshape(16, -1, 4).sum(-1) == 2).all()
    assert err(w_nm) < err(w.masked_fill(nm_mask(wanda, 2, 4), 0))


# ----------------------------------------------------------------------------------------- sequential runner

def test_block_runner_reproduces_the_models_hidden_states() -> None:
    lm = fresh("llama", scale=0.1)
    windows = random_windows(4, 12, pad_last=3)
    with torch.no_grad():
        hidden = lm.model(input_ids=windows.input_ids, attention_mask=windows.attention_mask,
                          output_hidden_states=True).hidden_states
    seen: dict[int, torch.Tensor] = {}

    def step(layer: int, block: torch.nn.Module, inputs: list[BlockInput], stats: object) -> None:
        seen[layer] = torch.cat([item.hidden for item in inputs])

    mm = model_map(lm.model)
    blocks = mm.blocks
    run_sequential(lm.model, mm, windows, step, batch_size=2)
    assert sorted(seen) == list(range(len(blocks)))
    for layer, h in seen.items():
        assert torch.allclose(h, hidden[layer], atol=1e-5), layer


def test_sequential_sparsegpt_sees_pruned_inputs() -> None:
    windows = random_windows(4, 16)
    a, b = fresh("llama", scale=0.1), fresh("llama", scale=0.1)
    prune_unstructured(a, UnstructuredConfig(0.5, "sparsegpt", sequential=True), windows=windows)
    prune_unstructured(b, UnstructuredConfig(0.5, "sparsegpt", sequential=False), windows=windows)
    za, zb = _zeros(a), _zeros(b)
    assert all(torch.equal(za[k], zb[k]) for k in za if k[0] == 0)  # block 0 sees the same inputs
    assert any(not torch.equal(za[k], zb[k]) for k in za if k[0] == 1)  # block 1 does not


# ----------------------------------------------------------------------------------------- CLI and reload

def _cli(tmp_path: Path, *argv: str) -> int:
    from pruning.cli.core import main

    return main(["prune", "--model", "random:llama", "--no-eval", "--quiet", "--data", "austen:train",
                 "--tokens", "128", "--seq-len", "32", *argv])


def test_cli_writes_a_folder_plain_transformers_reloads_with_zeros(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from importance.scoring import score
    from tests.conftest import tiny

    scores = tmp_path / "scores"
    score(tiny("llama"), random_windows(4, 16), ["fisher", "activation"], progress=False).save(scores)
    out = tmp_path / "out"
    assert _cli(tmp_path, "--method", "unstructured", "--criterion", "wanda", "--sparsity", "0.5", "--allocation",
                "importance", "--alloc-scorer", "fisher", "--scores", str(scores), "--out", str(out)) == 0
    record = json.loads((out / "imprune.json").read_text())
    assert record["allocation"]["method"] == "importance" and record["allocation"]["signal"] == "fisher"
    assert record["achieved"]["overall"] == pytest.approx(0.5, abs=1e-6)
    again = AutoModelForCausalLM.from_pretrained(out)
    comps = select_components(model_map(again))
    zeros = sum(int((c.weight == 0).sum()) for c in comps)
    assert zeros == round(0.5 * sum(c.numel for c in comps))
    for c in comps:
        assert float((c.weight == 0).double().mean()) == record["sparsity"][str(c.layer)][c.name]


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gpt2"])
def test_pruned_weights_stay_zero_after_save_and_reload(model_type: str, tmp_path: Path) -> None:
    from importance.models.load import load_model
    from pruning.io import save_model

    lm = fresh(model_type, scale=0.1)
    res = prune_unstructured(lm, UnstructuredConfig(0.5, "wanda", nm=(2, 4)), windows=random_windows(3, 16))
    save_model(lm, tmp_path / "m", res.record)
    again = load_model(str(tmp_path / "m"))
    z1, z2 = _zeros(lm), _zeros(again)
    assert all(torch.equal(z1[k], z2[k]) for k in z1)
    ids = random_windows(2, 10, seed=9).input_ids
    with torch.no_grad():
        assert torch.allclose(lm.model(input_ids=ids).logits, again.model(input_ids=ids).logits, atol=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["--method", "unstructured", "--sparsity", "1.0"], "outside [0, 1)"),
    (["--method", "nm", "--sparsity", "0.0", "--nm", "4:4"], "needs 0 < N < M"),
    (["--method", "nm", "--sparsity", "0.5", "--nm", "2:4", "--allocation", "importance"], "drop --allocation"),
    (["--method", "nm", "--sparsity", "0.3", "--nm", "2:4"], "does not match 2:4"),
    (["--method", "nm", "--sparsity", "0.5", "--nm", "two"], "is not N:M"),
    (["--method", "unstructured", "--sparsity", "0.5", "--components", ","], "--components is empty"),
    (["--method", "unstructured", "--sparsity", "0.5", "--components", "attn.x"], "not prunable linears"),
    (["--method", "unstructured", "--sparsity", "0.5", "--criterion", "obs"], "unknown --criterion"),
    (["--method", "unstructured", "--sparsity", "0.5", "--scope", "column"], "unknown --scope"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv: list[str], message: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = _cli(tmp_path, "--out", str(out), *argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_table_from_another_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from importance.models.load import load_model
    from importance.scoring import score

    other = load_model("random:llama:hidden=32,heads=2,kv_heads=1,intermediate=64")
    scores = tmp_path / "scores"
    score(other, random_windows(2, 8), ["fisher"], progress=False).save(scores)
    out = tmp_path / "out"
    code = _cli(tmp_path, "--method", "unstructured", "--sparsity", "0.5", "--allocation", "importance",
                "--alloc-scorer", "fisher", "--scores", str(scores), "--out", str(out))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "another model" in err
    assert not out.exists()


# ----------------------------------------------------------------------------------------- integration

@pytest.mark.integration
def test_smollm2_wanda_half_reloads_with_plain_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from pruning.cli.core import main

    out = tmp_path / "m"
    code = main(["prune", "--model", "builtin:smollm2-135m", "--method", "unstructured", "--criterion", "wanda",
                 "--sparsity", "0.5", "--allocation", "importance", "--tokens", "512", "--seq-len", "128",
                 "--no-eval", "--quiet", "--out", str(out)])
    assert code == 0
    again = AutoModelForCausalLM.from_pretrained(out)
    comps = select_components(model_map(again))
    zeros = sum(int((c.weight == 0).sum()) for c in comps)
    assert zeros == round(0.5 * sum(c.numel for c in comps))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_semi_structured_kernels_are_refused_without_cuda() -> None:
    from pruning.methods.unstructured import to_semi_structured_

    with pytest.raises(ImpruneError, match="need a CUDA GPU"):
        to_semi_structured_(fresh("llama").model)
