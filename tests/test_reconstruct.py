"""Width reconstruction: the kept-column least-squares solve against torch.linalg.lstsq and the OBS formula,
the re-fit never raising a block's output error, nothing removed changing nothing, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from importance.arch.canonical import model_map
from importance.data.sources import Windows
from importance.errors import ImpruneError
from importance.models.load import load_model
from pruning.cli import main
from pruning.methods.reconstruct import kept_columns
from pruning.methods.structured import StructuredConfig, prune_structured
from pruning.second_order.core import output_error, solve_kept_columns


def _problem(seed: int = 0, n: int = 200, d_in: int = 24, d_out: int = 7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64) @ torch.randn(d_in, d_in, generator=g,
                                                                             dtype=torch.float64)  # correlated
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    keep = torch.tensor(sorted(torch.randperm(d_in, generator=g)[: d_in * 2 // 3].tolist()))
    return x, w, keep


def test_kept_column_solve_equals_lstsq_and_never_raises_the_error() -> None:
    x, w, keep = _problem()
    xtx = x.T @ x
    got = solve_kept_columns(w, xtx, x.shape[0], keep, damp=1e-9).double()  # [out, k]
    ref = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T  # independent: argmin ||X W^T - X_K Z^T||
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    plain = torch.zeros_like(w)
    plain[:, keep] = w[:, keep]
    for damp in (1e-9, 0.01, 0.5):
        fitted = torch.zeros_like(w)
        fitted[:, keep] = solve_kept_columns(w, xtx, x.shape[0], keep, damp=damp).double()
        assert output_error(w - fitted, xtx) <= output_error(w - plain, xtx) * (1 + 1e-9)
    assert output_error(w - fitted, xtx) < 0.9 * output_error(w - plain, xtx)  # and helps on correlated inputs


def test_damped_solve_is_the_obs_update_of_the_damped_hessian() -> None:
    x, w, keep = _problem(seed=1)
    xtx = x.T @ x
    n, damp = x.shape[0], 0.05
    h = 2 * xtx / n
    hd = h + damp * float(torch.diagonal(h)[keep].mean()) * torch.eye(h.shape[0], dtype=h.dtype)
    gone = torch.tensor([j for j in range(w.shape[1]) if j not in set(keep.tolist())])
    hinv = torch.linalg.inv(hd)  # OBS: dW = -W_R [Hinv_RR]^-1 Hinv_R:
    obs = w - w[:, gone] @ torch.linalg.inv(hinv[gone][:, gone]) @ hinv[gone]
    assert torch.allclose(obs[:, gone], torch.zeros_like(obs[:, gone]), atol=1e-8)
    got = solve_kept_columns(w, xtx, n, keep, damp=damp).double()
    assert torch.allclose(got, obs[:, keep], rtol=1e-5, atol=1e-6)
    # keeping every column changes nothing
    all_cols = torch.arange(w.shape[1])
    assert torch.allclose(solve_kept_columns(w, xtx, n, all_cols, damp).double(), w, atol=1e-5)


def _windows(vocab: int, n: int = 6, t: int = 16, seed: int = 0) -> Windows:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    return Windows(ids, torch.ones(n, t, dtype=torch.long), torch.ones(n, t, dtype=torch.bool), {})


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3"])
@pytest.mark.parametrize("part, comp", [("heads", "attn.o"), ("channels", "mlp.down")])
def test_reconstruction_lowers_the_first_blocks_consumer_error(model_type: str, part: str, comp: str) -> None:
    extra = "" if model_type == "gpt2" else ",heads=8,kv_heads=2"
    base = load_model(f"random:{model_type}:layers=2{extra}")
    w = _windows(base.model.config.vocab_size)
    block = model_map(base.model).blocks[0]
    dense_w = block.components[comp].weight.detach().clone()  # [out, in]
    x_in = {}
    h = block.components[comp].module.register_forward_pre_hook(
        lambda m, a: x_in.update(x=a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        base.model(input_ids=w.input_ids)
    h.remove()
    target = x_in["x"] @ dense_w.T  # the dense consumer's output on block 0's (unchanged) inputs
    errs = {}
    for rec in (False, True):
        lm = copy.deepcopy(base)
        res = prune_structured(lm, StructuredConfig(0.5, part, criterion="magnitude", reconstruct=rec), windows=w)
        layer0 = res.record["structured"]["layers"]["0"]
        removed = layer0["heads_removed"] if part == "heads" else layer0["channels_removed"]
        assert removed
        keep = kept_columns(block, removed if part == "heads" else [], removed if part == "channels" else [])[comp]
        new_w = model_map(lm.model).blocks[0].components[comp].weight
        errs[rec] = float((x_in["x"][:, keep] @ new_w.detach().T - target).square().sum())
        if rec:
            rep = res.record["structured"]["reconstruction_error"]
            assert rep[f"{comp} fitted"] <= rep[f"{comp} plain"]
    assert errs[True] < errs[False]


def test_removing_nothing_with_reconstruction_changes_no_logit() -> None:
    lm = load_model("random:llama:layers=2,heads=8,kv_heads=2")
    w = _windows(lm.model.config.vocab_size)
    with torch.no_grad():
        before = lm.model(input_ids=w.input_ids).logits
    prune_structured(lm, StructuredConfig(0.0, "width", criterion="magnitude", reconstruct=True), windows=w)
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=w.input_ids).logits, before)


def test_reconstruction_without_calibration_data_is_refused() -> None:
    lm = load_model("random:llama:layers=2,heads=8,kv_heads=2")
    with pytest.raises(ImpruneError, match="needs calibration data"):
        prune_structured(lm, StructuredConfig(0.3, "channels", criterion="magnitude", reconstruct=True),
                         table=None, windows=None)


@pytest.mark.parametrize("extra, message", [
    (["--reconstruct", "--data", ""], "--reconstruct needs calibration data"),
    (["--reconstruct", "--bias-compensation"], "drop --bias-compensation"),
    (["--reconstruct", "--damp", "2"], "--damp 2.0 is outside")])
def test_cli_refuses_bad_reconstruction_input(tmp_path, capsys, extra, message) -> None:
    out = tmp_path / "p"
    args = ["prune", "--model", "random:llama", "--method", "width", "--sparsity", "0.2", "--criterion", "magnitude",
            "--tokens", "256", "--seq-len", "32", "--no-eval", "--quiet", "--out", str(out), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []
