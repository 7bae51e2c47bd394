"""Multiple-choice accuracy (pruning.eval.tasks): exact cases on a model whose logits we set, agreement with a
plain one-sequence-at-a-time log-likelihood, chance levels, deterministic probe items, bad input."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from importance.data.tasks import TASKS, TaskItem, generate
from importance.errors import ImpruneError
from pruning.eval.tasks import accuracy, loglikelihoods, probe_accuracy, probe_names, score_choices, table
from tests.conftest import byte_ids, tiny


class Bigram(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: log p(next | prev) = log_softmax(table[prev])[next]."""

    def __init__(self, vocab: int = 261) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(vocab, vocab))
        self.config = SimpleNamespace(max_position_embeddings=64)
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        self.calls += 1
        return SimpleNamespace(logits=self.table[input_ids])


def _bigram_ll(model: Bigram, prompt: str, choice: str) -> float:
    ids = byte_ids(prompt + choice)
    lp = F.log_softmax(model.table.detach(), dim=-1)
    return sum(float(lp[a, b]) for a, b in zip(ids[len(byte_ids(prompt)) - 1:], ids[len(byte_ids(prompt)):]))


def test_exact_case_on_set_logits() -> None:
    tok = tiny("llama").tokenizer
    model = Bigram()
    y, z = byte_ids("y")[0], byte_ids("z")[0]
    with torch.no_grad():
        model.table[:, y] = 3.0  # every next token: "y" is e^3 times likelier than any other
    items = [TaskItem("ab", " y", (" z",)),  # " y" wins: acc 1
             TaskItem("ab", " z", (" y",)),  # " z" loses: acc 0
             TaskItem("ab", " zz", (" y",)),  # loses on both sums
             TaskItem("q", " w", (" x",))]  # w and x equally likely: a tie, credit 1/2
    res = accuracy(model, tok, items, "t")
    assert res.n == 4 and res.chance == 0.5
    assert res.acc == pytest.approx((1 + 0 + 0 + 0.5) / 4)
    lls = loglikelihoods(model, tok, [("ab", " y"), ("ab", " zz"), ("ab", " z")])
    V = 261
    log_py, log_other = 3 - math.log(math.e ** 3 + V - 1), -math.log(math.e ** 3 + V - 1)
    assert lls[0][0] == pytest.approx(log_other + log_py, abs=1e-5)  # " " then "y"
    assert lls[1][0] == pytest.approx(3 * log_other, abs=1e-5)
    assert not lls[0][1]  # after "b" the argmax is "y", not " ": not greedy as a whole
    assert loglikelihoods(model, tok, [("ab ", "y"), ("ab ", "z")]) == [(pytest.approx(log_py), True),
                                                                       (pytest.approx(log_other), False)]
    assert res.stderr == pytest.approx(math.sqrt(res.acc * (1 - res.acc) / 4)) and z != y


def test_length_normalisation_and_ties() -> None:
    assert score_choices([-2.0, -3.0], [" a", " bb"]) == (1.0, 0.5)  # per character -1 and -1: a tie
    assert score_choices([-2.0, -2.0], [" a", " b"]) == (0.5, 0.5)
    assert score_choices([-4.0, -3.0], [" aaa", " b"]) == (0.0, 1.0)  # -1 per char beats -1.5
    assert score_choices([-1.0, -1.0, -1.0, -5.0], [" a", " b", " c", " d"]) == (pytest.approx(1 / 3),) * 2


def test_agrees_with_one_sequence_at_a_time() -> None:
    lm = tiny("llama")
    items = generate("decision", 6) + generate("math", 6) + generate("syntax", 6)
    pairs = [(it.prompt, c) for it in items for c in it.choices]
    got = loglikelihoods(lm.model, lm.tokenizer, pairs, batch_size=5)
    want_acc = 0.0
    at = 0
    for it in items:
        lls = []
        for c in it.choices:
            p, a = byte_ids(it.prompt), byte_ids(c)
            with torch.no_grad():
                logits = lm.model(input_ids=torch.tensor([p + a])).logits[0]  # [T, V]
            lp = F.log_softmax(logits.float(), -1)
            lls.append(sum(float(lp[len(p) - 1 + j, t]) for j, t in enumerate(a)))
        assert [g for g, _ in got[at:at + len(lls)]] == pytest.approx(lls, abs=1e-4)
        top = max(lls)
        want_acc += (lls[0] == top) / sum(v == top for v in lls)
        at += len(lls)
    assert accuracy(lm.model, lm.tokenizer, items, batch_size=3).acc == pytest.approx(want_acc / len(items))


def test_shared_inputs_run_once() -> None:
    tok = tiny("llama").tokenizer
    model = Bigram()
    loglikelihoods(model, tok, [("Is it? Answer:", " A"), ("Is it? Answer:", " B"), ("Is it? Answer:", " C")],
                   batch_size=1)
    assert model.calls == 1  # every input is the prompt + " " (a byte token of its own): one forward
    model.calls = 0
    loglikelihoods(model, tok, [("x", " z"), ("xy", " z"), ("x", " zw")], batch_size=1)
    assert model.calls == 3


def test_chance_level_and_skips() -> None:
    tok = tiny("llama").tokenizer
    items = [TaskItem("a", " b", (" c",)), TaskItem("a", " b", (" c", " d")),
             TaskItem("a", " b", (" c", " d", " e")), TaskItem("a", " b")]
    res = accuracy(Bigram(), tok, items)
    assert res.n == 3 and res.skipped == 1
    assert res.chance == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
    assert res.acc == pytest.approx(res.chance)  # a flat model: every item a tie of equal-length choices
    with pytest.raises(ImpruneError):
        accuracy(Bigram(), tok, [TaskItem("a", " b")])


def test_probe_accuracy_deterministic_and_table() -> None:
    lm = tiny("llama")
    a = probe_accuracy(lm, ["logic", "math"], limit=5)
    b = probe_accuracy(lm, ["logic", "math"], limit=5)
    assert a == b and [r.task for r in a] == ["logic", "math"] and all(r.n == 5 for r in a)
    assert a[0].chance == 0.5 and a[1].chance == 0.25
    text = table(a)
    assert "chance" in text and "logic" in text and "0.500" in text


def test_probe_names_and_bad_input() -> None:
    assert probe_names("probes") == (list(TASKS), [])
    assert probe_names("math,tasks:logic,hellaswag") == (["math", "logic"], ["hellaswag"])
    with pytest.raises(ImpruneError):
        probe_names(" , ")
    for bad in (0, -1, True):
        with pytest.raises(ImpruneError, match="--limit"):
            probe_accuracy(tiny("llama"), ["math"], limit=bad)
