"""Perplexity (pruning.eval.perplexity) against an independent computation from the logits."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_windows, tiny

from importance.data.sources import Windows, load_data
from importance.engine.objective import mlm_positions
from importance.errors import ImpruneError
from pruning.eval.perplexity import perplexity


def _reference_causal(model, w: Windows) -> tuple[float, int]:
    """Mean NLL over every predicted token: position t+1 given tokens <= t, targets with attention 1 only."""
    with torch.no_grad():
        logits = model(input_ids=w.input_ids, attention_mask=w.attention_mask).logits.double()  # [N, T, V]
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    target = w.input_ids[:, 1:]
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # [N, T-1]
    keep = w.attention_mask[:, 1:].bool() & w.loss_mask[:, 1:]
    return float(nll[keep].sum() / keep.sum()), int(keep.sum())


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen3_moe"], ids=str)
def test_perplexity_equals_log_softmax_over_predicted_tokens(model_type: str) -> None:
    lm = tiny(model_type)
    w = random_windows(n=5, t=12, pad_last=4, seed=1)
    ref_nll, ref_count = _reference_causal(lm.model, w)
    for bs in (1, 2, 8):  # batching never changes the result
        p = perplexity(lm.model, w, lm.task, batch_size=bs, progress=False)
        assert p.predicted == ref_count == 5 * 11 - 4
        assert p.nll == pytest.approx(ref_nll, rel=1e-5)
        assert p.ppl == pytest.approx(math.exp(ref_nll), rel=1e-5)
    assert (p.windows, p.seq_len, p.data) == (5, 12, "random")


def test_full_windows_predict_all_but_the_first_token(text_file) -> None:
    lm = tiny("qwen2")
    w = load_data(f"file:{text_file}", lm.tokenizer, seq_len=64, tokens=64 * 6, sampling="sequential")
    p = perplexity(lm.model, w, lm.task, batch_size=4, progress=False)
    assert p.predicted == len(w) * (w.seq_len - 1) == 6 * 63
    ref_nll, _ = _reference_causal(lm.model, w)
    assert p.nll == pytest.approx(ref_nll, rel=1e-5)
    assert "6 windows x 64 tokens" in p.line() and f"{p.ppl:.2f}" in p.line()
    assert p.to_dict()["predicted"] == p.predicted


def test_uniform_model_has_vocabulary_perplexity() -> None:
    """A model whose logits are all equal predicts every token with probability 1 / V: perplexity = V."""
    lm = tiny("llama")
    head = lm.model.get_output_embeddings()
    saved = head.weight.detach().clone()
    try:
        with torch.no_grad():
            head.weight.zero_()
        p = perplexity(lm.model, random_windows(n=2, t=9), lm.task, progress=False)
    finally:
        with torch.no_grad():
            head.weight.copy_(saved)
    assert p.ppl == pytest.approx(lm.model.config.vocab_size, rel=1e-5)


def test_masked_lm_through_the_same_path() -> None:
    lm = tiny("bert")
    w = random_windows(n=6, t=32, pad_last=5, seed=2)
    p = perplexity(lm.model, w, lm.task, batch_size=4, progress=False)
    # independent NLL at the positions the objective masks (seeded 15% of attended tokens, never padding)
    pick = mlm_positions(w.input_ids) & w.attention_mask.bool()
    assert p.predicted == int(pick.sum()) > 0
    masked = torch.where(pick, torch.full_like(w.input_ids, lm.model.config.mask_token_id), w.input_ids)
    with torch.no_grad():
        logits = lm.model(input_ids=masked, attention_mask=w.attention_mask).logits.double()
    nll = -torch.log_softmax(logits, -1).gather(-1, w.input_ids.unsqueeze(-1)).squeeze(-1)
    assert p.nll == pytest.approx(float(nll[pick].mean()), rel=1e-5)
    assert math.isfinite(p.ppl) and p.ppl > 1
    again = perplexity(lm.model, w, lm.task, batch_size=1, progress=False)
    assert again.nll == pytest.approx(p.nll, rel=1e-6)  # the masked positions do not depend on the batch


def test_perplexity_needs_a_loss() -> None:
    with pytest.raises(ImpruneError, match="perplexity"):
        perplexity(tiny("llama").model, random_windows(n=1, t=4), "encoder", progress=False)
