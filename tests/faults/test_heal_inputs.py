"""Bad input to ``imprune heal`` (issue 17): a teacher of another vocabulary or another model, a student that
is not a causal LM or is quantized, zero tokens, a learning rate <= 0, a budget larger than the model, flags
that do not go together. Each: exit 2, one stderr line, nothing written (the output's folder, a sentinel of
user files, and the student's folder exactly as they were). One CLI run also shows the success path: the
healed folder, its record, and the hidden checkpoint gone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from importance.models.load import load_model

from .conftest import Result, assert_one_line_error, snapshot

TINY = ["--seq-len", "32", "--tokens", "128", "--eval-tokens", "64", "--quiet"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMPRUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pruning.cli.core import main

    folder = tmp_path_factory.mktemp("pruned") / "p50"
    assert main(["prune", "--model", "random:llama", "--method", "unstructured", "--sparsity", "0.5", "--criterion",
                 "magnitude", "--no-eval", "--quiet", "--out", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def other_vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """random:llama with one token more in its tokenizer and embeddings: same blocks, another vocabulary."""
    folder = tmp_path_factory.mktemp("vocab") / "teacher"
    lm = load_model("random:llama")
    lm.tokenizer.add_tokens(["<extra>"])
    lm.model.resize_token_embeddings(len(lm.tokenizer))
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


CASES = [
    (["--teacher", "VOCAB"], "another vocabulary or tokenizer"),
    (["--teacher", "random:llama:seed=3"], "is of another model"),
    (["--teacher", "random:gpt2"], "model type"),
    (["--tokens", "0"], "--tokens 0 holds no window"),
    (["--tokens", "16"], "holds no window of --seq-len 32"),
    (["--lr", "0"], "--lr must be a positive"),
    (["--lr", "-1e-3"], "--lr must be a positive"),
    (["--budget", "100000000000"], "larger than the model"),
    (["--budget", "0"], "--budget must be at least 1"),
    (["--rank", "0"], "--rank must be at least 1"),
    (["--method", "full", "--placement", "importance"], "--method full trains every kept weight"),
    (["--warmup", "1.5"], "--warmup"),
    (["--temperature", "0"], "--temperature must be positive"),
]


@pytest.mark.parametrize("extra,expect", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_heal_input_is_one_line_and_writes_nothing(extra: list[str], expect: str, pruned: Path, other_vocab: Path,
                                                       sentinel: Path, cli: Callable[[list], Result]) -> None:
    extra = [str(other_vocab) if a == "VOCAB" else a for a in extra]
    argv = ["heal", "--model", pruned, *TINY, *extra, "--out", sentinel / "healed"]
    before, model_before = snapshot(sentinel), snapshot(pruned)
    assert_one_line_error(cli(argv), "heal", expect)
    assert snapshot(sentinel) == before and snapshot(pruned) == model_before


def test_an_encoder_student_is_refused(sentinel: Path, cli: Callable[[list], Result]) -> None:
    res = cli(["heal", "--model", "random:bert", "--teacher", "random:bert", *TINY, "--out", sentinel / "h"])
    assert_one_line_error(res, "heal", "causal language model")
    assert not (sentinel / "h").exists()


def test_a_quantized_student_is_refused(tmp_path: Path, sentinel: Path, cli: Callable[[list], Result]) -> None:
    q = tmp_path / "q"
    assert cli(["quantize", "--model", "random:llama", "--budget", "8", "--choices", "8", "--method", "rtn",
                "--no-eval", "--quiet", "--out", q]).rc == 0
    res = cli(["heal", "--model", q, "--teacher", "random:llama", *TINY, "--out", sentinel / "h"])
    assert_one_line_error(res, "heal", "quantized")
    assert not (sentinel / "h").exists()


def test_heal_writes_a_complete_folder_and_removes_its_checkpoint(pruned: Path, tmp_path: Path,
                                                                  cli: Callable[[list], Result]) -> None:
    out = tmp_path / "healed"
    stale = tmp_path / ".healed.heal-0123456789abcdef"  # an interrupted heal of other settings
    stale.mkdir()
    (stale / "state.json").write_text(json.dumps({"schema": "imprune.heal-checkpoint/1", "key": "x", "step": 1}))
    user = tmp_path / ".healed.heal-mine"  # a user's folder that only looks like one
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    res = cli(["heal", "--model", pruned, *TINY, "--save-every", "1", "--out", out])
    assert res.rc == 0, res.err
    rec = json.loads((out / "imprune.json").read_text())
    assert rec["method"] == "heal" and rec["pruned_by"] == "unstructured"
    assert rec["heal"]["teacher"] == "random:llama" and rec["heal"]["steps"] == 1 and len(rec["heal"]["curve"]) == 1
    assert rec["source_model"]["spec"] == "random:llama" and rec["sparsity"] == json.loads(
        (pruned / "imprune.json").read_text())["sparsity"]
    assert rec["perplexity"]["pruned"]["ppl"] > 0 and rec["perplexity"]["healed"]["ppl"] > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".healed.heal-")] == [user.name]
    assert (user / "notes.txt").read_text() == "keep"
