"""The ``imprune`` command line in-process: bad input is one stderr line, exit 2 and no output; eval writes JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import tiny

from importance.data.sources import load_data
from pruning.cli.core import main
from pruning.eval.perplexity import perplexity


def _files(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def _fails(argv: list[str], root: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``imprune argv``; assert exit 2, one stderr line, nothing new under ``root``; return that line."""
    before = _files(root)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"imprune {argv[0]}: error: ")
    assert _files(root) == before, "a failed command wrote files"
    return err


_EVAL = ["eval", "--model", "random:llama", "--data", "file:TEXT", "--quiet"]  # TEXT: the text_file fixture
_SCORE = ["score", "--model", "random:llama", "--data", "file:TEXT", "--seq-len", "32", "--tokens", "64", "--quiet"]
BAD_CASES = [
    pytest.param(["eval", "--model", "no-such-model", "--quiet"], "unknown model", id="eval-unknown-model"),
    pytest.param(["eval", "--model", "random:nosuchtype", "--quiet"], "unknown model type",
                 id="eval-unknown-model-type"),
    pytest.param([*_EVAL[:3], "--data", "nosuch:thing", "--quiet"], "unknown data source", id="eval-unknown-data"),
    pytest.param([*_EVAL, "--seq-len", "1024"], "positions", id="eval-seq-len-beyond-positions"),
    pytest.param([*_EVAL, "--seq-len", "64", "--tokens", "10"], "--tokens 10", id="eval-tokens-below-window"),
    pytest.param([*_EVAL, "--batch-size", "0"], "--batch-size", id="eval-batch-size-0"),
    pytest.param([*_SCORE, "--scorers", "taylor,bogus"], "unknown scorer 'bogus'", id="score-unknown-scorer"),
    pytest.param(["score", "--model", "builtin:minilm-l6", "--data", "file:TEXT", "--seq-len", "32", "--tokens", "64",
                  "--scorers", "taylor", "--quiet"], "no language-model head", id="score-gradient-on-encoder",
                 marks=pytest.mark.integration),
]


@pytest.mark.parametrize(("argv", "expect"), BAD_CASES)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(argv: list[str], expect: str, text_file: Path,
                                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / ("table" if argv[0] == "score" else "metrics.json")
    argv = [a.replace("TEXT", str(text_file)) for a in argv]
    err = _fails([*argv, "--out", str(out)], tmp_path, capsys)
    assert expect in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["eval", "score"])
def test_existing_output_is_refused_before_any_work(command: str, text_file: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "taken"
    out.write_text("keep me")
    # an unloadable model too: the output check must come first, so the message is about the output
    err = _fails([command, "--model", "no-such-model", "--data", f"file:{text_file}", "--out", str(out)], tmp_path,
                 capsys)
    assert "already exists" in err and "--overwrite" in err
    assert out.read_text() == "keep me"


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_eval_writes_metrics_json(text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "metrics.json"
    argv = ["eval", "--model", "random:llama", "--data", f"file:{text_file}", "--seq-len", "64", "--tokens", "300",
            "--quiet", "--out", str(out)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["model"]["spec"] == "random:llama" and doc["model"]["model_type"] == "llama"
    assert doc["window"] == {"seq_len": 64, "windows": 4, "tokens": 256, "sampling": "sequential", "bos": False}
    ppl = doc["perplexity"]
    assert ppl["data"] == f"file:{text_file}" and ppl["predicted"] == 4 * 63
    assert {"torch", "transformers", "python"} <= set(doc["versions"])
    lm = tiny("llama")
    ref = perplexity(lm.model, load_data(f"file:{text_file}", lm.tokenizer, seq_len=64, tokens=300,
                                         sampling="sequential"), lm.task, progress=False)
    assert ppl["ppl"] == pytest.approx(ref.ppl, rel=1e-6)
    assert f"perplexity {ref.ppl:.2f}" in stdout and str(out) in stdout
    assert [p.name for p in out.parent.iterdir()] == ["metrics.json"]  # no temporary file left beside it
    # the same output again: refused, then replaced with --overwrite
    assert main(argv) == 2
    out.write_text("old")
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads(out.read_text())["perplexity"]["ppl"] == pytest.approx(ref.ppl, rel=1e-6)


@pytest.mark.integration
def test_smollm2_eval_small_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "smol.json"
    assert main(["eval", "--model", "builtin:smollm2-135m", "--seq-len", "128", "--tokens", "256", "--quiet",
                 "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    ppl = doc["perplexity"]
    assert (ppl["windows"], ppl["seq_len"], ppl["predicted"]) == (2, 128, 2 * 127)
    assert math.isfinite(ppl["ppl"]) and 5 < ppl["ppl"] < 500
    assert doc["model"]["spec"] == "builtin:smollm2-135m" and doc["perplexity"]["data"] == "austen:eval"


def test_csv_data_error_is_the_only_stderr_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "numbers.csv"
    data.write_text("a,b\n1,2\n")
    err = _fails(["eval", "--model", "random:llama", "--data", f"file:{data}", "--quiet"], tmp_path, capsys)
    assert "no text column" in err


def test_a_reader_that_stops_early_gets_no_traceback() -> None:
    """`imprune info | head`: a closed pipe ends the command quietly (exit 141, no traceback)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "pruning", "info", "--model", "random:llama"], cwd=repo,
                            env={**os.environ, "PYTHONPATH": str(repo)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader goes away before the map is printed (building the model takes a moment)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err
