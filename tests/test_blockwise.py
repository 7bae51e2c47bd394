"""Block-by-block scoring (kept hidden states, one block at a time) equals the usual pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from importance.data.sources import Windows
from importance.errors import ImpruneError
from importance.models.load import load_model
from importance.scoring import score

FORWARD_ONLY = ["activation", "magnitude", "block_influence"]


def _windows() -> Windows:
    ids = torch.randint(5, 250, (5, 16), generator=torch.Generator().manual_seed(0))
    att = torch.ones_like(ids)
    att[-1, -5:] = 0  # padding must be honoured the same way
    return Windows(ids, att, att.bool(), {"source": "test"})


def _same(a, b) -> None:
    assert a.scorers == b.scorers and a.meta["counts"] == b.meta["counts"]
    for s in a.scorers:
        torch.testing.assert_close(b.layer_scores(s), a.layer_scores(s), equal_nan=True)
        for gran in ("component", "head", "kv_group", "mlp_channel", "expert"):
            if a.has(s, gran):
                torch.testing.assert_close(b.matrix(s, gran), a.matrix(s, gran), equal_nan=True, msg=f"{s}/{gran}")


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox", "phi3", "bert", "qwen2_moe", "gemma2", "opt"])
def test_blockwise_equals_the_usual_pass(model_type: str) -> None:
    lm = load_model(f"random:{model_type}")
    w = _windows()
    _same(score(lm, w, FORWARD_ONLY, batch_size=2, progress=False),
          score(lm, w, FORWARD_ONLY, batch_size=2, blockwise=True, progress=False))
    assert not any(b._forward_hooks or b._forward_pre_hooks for b in lm.model.modules()
                   if type(b).__name__.endswith(("Layer", "Block")))


def test_blockwise_on_a_model_mostly_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMPRUNE_CACHE", str(tmp_path / "cache"))
    lm = load_model("random:llama:layers=6,hidden=256,intermediate=512")
    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    size = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    off = load_model(str(tmp_path / "m"), max_memory=f"{size // 4}B")
    assert "disk" in set(off.model.hf_device_map.values())
    w = _windows()
    _same(score(lm, w, FORWARD_ONLY, batch_size=2, progress=False),
          score(off, w, FORWARD_ONLY, batch_size=2, blockwise=True, progress=False))


def test_gradient_scorers_are_refused_block_by_block() -> None:
    with pytest.raises(ImpruneError, match="forward only"):
        score(load_model("random:llama"), _windows(), ["taylor"], blockwise=True, progress=False)
