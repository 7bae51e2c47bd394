"""Linear stand-ins for removed blocks (``--method layers --compensate linear``): the damped affine solve equals an
independent ``torch.linalg.lstsq``; each removed block's map is the least-squares fit, computed here by hand with
hooks, of the dense model's stream from what the pruned model feeds the block (sequentially, padding excluded);
the reported residual is that fit's; the folder reloads with the in-memory logits on every pre-norm family; bad
input is one line, exit 2."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import fresh, random_windows
from test_blocks import _ids, _logits, _model
from test_cli import _fails

from importance.arch.canonical import model_map
from importance.data.sources import Windows
from importance.models.load import LoadedModel, load_model
from pruning.io import save_model
from pruning.methods.depth import prune_layers
from pruning.methods.standins import fit_linear_blocks
from pruning.second_order.core import solve_affine


def _ridge(x: torch.Tensor, y: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge with an undamped intercept by lstsq on the augmented system [[x 1]; [sqrt(lam) I 0]] -> [[y]; [0]]."""
    x, y = x.double(), y.double()
    n, d = x.shape
    lam = damp * float((x * x).sum(0).mean())
    a = torch.cat([torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1),
                   torch.cat([lam ** 0.5 * torch.eye(d, dtype=x.dtype), torch.zeros(d, 1, dtype=x.dtype)], 1)])
    b = torch.cat([y, torch.zeros(d, y.shape[1], dtype=y.dtype)])
    sol = torch.linalg.lstsq(a, b).solution  # [d+1, m]
    return sol[:d].T, sol[d]


@pytest.mark.parametrize("damp", [1e-10, 0.05])
def test_solve_affine_is_the_damped_least_squares_fit(damp: float) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 7, generator=gen, dtype=torch.float64) + 2.0  # not centred: the intercept matters
    y = x @ torch.randn(7, 5, generator=gen, dtype=torch.float64) + 0.3 * torch.randn(300, 5, generator=gen,
                                                                                        dtype=torch.float64) - 1.0
    xa = torch.cat([x, torch.ones(300, 1, dtype=x.dtype)], 1)
    w, b = solve_affine(xa.T @ xa, xa.T @ y, damp)
    w_ref, b_ref = _ridge(x, y, damp)
    assert torch.allclose(w.double(), w_ref, atol=1e-5) and torch.allclose(b.double(), b_ref, atol=1e-5)


def _stream(model: torch.nn.Module, windows: Windows, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) [n, d] of block ``layer`` over the real tokens of ``windows`` (one forward)."""
    seen: dict[str, torch.Tensor] = {}
    block = model.model.layers[layer]
    h = block.register_forward_hook(lambda _m, args, kwargs, out: seen.update(
        x=(args[0] if args else kwargs["hidden_states"]), y=(out[0] if isinstance(out, tuple) else out)),
        with_kwargs=True)
    with torch.no_grad():
        model(input_ids=windows.input_ids, attention_mask=windows.attention_mask)
    h.remove()
    keep = windows.attention_mask.bool()
    return seen["x"][keep].double(), seen["y"][keep].double()


def _affine_block(model: torch.nn.Module, layer: int, w: torch.Tensor, b: torch.Tensor) -> None:
    """Block ``layer`` of ``model`` computes x + x W^T + b (a forward hook: the hand-made stand-in)."""
    def hook(_m, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        y = x + (x.double() @ w.T + b).to(x.dtype)
        return (y, *out[1:]) if isinstance(out, tuple) else y
    model.model.layers[layer].register_forward_hook(hook, with_kwargs=True)


def test_each_map_is_the_least_squares_fit_of_the_dense_stream_from_the_pruned_inputs() -> None:
    lm = _model(layers=5)
    windows = random_windows(4, 24, pad_last=6, seed=4)  # padding: excluded from the fit
    dense = copy.deepcopy(lm.model)
    hand = copy.deepcopy(lm.model)  # the dense model with the hand-fitted maps hooked in, one after the other
    want = {}
    for layer in (1, 2):  # adjacent: block 2 is fitted on what block 1's map gives it
        _, target = _stream(dense, windows, layer)
        x, _ = _stream(hand, windows, layer)
        want[layer] = _ridge(x, target - x, 0.01)
        _affine_block(hand, layer, *want[layer])
    report = fit_linear_blocks(lm.model, model_map(lm.model), windows, [1, 2], batch_size=2)
    for layer, (w, b) in want.items():
        stand_in = lm.model.model.layers[layer].self_attn
        assert torch.allclose(stand_in.weight.double(), w, atol=1e-4) and torch.allclose(stand_in.bias.double(), b,
                                                                                           atol=1e-4)
        x, _ = _stream(hand, windows, layer)  # the fit's own residual, against the reported one
        _, target = _stream(dense, windows, layer)
        resid = float((target - x - (x @ w.T + b)).square().sum())
        assert report[layer]["residual_energy"] == pytest.approx(resid, rel=1e-4)
        assert report[layer]["residual_energy"] < report[layer]["target_energy"]
        assert report[layer]["tokens"] == int(windows.attention_mask.sum())
    ids = windows.input_ids
    with torch.no_grad():
        got = lm.model(input_ids=ids, attention_mask=windows.attention_mask).logits
        ref = hand(input_ids=ids, attention_mask=windows.attention_mask).logits
    assert torch.allclose(got, ref, atol=1e-4)


def _param_count(lm: LoadedModel) -> int:
    return sum(p.numel() for p in lm.model.parameters())


# serial pre-norm (llama, gemma2 with output norms, olmo2), parallel with one shared norm (cohere, falcon), gpt2
@pytest.mark.parametrize("model_type", ["llama", "gemma2", "olmo2", "cohere", "falcon", "gpt2"])
def test_linear_layers_reload_with_the_in_memory_logits(model_type: str, tmp_path: Path) -> None:
    lm = fresh(model_type, scale=0.2)
    windows = random_windows(4, 32, seed=2)
    res = prune_layers(lm, 0.5, "removal", windows=windows, iterative=True, compensate="linear")
    s = res.record["structured"]
    d = lm.model.config.hidden_size
    mm = model_map(lm.model)
    gone = s["layers_removed"]
    assert mm.n_layers == 2 and [mm.blocks[i].skipped for i in gone] == [("attn", "mlp")] * len(gone)
    for i in gone:  # a block is its map now (and the input norm where both branches shared one)
        block = mm.blocks[i].module
        assert sum(p.numel() for n, p in block.named_parameters() if "norm" not in n) == d * d + d
    assert res.record["params_plan"]["after"] == _param_count(lm)
    folder = save_model(lm, tmp_path / "pruned", {**res.record, "method": "layers"})
    shapes = json.loads((folder / "imprune.json").read_text())["layer_shapes"]
    assert shapes["skipped_constants"] == {str(i): {"attn": [d, d]} for i in s["layers_removed"]}
    back = load_model(str(folder))
    ids = _ids(2, 12)
    assert torch.equal(_logits(back.model, ids), _logits(lm.model, ids))
    prompt = ids[:1, :5]  # a KV cache through the stand-ins = recomputing everything
    assert torch.equal(back.model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True),
                       back.model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False))


@pytest.mark.parametrize(("model", "extra", "message"), [
    ("random:llama:layers=4", ["--method", "blocks", "--sparsity", "0.25", "--compensate", "linear"],
     "--compensate linear replaces whole blocks (--method layers)"),
    ("random:opt", ["--method", "layers", "--sparsity", "0.5", "--compensate", "linear"], "use --compensate none"),
])
def test_cli_refuses_linear_stand_ins_where_they_do_not_apply(model: str, extra: list[str], message: str,
                                                              tmp_path: Path, text_file: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = ["prune", "--model", model, *extra, "--data", f"file:{text_file}", "--seq-len", "32", "--tokens", "128",
            "--no-eval", "--quiet", "--out", str(out)]
    assert message in _fails(argv, tmp_path, capsys)
    assert not out.exists()


def test_run_recipe_layers25_linear_keeps_every_block_in_place(tmp_path: Path, text_file: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from pruning.cli.core import main

    out = tmp_path / "run"
    assert main(["run", "--model", "random:llama:layers=4", "--data", f"file:{text_file}", "--recipe",
                 "layers25-linear", "--eval-tokens", "256", "--out", str(out)]) == 0
    meta = json.loads((out / "model" / "imprune.json").read_text())
    step = meta["steps"][0]["structured"]
    assert meta["layers_kept"] == [0, 1, 2, 3] and step["layers_kept"] == [0, 1, 2, 3]  # stand-ins keep their place
    assert len(step["layers_removed"]) == 1 and step["iterative"]["k"] == 8
    back = load_model(str(out / "model"))
    assert model_map(back.model).blocks[step["layers_removed"][0]].skipped == ("attn", "mlp")


@pytest.mark.parametrize("model_type", ["llama", "cohere", "falcon"])  # cohere / falcon: one norm both branches read
@pytest.mark.parametrize("compensate", ["none", "mean", "linear"])
def test_every_layer_compensation_records_the_parameters_the_model_has(model_type: str, compensate: str) -> None:
    lm = fresh(model_type, scale=0.2)
    before = _param_count(lm)
    res = prune_layers(lm, 0.5, "removal", windows=random_windows(4, 32, seed=2), iterative=True,
                       compensate=compensate)
    plan = res.record["params_plan"]
    assert plan["before"] == before and plan["after"] == _param_count(lm) == before - plan["removed"]


def test_linear_stand_ins_from_a_table_criterion_get_the_calibration_data(tmp_path: Path, text_file: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from pruning.cli.core import main

    out = tmp_path / "run"  # the run's one-pass table ranks the layers; the maps still need the calibration windows
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"name": "r", "steps": [{"method": "layers", "sparsity": 0.25,
                                                          "criterion": "residual_fisher", "compensate": "linear"}]}))
    assert main(["run", "--model", "random:llama:layers=4", "--data", f"file:{text_file}", "--recipe", str(recipe),
                 "--eval-tokens", "256", "--out", str(out)]) == 0
    step = json.loads((out / "model" / "imprune.json").read_text())["steps"][0]["structured"]
    assert len(step["layers_removed"]) == 1 and set(step["stand_in_fit"]) == {str(step["layers_removed"][0])}
