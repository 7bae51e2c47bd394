"""Scoring a model accelerate has offloaded (device_map + a memory cap) gives the in-memory table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from importance.arch.canonical import model_map
from importance.data.sources import Windows
from importance.errors import ImpruneError
from importance.models.load import load_model
from importance.scoring import score
from pruning.eval.perplexity import perplexity


def _windows() -> Windows:
    ids = torch.randint(5, 250, (4, 16), generator=torch.Generator().manual_seed(0))
    return Windows(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool), {"source": "test"})


@pytest.mark.parametrize("spec", ["random:llama:layers=6,hidden=256,intermediate=512",
                                  "random:gpt2:layers=6,hidden=256", "random:bert:layers=4,hidden=256"])
def test_offloaded_scoring_equals_in_memory(tmp_path: Path, spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMPRUNE_CACHE", str(tmp_path / "cache"))
    lm = load_model(spec)
    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    size = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    off = load_model(str(tmp_path / "m"), max_memory=f"{size // 4}B")  # a quarter of the model
    assert "disk" in set(off.model.hf_device_map.values())
    assert any(p.device.type == "meta" for p in off.model.parameters())
    for a, b in zip(model_map(lm.model).components(), model_map(off.model).components()):
        assert torch.equal(a.weight, b.weight), a.name  # views read the offloaded copies
    w = _windows()
    x, y = score(lm, w, progress=False), score(off, w, progress=False)
    assert x.scorers == y.scorers
    for s in x.scorers:
        for gran in ("component", "head", "mlp_channel"):
            if x.has(s, gran):
                torch.testing.assert_close(y.matrix(s, gran), x.matrix(s, gran), equal_nan=True, msg=f"{s}/{gran}")
    if lm.task != "encoder":
        assert perplexity(off.model, w, lm.task, progress=False).ppl == pytest.approx(
            perplexity(lm.model, w, lm.task, progress=False).ppl, rel=1e-5)


@pytest.mark.parametrize("cap,match", [("lots", "is not a size"), ("-5MB", "is not a size|must be positive")])
def test_bad_memory_caps(cap: str, match: str, tmp_path: Path) -> None:
    with pytest.raises(ImpruneError, match=match):
        load_model(str(tmp_path), max_memory=cap)


def test_random_models_cannot_be_offloaded() -> None:
    with pytest.raises(ImpruneError, match="save_pretrained"):
        load_model("random:llama", max_memory="1MB")
