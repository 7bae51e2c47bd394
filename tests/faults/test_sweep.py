"""Leftovers of the bad-input sweep (issue 15) that no other fault file owns: each is one line, exit 2, and
nothing written next to the output."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .conftest import assert_one_line_error, snapshot


def test_binary_recipe_file_is_one_line(cli, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"\xff\xfe\x00\x81" + os.urandom(64))
    before = snapshot(tmp_path)
    res = cli(["run", "--model", "random:llama:layers=2", "--recipe", recipe, "--out", tmp_path / "run", "--quiet"])
    assert_one_line_error(res, "run", "is not UTF-8 text")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("flag", ["--batch-size", "--tokens", "--eval-tokens", "--seq-len"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_prune_counts_below_one_name_their_flag(cli, tmp_path: Path, flag: str, value: str) -> None:
    before = snapshot(tmp_path)
    res = cli(["prune", "--model", "random:llama:layers=2", "--method", "unstructured", "--criterion", "magnitude",
               "--sparsity", "0.5", flag, value, "--out", tmp_path / "m", "--quiet"])
    assert_one_line_error(res, "prune", f"{flag} must be at least 1, got {value}")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("spec", "expect"), [
    ("random:llama:layers=0", "'layers=0' must be at least 1"),
    ("random:llama:heads=3", "not a multiple of the number of attention heads (3)"),
    ("random:nosuchtype", "unknown model type 'nosuchtype'"),
])
def test_random_model_sizes_that_cannot_be_built(cli, tmp_path: Path, spec: str, expect: str) -> None:
    before = snapshot(tmp_path)
    assert_one_line_error(cli(["info", "--model", spec]), "info", expect)
    assert snapshot(tmp_path) == before
