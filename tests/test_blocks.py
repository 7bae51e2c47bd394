"""Sub-block pruning (``--method blocks``): removing nothing changes nothing, a removed attention or MLP reloads with
the same logits and generates, the removed sub-blocks are the lowest by a loss computed here by hand, the budget
holds, and impossible budgets / architectures are one line and exit 2."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import fresh, random_windows
from test_cli import _fails

from importance.arch.branches import branches, skip_branch_, zeroed
from importance.arch.canonical import model_map
from importance.errors import ImpruneError
from importance.models.load import LoadedModel, load_model
from pruning.cli.core import main
from pruning.io import save_model
from pruning.methods.blocks import block_params, prune_blocks

# pre-norm families with one attention and one MLP module (output norms, parallel blocks, shared norms, MoE)
BRANCH_TYPES = ["llama", "qwen3", "gemma2", "olmo2", "phi3", "gpt2", "gpt_neox", "cohere", "falcon", "mixtral"]


def _ids(n: int = 2, t: int = 12) -> torch.Tensor:
    return torch.randint(5, 261, (n, t), generator=torch.Generator().manual_seed(1))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _model(layers: int = 4, scale: float = 0.2) -> LoadedModel:
    lm = load_model(f"random:llama:layers={layers}")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-trivial weights, so removals change the loss by different amounts
        for name, p in lm.model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            p.copy_(noise + 1.0 if "norm" in name else noise)
    return lm


def test_removing_nothing_changes_no_logit() -> None:
    lm = _model()
    ids = _ids()
    ref = _logits(lm.model, ids)
    n = sum(p.numel() for p in lm.model.parameters())
    res = prune_blocks(lm, 0.0, windows=random_windows(4, 32))
    assert res.record["structured"]["sub_blocks_removed"] == []
    assert torch.equal(_logits(lm.model, ids), ref)
    assert sum(p.numel() for p in lm.model.parameters()) == n


@pytest.mark.parametrize("model_type", BRANCH_TYPES)
def test_removed_sub_block_is_gone_reloads_and_gives_the_in_memory_logits(model_type: str, tmp_path: Path) -> None:
    lm = fresh(model_type, scale=0.2)
    mm = model_map(lm.model)
    ids = _ids()
    chosen = [b for b in branches(mm) if (b.layer, b.kind) in ((0, "attn"), (1, "mlp"))]
    with zeroed(mm, chosen[0]), zeroed(mm, chosen[1]):
        zero_ref = _logits(lm.model, ids)
    n = sum(p.numel() for p in lm.model.parameters())
    for b in chosen:
        skip_branch_(mm, b)
    mm = model_map(lm.model)
    assert [b.skipped for b in mm.blocks[:2]] == [("attn",), ("mlp",)]
    assert not any(c.name.startswith("attn.") for c in mm.blocks[0].components.values())
    assert sum(p.numel() for p in lm.model.parameters()) == n - sum(b.params for b in chosen)
    got = _logits(lm.model, ids)
    assert torch.allclose(got, zero_ref, atol=1e-6, rtol=0)  # skipping == the branch adding zero
    folder = save_model(lm, tmp_path / "pruned", {"shapes_changed": True, "method": "blocks"})
    meta = json.loads((folder / "imprune.json").read_text())
    assert meta["reload"] == "importance.models.pruned.load_pruned"
    assert meta["layer_shapes"]["skipped"] == {"0": ["attn"], "1": ["mlp"]}
    back = load_model(str(folder))
    assert sum(p.numel() for p in back.model.parameters()) == n - sum(b.params for b in chosen)
    assert torch.equal(_logits(back.model, ids), got)
    # generation with a KV cache (layer 0 has no attention to fill it) = generation recomputing everything
    prompt = ids[:1, :5]
    cached = back.model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    plain = back.model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def _hand_means(lm: LoadedModel, ids: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """Each sub-block's mean output over every token of ``ids`` (no padding), from forward hooks on the bias-free
    Llama's output projections (o_proj / down_proj: what each branch adds to the residual)."""
    out: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for layer, block in enumerate(lm.model.model.layers):
        for kind, module in (("attn", block.self_attn.o_proj), ("mlp", block.mlp.down_proj)):
            handles.append(module.register_forward_hook(
                lambda _m, _a, y, key=(layer, kind): out.__setitem__(key, y.double().mean((0, 1)).float())))
    with torch.no_grad():
        lm.model(input_ids=ids)
    for h in handles:
        h.remove()
    return out


def _hand_nll(lm: LoadedModel, ids: torch.Tensor, removed: list[tuple[int, str]],
              means: dict[tuple[int, str], torch.Tensor] | None = None) -> float:
    """Mean token NLL with these sub-blocks' output projections zeroed (a bias-free Llama: their output is 0), or
    replaced by a bias-only layer adding the branch's mean; one batch, so transformers' own mean loss is the mean
    token NLL."""
    model = copy.deepcopy(lm.model)
    for layer, kind in removed:
        block = model.model.layers[layer]
        proj = block.self_attn.o_proj if kind == "attn" else block.mlp.down_proj
        proj.weight.data.zero_()
        if means is not None:
            proj.bias = torch.nn.Parameter(means[(layer, kind)].clone())
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("compensate", ["none", "mean"])
def test_removed_sub_blocks_are_the_lowest_measured_by_hand(compensate: str) -> None:
    lm = _model()
    windows = random_windows(4, 32, seed=2)
    ids = windows.input_ids
    means = _hand_means(lm, ids) if compensate == "mean" else None
    base = _hand_nll(lm, ids, [])
    mm = model_map(lm.model)
    cands = branches(mm)
    total = block_params(mm)
    hand = {(b.layer, b.kind): _hand_nll(lm, ids, [(b.layer, b.kind)], means) - base for b in cands}
    dense = copy.deepcopy(lm)
    sparsity = 0.3
    res = prune_blocks(lm, sparsity, windows=windows, batch_size=4, compensate=compensate)
    s = res.record["structured"]
    for key, value in hand.items():
        assert s["scores"][f"{key[0]} {key[1]}"] == pytest.approx(value, abs=2e-5)
    # by hand: ascending hand delta per parameter, take what fits in the budget, never the last of a kind
    params = {(b.layer, b.kind): b.params for b in cands}
    left, used, want = {"attn": 4, "mlp": 4}, 0, set()
    for key in sorted(hand, key=lambda k: hand[k] / params[k]):
        if used + params[key] <= sparsity * total and left[key[1]] > 1:
            want.add(key)
            used += params[key]
            left[key[1]] -= 1
    assert want, "the budget should take at least one sub-block"
    assert {(r["layer"], r["kind"]) for r in s["sub_blocks_removed"]} == want
    assert s["calibration_nll"]["dense"] == pytest.approx(base, abs=2e-5)
    assert s["calibration_nll"]["after"] == pytest.approx(_hand_nll(dense, ids, sorted(want), means), abs=2e-5)
    stand_ins = [m for m in lm.model.modules() if type(m).__name__ == "SkippedBranch"]
    assert len(stand_ins) == len(want) and all((m.bias is None) == (means is None) for m in stand_ins)


@pytest.mark.parametrize("compensate", ["none", "mean"])
def test_iterative_blocks_is_the_greedy_choice_by_hand(compensate: str) -> None:
    lm = _model(layers=3)
    windows = random_windows(4, 32, seed=2)
    ids = windows.input_ids
    means = _hand_means(lm, ids) if compensate == "mean" else None
    mm = model_map(lm.model)
    params = {(b.layer, b.kind): b.params for b in branches(mm)}
    budget = 0.45 * block_params(mm)
    dense = copy.deepcopy(lm)
    res = prune_blocks(lm, 0.45, windows=windows, iterative=True, compensate=compensate)
    want: list[tuple[int, str]] = []
    while True:  # by hand: each round the lowest loss increase per parameter with the chosen ones removed
        fit = [k for k in params if k not in want and sum(params[c] for c in want) + params[k] <= budget
               and sum(c[1] == k[1] for c in want) < 2]  # one of each kind stays (3 of each)
        if not fit:
            break
        now = _hand_nll(dense, ids, want, means)
        want.append(min(fit, key=lambda k: ((_hand_nll(dense, ids, [*want, k], means) - now) / params[k], k)))
    got = res.record["structured"]
    assert [(r["layer"], r["kind"]) for r in got["sub_blocks_removed"]] == want
    assert got["iterative"]["nll_after_each"][-1] == pytest.approx(_hand_nll(dense, ids, want, means), abs=2e-5)
    assert got["iterative"]["partial_forwards"] >= len(params)


def test_compensated_removal_keeps_a_block_as_its_constants_and_reloads(tmp_path: Path) -> None:
    lm = _model(layers=4)
    ids = random_windows(4, 32, seed=2).input_ids
    means = _hand_means(lm, ids)
    mm = model_map(lm.model)
    chosen = [b for b in branches(mm) if b.layer == 1 or (b.layer, b.kind) == (2, "attn")]  # block 1 loses both
    want = _hand_nll(lm, ids, [(b.layer, b.kind) for b in chosen], means)
    from pruning.methods.blocks import remove_branches

    mm, dropped, _ = remove_branches(mm, chosen, {k: v for k, v in means.items()})
    assert dropped == [] and mm.n_layers == 4 and mm.blocks[1].skipped == ("attn", "mlp")
    with torch.no_grad():
        got = float(lm.model(input_ids=ids, labels=ids).loss)
    assert got == pytest.approx(want, abs=1e-5)
    folder = save_model(lm, tmp_path / "pruned", {"shapes_changed": True, "method": "blocks"})
    shapes = json.loads((folder / "imprune.json").read_text())["layer_shapes"]
    assert shapes["skipped_constants"] == {"1": {"attn": 64, "mlp": 64}, "2": {"attn": 64}}
    back = load_model(str(folder))
    assert torch.equal(_logits(back.model, ids), _logits(lm.model, ids))
    stand_in = back.model.model.layers[2].self_attn
    assert torch.equal(stand_in.bias.detach(), means[(2, "attn")])


@pytest.mark.parametrize(("sparsity", "compensate"), [(0.1, "none"), (0.3, "mean"), (0.5, "none"), (0.8, "mean")])
def test_budget_is_respected(sparsity: float, compensate: str) -> None:
    lm = _model(layers=6)
    mm = model_map(lm.model)
    total, n = block_params(mm), sum(p.numel() for p in lm.model.parameters())
    smallest = min(b.params for b in branches(mm))
    res = prune_blocks(lm, sparsity, windows=random_windows(2, 32), compensate=compensate)
    s = res.record["structured"]
    removed = n - sum(p.numel() for p in lm.model.parameters())
    constants = 64 * len(s["sub_blocks_removed"]) if compensate == "mean" else 0  # one [d] per stand-in
    assert removed == sum(r["params"] for r in s["sub_blocks_removed"]) - constants \
        == res.record["params_plan"]["removed"]
    assert removed <= sparsity * total
    assert total - block_params(model_map(lm.model)) == removed
    # no smaller sub-block that was left out would still have fitted (the budget is filled)
    left = sparsity * total - removed
    after = model_map(lm.model)
    kinds = [k for b in after.blocks for k in ("attn", "mlp") if k not in b.skipped]
    assert left < smallest or min(kinds.count("attn"), kinds.count("mlp")) == 1
    if s["layers_removed"]:  # a block that lost both is gone whole
        assert after.n_layers == mm.n_layers - len(s["layers_removed"])


def test_blocks_dropping_a_whole_block_matches_the_zeroed_model() -> None:
    lm = _model(layers=6)
    ids = _ids()
    mm = model_map(lm.model)
    cands = branches(mm)
    res = prune_blocks(lm, 0.8, windows=random_windows(2, 32), compensate="none")
    chosen = [b for b in cands if any((r["layer"], r["kind"]) == (b.layer, b.kind)
                                      for r in res.record["structured"]["sub_blocks_removed"])]
    assert res.record["structured"]["layers_removed"], "0.8 of the block parameters should take whole blocks"
    ref = _model(layers=6)
    rm = model_map(ref.model)
    with contextlib.ExitStack() as stack:
        for b in chosen:
            stack.enter_context(zeroed(rm, b))
        want = _logits(ref.model, ids)
    assert torch.allclose(_logits(lm.model, ids), want, atol=1e-5, rtol=0)


def test_budget_removing_every_sub_block_of_a_kind_is_refused() -> None:
    lm = _model()
    with pytest.raises(ImpruneError, match="would remove every"):
        prune_blocks(lm, 0.95, windows=random_windows(2, 32))


@pytest.mark.parametrize(("model", "extra", "message"), [
    ("random:llama", ["--sparsity", "0.99"], "would remove every"),
    ("random:llama", ["--sparsity", "0.2", "--criterion", "fisher"], "unknown --criterion 'fisher'"),
    ("random:llama", ["--sparsity", "0.2", "--criterion", "gate_fisher", "--iterative"], "use it with --criterion"),
    ("random:llama", ["--sparsity", "0.2", "--iterative-k", "2"], "applies to --iterative only"),
    ("random:opt", ["--sparsity", "0.2"], "no one MLP module"),
    ("random:bloom", ["--sparsity", "0.2"], "does not pass its input through"),
])
def test_cli_refuses_bad_blocks_input(model: str, extra: list[str], message: str, tmp_path: Path, text_file: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = ["prune", "--model", model, "--method", "blocks", *extra, "--data", f"file:{text_file}", "--seq-len", "32",
            "--tokens", "128", "--no-eval", "--quiet", "--out", str(out)]
    assert message in _fails(argv, tmp_path, capsys)
    assert not out.exists()


def test_cli_blocks_writes_a_folder_that_reloads_and_generates(tmp_path: Path, text_file: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["prune", "--model", "random:llama:layers=4", "--method", "blocks", "--sparsity", "0.25", "--data",
                 f"file:{text_file}", "--seq-len", "32", "--tokens", "256", "--no-eval", "--quiet",
                 "--out", str(out)]) == 0
    meta = json.loads((out / "imprune.json").read_text())
    assert meta["structured"]["sub_blocks_removed"] and meta["params"]["after"] < meta["params"]["before"]
    back = load_model(str(out))
    assert sum(p.numel() for p in back.model.parameters()) == meta["params"]["after"]
    gen = back.model.generate(_ids(1, 5), max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 9)
    capsys.readouterr()
    assert main(["info", "--model", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    removed = meta["structured"]["sub_blocks_removed"]
    kept = [r for r in removed if r["layer"] not in meta["structured"]["layers_removed"]]
    assert len(info["sub_blocks_removed"]) == len(kept)


def test_compensated_iterative_layers_are_the_greedy_choice_by_hand(tmp_path: Path) -> None:
    from pruning.methods.depth import prune_layers

    lm = _model(layers=4)
    windows = random_windows(4, 32, seed=2)
    ids = windows.input_ids
    means = _hand_means(lm, ids)
    dense = copy.deepcopy(lm)

    def both(layers: list[int]) -> list[tuple[int, str]]:
        return [(layer, kind) for layer in layers for kind in ("attn", "mlp")]

    res = prune_layers(lm, 0.5, "removal", windows=windows, iterative=True, compensate="mean")
    want: list[int] = []
    for _ in range(2):  # by hand: each round the block whose removal (adding its two means) costs least
        want.append(min((i for i in range(4) if i not in want),
                        key=lambda i: (_hand_nll(dense, ids, both([*want, i]), means), i)))
    s = res.record["structured"]
    assert s["iterative"]["order"] == want and s["layers_removed"] == sorted(want)
    with torch.no_grad():
        got = float(lm.model(input_ids=ids, labels=ids).loss)
    assert got == pytest.approx(_hand_nll(dense, ids, both(want), means), abs=1e-5)
    assert model_map(lm.model).n_layers == 4 and all(model_map(lm.model).blocks[i].skipped == ("attn", "mlp")
                                                     for i in want)
    back = load_model(str(save_model(lm, tmp_path / "pruned", {**res.record, "method": "layers"})))
    assert torch.equal(_logits(back.model, ids), _logits(lm.model, ids))


def test_compensated_layers_on_a_model_without_sub_blocks_name_the_way_out() -> None:
    from pruning.methods.depth import prune_layers

    lm = load_model("random:opt")  # MLP linears directly in the block: no sub-block to keep as a constant
    with pytest.raises(ImpruneError, match=r"--compensate mean .*; use --compensate none$"):
        prune_layers(lm, 0.5, "removal", windows=random_windows(2, 16), iterative=True, compensate="mean")
