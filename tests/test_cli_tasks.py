"""``imprune eval --tasks``: the probe table and JSON, lm-eval tasks from a local YAML, bad input in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny
from test_cli import _fails

from pruning.cli.core import main
from pruning.eval.tasks import probe_accuracy

BASE = ["eval", "--model", "random:llama", "--quiet"]


def test_eval_probes_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "acc.json"
    assert main([*BASE, "--tasks", "logic,math", "--limit", "4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "chance" in text and "acc_norm" in text and "logic" in text and "math" in text
    doc = json.loads(out.read_text())
    rows = {r["task"]: r for r in doc["tasks"]}
    want = {r.task: r.to_dict() for r in probe_accuracy(tiny("llama"), ["logic", "math"], 4)}
    assert rows == want and rows["logic"]["chance"] == 0.5 and rows["math"]["n"] == 4
    assert doc["settings"]["limit"] == 4


def test_eval_local_lm_eval_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("lm_eval")
    from test_harness import _rows, _task

    folder = _task(tmp_path / "tasks", _rows(6))
    out = tmp_path / "acc.json"
    assert main([*BASE, "--tasks", "imprune_local_mc,logic", "--limit", "3", "--include-path", str(folder),
                 "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = {r["task"]: r for r in doc["tasks"]}
    assert rows["imprune_local_mc"]["source"] == "lm-eval" and rows["imprune_local_mc"]["n"] == 3
    assert rows["logic"]["source"] == "probe" and "imprune_local_mc" in doc["lm_eval"]["results"]


@pytest.mark.parametrize(("extra", "expect"), [
    (["--tasks", "probes", "--limit", "0"], "--limit"),
    (["--tasks", "logic", "--limit", "-3"], "--limit"),
    (["--tasks", "no_such_task_xyz"], "unknown task"),
    (["--tasks", " , "], "--tasks is empty"),
    (["--limit", "5"], "add --tasks"),
    (["--tasks", "logic", "--num-fewshot", "2"], "zero-shot"),
    (["--tasks", "logic", "--num-fewshot", "-1"], "--num-fewshot"),
])
def test_eval_tasks_bad_input(extra: list[str], expect: str, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    if expect == "unknown task":
        pytest.importorskip("lm_eval")
    out = tmp_path / "acc.json"
    assert expect in _fails([*BASE, *extra, "--out", str(out)], tmp_path, capsys)
    assert not out.exists()


def test_run_task_limit_negative(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _fails(["run", "--model", "random:llama", "--task-limit", "-1", "--out", str(tmp_path / "run"), "--quiet"],
                 tmp_path, capsys)
    assert "--task-limit" in err
