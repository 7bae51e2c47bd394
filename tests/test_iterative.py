"""Iterative measured layer removal: with every candidate re-measured it is exactly the exhaustive greedy choice
(each round: drop each remaining block for real, run the full model, keep the lowest loss); the k variant and
bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from importance.arch.canonical import model_map
from importance.data.sources import Windows
from importance.engine.objective import token_nll
from importance.errors import ImpruneError
from importance.models.load import load_model
from pruning.cli import main
from pruning.methods.depth import prune_layers
from pruning.methods.iterative import iterative_removal
from pruning.methods.surgery import drop_blocks


def _model(layers: int = 6):
    lm = load_model(f"random:llama:layers={layers}")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights large enough that blocks differ clearly
        for p in lm.model.parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.15
            p.copy_(noise + 1.0 if p.dim() == 1 else noise)
    return lm


def _windows(vocab: int, n: int = 4, t: int = 16) -> Windows:
    ids = torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(1))
    return Windows(ids, torch.ones(n, t, dtype=torch.long), torch.ones(n, t, dtype=torch.bool), {})


@torch.no_grad()
def _loss_without(lm, w: Windows, gone: list[int]) -> float:
    m = copy.deepcopy(lm.model)
    mm = model_map(m)
    drop_blocks(mm, [i for i in range(mm.n_layers) if i not in gone])
    total, count = 0.0, 0
    for b in w.batches(2):
        nll, counted = token_nll(m, b, lm.task)
        total += float(nll.double().sum())
        count += int(counted.sum())
    return total / count


def _exhaustive_greedy(lm, w: Windows, n: int) -> list[int]:
    order: list[int] = []
    for _ in range(n):
        left = [i for i in range(lm.model.config.num_hidden_layers) if i not in order]
        losses = {i: _loss_without(lm, w, order + [i]) for i in left}
        order.append(min(losses, key=lambda i: (losses[i], i)))
    return order


def test_iterative_with_every_candidate_is_the_exhaustive_greedy_choice() -> None:
    lm = _model()
    w = _windows(lm.model.config.vocab_size)
    mm = model_map(lm.model)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    res = iterative_removal(lm.model, mm, w, lm.task, 3, batch_size=2)
    assert res.order == _exhaustive_greedy(lm, w, 3)
    assert res.nll[-1] == pytest.approx(_loss_without(lm, w, res.order), rel=1e-5)
    assert res.partial_forwards == 6 + 5 + 4
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())  # nothing left bypassed
    with torch.no_grad():  # no hook left: the model computes its dense loss again
        assert not any(b.module._forward_hooks for b in mm.blocks)
    cheap = iterative_removal(lm.model, mm, w, lm.task, 3, k=2, batch_size=2)
    assert cheap.partial_forwards == 6 + 2 + 2
    one_pass = sorted(res.first_round, key=lambda i: (res.first_round[i], i))
    assert set(cheap.order) <= set(one_pass[:4])


def test_prune_layers_iterative_removes_the_chosen_blocks() -> None:
    lm = _model()
    w = _windows(lm.model.config.vocab_size)
    order = _exhaustive_greedy(lm, w, 2)
    res = prune_layers(lm, 2 / 6, "removal", windows=w, batch_size=2, iterative=True)
    assert res.record["structured"]["layers_removed"] == sorted(order)
    assert lm.model.config.num_hidden_layers == 4 and model_map(lm.model).n_layers == 4


def test_iterative_needs_the_removal_criterion() -> None:
    lm = _model(4)
    with pytest.raises(ImpruneError, match="--criterion removal"):
        prune_layers(lm, 0.25, "block_influence", windows=_windows(lm.model.config.vocab_size), iterative=True)


@pytest.mark.parametrize("extra, message", [
    (["--criterion", "removal", "--iterative-k", "2"], "--iterative-k applies to --iterative only"),
    (["--criterion", "removal", "--iterative", "--iterative-k", "0"], "must be at least 1"),
    (["--criterion", "residual_fisher", "--iterative"], "use it with --criterion removal")])
def test_cli_refuses_bad_iterative_input(tmp_path, capsys, extra, message) -> None:
    out = tmp_path / "p"
    args = ["prune", "--model", "random:llama", "--method", "layers", "--sparsity", "0.5", "--tokens", "256",
            "--seq-len", "32", "--no-eval", "--quiet", "--out", str(out), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []
