"""Per-task head maps: split-half reliability vs similarity (exact small cases), the causal matrix of removing a
map's top heads against an independent computation, the marked grid figure and `imprune probe --validate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from importance.arch.canonical import model_map
from importance.data.tasks import generate
from importance.errors import ImpruneError
from importance.models.load import load_model
from importance.scorers import HEAD_SCORER
from importance.table import ImportanceTable
from importance.validate.ablation import removed
from importance.validate.task_maps import map_agreement
from importance.viz.tasks import SHARED_MARK, causal_figure, task_grid_figure
from pruning.cli import main
from pruning.eval.causal import CausalMatrix, causal_matrix, top_heads
from pruning.eval.probe import ProbeConfig


def _table(heads: list[list[float]], task: str = "t") -> ImportanceTable:
    m = torch.tensor(heads, dtype=torch.float32)  # [L, H]
    return ImportanceTable({"s/head": m, "count/head": torch.ones_like(m)},
                           {"scorers": ["s"], "components": [], "layers": m.shape[0],
                            "model": {"spec": "toy"}, "data": {"data": f"tasks:{task}"}})


X = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
R = [[6.0, 5.0, 4.0], [3.0, 2.0, 1.0]]


def test_map_agreement_exact_small_case() -> None:
    halves = {"a": (_table(X), _table(X)), "b": (_table(X), _table(X)), "c": (_table(X), _table(R))}
    got, cross = map_agreement(halves, "s")
    # a, b: halves identical (1); a vs b: 1; a/b vs c: (rho(x, r) + rho(x, x)) / 2 = 0; c with itself: -1
    want = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(cross, want)
    assert [(g.task, g.reliability, g.similarity, g.specific) for g in got] == [
        ("a", 1.0, 0.5, True), ("b", 1.0, 0.5, True), ("c", -1.0, 0.0, False)]
    with pytest.raises(ImpruneError, match="at least two tasks"):
        map_agreement({"a": halves["a"]}, "s")


def test_top_heads_order_and_bounds() -> None:
    t = _table([[1.0, 9.0, float("nan")], [9.0, 2.0, 3.0]])
    assert [g.label for g in top_heads(t, "s", 3)] == ["L0 h1", "L1 h0", "L1 h2"]  # tie: lower layer first
    with pytest.raises(ImpruneError, match="between 1 and 5"):
        top_heads(t, "s", 6)


def test_causal_summary_diagonal_and_off_diagonal() -> None:
    m = torch.tensor([[3.0, 1.0], [0.0, 5.0]], dtype=torch.float64)
    c = CausalMatrix(("a", "b"), 1, "s", (), m, -m, {})
    s = c.summary()
    assert s["nll_rise"]["diagonal_mean"] == 4.0 and s["nll_rise"]["off_diagonal_mean"] == 0.5
    assert s["nll_rise"]["specificity"] == {"a": 2.0, "b": 5.0} and s["acc_drop"]["diagonal_mean"] == -4.0


def _answer_nll(model, tokenizer, items) -> float:
    """Independent: one sequence at a time, log-softmax at the answer positions."""
    total, count = 0.0, 0
    for it in items:
        ctx = tokenizer(it.prompt, add_special_tokens=False)["input_ids"]
        ans = tokenizer(it.answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + ans])
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        total -= float(sum(logp[len(ctx) - 1 + i, a] for i, a in enumerate(ans)))
        count += len(ans)
    return total / count


def test_causal_matrix_against_an_independent_computation_and_weights_restored() -> None:
    lm = load_model("random:llama")
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.dim() >= 2:
                p.mul_(4)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    maps = {"math": _table([[1.0, 0.0, 0.0, 5.0], [0.0, 0.0, 0.0, 0.0]], "math"),
            "logic": _table([[0.0, 0.0, 0.0, 0.0], [0.0, 7.0, 6.0, 0.0]], "logic")}
    c = causal_matrix(lm, maps, "s", 2, 4, batch_size=4)
    assert c.heads == {"math": ["L0 h3", "L0 h0"], "logic": ["L1 h1", "L1 h2"]}
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, before[n]), n  # restored bit for bit
    mm = model_map(lm.model)
    items = {t: generate(t, 4, 0) for t in maps}
    base = {t: _answer_nll(lm.model, lm.tokenizer, items[t]) for t in maps}
    for i, t in enumerate(maps):
        with removed(mm, top_heads(maps[t], "s", 2)[0]), removed(mm, top_heads(maps[t], "s", 2)[1]):
            for j, u in enumerate(maps):
                want = _answer_nll(lm.model, lm.tokenizer, items[u]) - base[u]
                assert abs(float(c.nll_rise[i, j]) - want) < 1e-4
    assert float(c.nll_rise.abs().sum()) > 0


def test_task_grid_marks_shared_maps_and_causal_figure_carries_its_matrix() -> None:
    tables = [_table(X, "a"), _table(R, "b")]
    panels = {"a": {"acc": 0.5, "chance": 0.25, "reliability": 0.8, "similarity": 0.2, "specific": True},
              "b": {"acc": 0.3, "chance": 0.5, "reliability": 0.1, "similarity": 0.3, "specific": False}}
    fig = task_grid_figure(tables, ["a", "b"], "s", panels, aggregation="sum", norm="none", log=False)
    axes = [ax for ax in fig.axes if hasattr(ax, "imprune")]
    assert SHARED_MARK not in axes[0].get_title() and SHARED_MARK in axes[1].get_title()
    assert axes[1].imprune.meta["specific"] is False and "split-half 0.10 vs others 0.30" in axes[1].get_title()
    assert "s on 2 task probes" in fig.get_suptitle()  # names the scorer
    m = torch.tensor([[3.0, 1.0], [0.0, 5.0]])
    cf = causal_figure(m, m / 10, ["a", "b"], 2, "s")
    ax = next(a for a in cf.axes if hasattr(a, "imprune"))
    assert ax.imprune.meta["diagonal_mean"] == 4.0 and ax.imprune.meta["off_diagonal_mean"] == 0.5


def test_probe_validate_writes_the_causal_matrix_and_the_report(tmp_path: Path) -> None:
    out = tmp_path / "probe"
    argv = ["probe", "--model", "random:llama", "--tasks", "math,syntax", "--samples", "4", "--validate",
            "--validate-heads", "2", "--validate-items", "4", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["causal.png", "heads.png", "math", "probe.json", "report.md",
                                                     "syntax"]
    rec = json.loads((out / "probe.json").read_text())
    assert HEAD_SCORER == "token_second_order" and ProbeConfig().scorer == HEAD_SCORER
    assert rec["scorer"] == HEAD_SCORER and [a["task"] for a in rec["accuracy"]] == ["math", "syntax"]
    assert set(rec["agreement"]) == {"fisher", "token_fisher", "token_second_order", "taylor"}
    causal = rec["causal"]
    assert len(causal["nll_rise"]) == 2 and causal["k"] == 2 and len(causal["heads"]["math"]) == 2
    for task in ("math", "syntax"):  # the default scorer's map is the one whose heads were removed
        want = [g.label for g in top_heads(ImportanceTable.load(out / task), HEAD_SCORER, 2)]
        assert causal["scorer"] == HEAD_SCORER and causal["heads"][task] == want
    nll = torch.tensor(causal["nll_rise"])
    assert causal["summary"]["nll_rise"]["diagonal_mean"] == pytest.approx(float(nll.diagonal().mean()))
    report = (out / "report.md").read_text()
    for g in rec["agreement"]["fisher"]:
        assert (SHARED_MARK in report) == any(not x["specific"] for x in rec["agreement"]["fisher"])
        assert f"| {g['task']} |" in report
    assert "diagonal mean" in report and f"**{HEAD_SCORER}**" in report
    assert main([*argv[:4], "math", *argv[5:], "--overwrite"]) == 2  # --validate needs two tasks: one line
    assert main([*argv[:6], "3", *argv[7:], "--overwrite"]) == 2  # --samples 3: no two halves
