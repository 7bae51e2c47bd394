"""Bad input to the accuracy and probe commands (issue 18), through the CLI: an unknown lm-eval task, lm-eval not
installed, ``--limit 0``, a task file without choices, and the probe's own flags. Each is one stderr line, exit 2,
no traceback, no output written."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from .conftest import assert_one_line_error

EVAL = ["eval", "--model", "random:llama", "--quiet"]


def test_lm_eval_missing_names_the_extra(tmp_path: Path, run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # lm-eval not installed
    out = tmp_path / "acc.json"
    line = assert_one_line_error(run([*EVAL, "--tasks", "boolq", "--out", out]), "eval", "imprune[eval]")
    assert "lm-eval" in line or "lm_eval" in line
    assert not out.exists()


def test_lm_eval_task_problems_are_one_line(tmp_path: Path, run) -> None:
    pytest.importorskip("lm_eval")
    from test_harness import _rows, _task

    out = tmp_path / "acc.json"
    assert_one_line_error(run([*EVAL, "--tasks", "no_such_task_xyz", "--out", out]), "eval", "unknown task")
    broken = _task(tmp_path / "broken", _rows(4), "imprune_no_choices", choices=False)
    assert_one_line_error(run([*EVAL, "--tasks", "imprune_no_choices", "--include-path", broken, "--out", out]),
                          "eval")
    assert_one_line_error(run([*EVAL, "--tasks", "probes", "--limit", "0", "--out", out]), "eval", "--limit")
    assert not out.exists()


@pytest.mark.parametrize(("extra", "expect"), [
    (["--tasks", "math", "--validate"], "at least two tasks"),
    (["--tasks", "math,logic", "--samples", "3"], "at least 4"),
    (["--tasks", "math,logic", "--validate-heads", "0"], "--validate-heads"),
    (["--tasks", "math,logic", "--scorers", "taylor", "--scorer", "fisher"], "not among --scorers"),
    (["--tasks", "math,nope"], "unknown task"),
])
def test_probe_bad_input_is_one_line(extra: list[str], expect: str, tmp_path: Path, run) -> None:
    out = tmp_path / "probe"
    res = run(["probe", "--model", "random:llama", *extra, "--out", out, "--quiet"])
    assert_one_line_error(res, "probe", expect)
    assert not out.exists()
