"""The loss every gradient scorer and every perplexity figure is computed from: per-token NLL.

``token_nll(model, batch, task)`` returns ``(nll [B, T], counted [B, T] bool)``: the negative log
likelihood of each target token and which positions count. For a causal LM, position t holds the NLL of
token t given tokens < t (so column 0 never counts) where ``loss_mask`` and ``attention_mask`` allow;
for a masked LM, a seeded 15% of the counted tokens are replaced by the mask token and predicted. The
loss of a batch is the SUM over counted tokens (never a mean), so gradients add up across batches and
one batch of 4 equals two batches of 2 exactly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from importance.data.sources import Batch
from importance.errors import ImpruneError

MLM_RATE = 0.15


def has_loss(task: str) -> bool:
    return task in ("causal-lm", "masked-lm")


def require_loss(task: str, what: str = "gradient scorers (taylor, fisher)") -> None:
    if not has_loss(task):
        raise ImpruneError(f"this model has no language-model head, so it has no loss: {what} need one; "
                           "use --scorers activation,magnitude,block_influence (or a model with an LM head)")


def mlm_positions(ids: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """[B, T] bool: a seeded MLM_RATE share of positions, drawn per sequence from its own tokens, so the
    choice never depends on which other sequences share the batch."""
    weights = torch.arange(1, ids.shape[1] + 1, dtype=torch.long)
    rows = []
    for row in ids.cpu():
        gen = torch.Generator().manual_seed((seed * 1_000_003 + int((row * weights).sum())) % (2**62))
        rows.append(torch.rand(ids.shape[1], generator=gen) < MLM_RATE)
    return torch.stack(rows)


def _logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def token_nll(model: Any, batch: Batch, task: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL [B, T] (float32, zero where not counted) and the counted mask [B, T]."""
    require_loss(task, "a loss")
    ids, attn = batch.input_ids, batch.attention_mask
    counted = batch.loss_mask.bool() & attn.bool()
    if task == "causal-lm":
        logits = _logits(model, ids, attn)  # [B, T, V]
        counted = counted.clone()
        counted[:, 0] = False
        nll = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
        step = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        nll[:, 1:] = torch.where(counted[:, 1:], step.view(ids.shape[0], -1), 0.0)
        return nll, counted
    mask_id = getattr(model.config, "mask_token_id", None)
    if mask_id is None:
        raise ImpruneError("this masked-LM config names no mask_token_id; set it in the model's config")
    pick = mlm_positions(ids, seed).to(ids.device) & counted
    logits = _logits(model, torch.where(pick, torch.full_like(ids, mask_id), ids), attn)
    nll = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten(), reduction="none").view(ids.shape)
    return torch.where(pick, nll, 0.0), pick
