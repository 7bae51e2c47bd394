"""lm-evaluation-harness through the in-memory wrapper (pruning.eval.harness), offline: a local multiple-choice
task (YAML + JSON lines written here, lm-eval's custom task path) checked against a plain log-likelihood
computed here one sequence at a time; rolling log-likelihood and greedy generation against hand loops."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from importance.errors import ImpruneError
from tests.conftest import byte_ids, tiny

pytest.importorskip("lm_eval")

from pruning.eval.harness import MISSING, harness, wrapper_class  # noqa: E402

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "tau"]
YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
{choice}doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def _task(folder: Path, rows: list[dict], name: str = "imprune_local_mc", choices: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    choice = 'doc_to_choice: "{{choices}}"\n' if choices else ""
    (folder / f"{name}.yaml").write_text(YAML.format(name=name, data=data, choice=choice))
    return folder


def _rows(n: int = 12) -> list[dict]:
    return [{"question": f"Item {i}: the word is", "choices": WORDS[i % 5:i % 5 + 2 + i % 3], "label": i % 2}
            for i in range(n)]


def _ll(model, context: str, continuation: str) -> float:
    p, a = byte_ids(context), byte_ids(continuation)
    with torch.no_grad():
        lp = F.log_softmax(model(input_ids=torch.tensor([p + a])).logits[0].float(), -1)  # [T, V]
    return sum(float(lp[len(p) - 1 + j, t]) for j, t in enumerate(a))


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    lm = tiny("llama")
    rows = _rows()
    folder = _task(tmp_path_factory.mktemp("tasks"), rows)
    got, raw = harness(lm, ["imprune_local_mc"], include_path=folder, batch_size=4)
    return lm, rows, folder, got, raw


def test_local_task_matches_plain_loglikelihood(local) -> None:
    lm, rows, _, got, raw = local
    acc = norm = chance = 0.0
    for r in rows:
        lls = [_ll(lm.model, r["question"], " " + c) for c in r["choices"]]  # lm-eval's target delimiter " "
        best = max(range(len(lls)), key=lambda i: lls[i])
        best_norm = max(range(len(lls)), key=lambda i: lls[i] / len(r["choices"][i]))
        acc, norm, chance = acc + (best == r["label"]), norm + (best_norm == r["label"]), chance + 1 / len(lls)
    (row,) = got
    assert row.task == "imprune_local_mc" and row.n == len(rows) and row.source == "lm-eval"
    assert row.acc == pytest.approx(acc / len(rows)) and row.acc_norm == pytest.approx(norm / len(rows))
    assert row.chance == pytest.approx(chance / len(rows))
    assert 0 < row.acc < 1  # the check could fail either way: not all right, not all wrong
    samples = raw["samples"]["imprune_local_mc"]
    for s, r in zip(sorted(samples, key=lambda s: s["doc_id"]), rows):
        want = [_ll(lm.model, r["question"], " " + c) for c in r["choices"]]
        assert [x[0][0] for x in s["resps"]] == pytest.approx(want, abs=1e-4)


def test_limit(local) -> None:
    lm, _, folder, _, _ = local
    (row,), _ = harness(lm, ["imprune_local_mc"], include_path=folder, limit=5)
    assert row.n == 5


def test_rolling_and_greedy_generation() -> None:
    lm = tiny("llama")
    wrapped = wrapper_class()(lm, batch_size=2)
    text = "a rolling window test"
    (got,) = wrapped.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    ids = [lm.tokenizer.bos_token_id, *byte_ids(text)]
    with torch.no_grad():
        lp = F.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    assert got == pytest.approx(sum(float(lp[t, ids[t + 1]]) for t in range(len(ids) - 1)), abs=1e-4)
    (gen,) = wrapped.generate_until([SimpleNamespace(args=("Once upon", {"until": ["\n\n"], "max_gen_toks": 6}))])
    ids = byte_ids("Once upon")
    for _ in range(6):  # greedy by hand
        with torch.no_grad():
            ids.append(int(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    want = lm.tokenizer.decode(ids[len(byte_ids("Once upon")):], skip_special_tokens=True)
    assert gen == want.split("\n\n")[0]


def test_bad_input(local, tmp_path, monkeypatch) -> None:
    lm, _, folder, _, _ = local
    with pytest.raises(ImpruneError, match="unknown task"):
        harness(lm, ["no_such_task_xyz"], include_path=folder)
    broken = _task(tmp_path / "broken", _rows(4), "imprune_no_choices", choices=False)
    with pytest.raises(ImpruneError) as err:
        harness(lm, ["imprune_no_choices"], include_path=broken)
    assert "\n" not in str(err.value)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # lm-eval not installed
    with pytest.raises(ImpruneError) as err:
        harness(lm, ["imprune_local_mc"], include_path=folder)
    assert str(err.value) == MISSING and "imprune[eval]" in MISSING
