"""Evaluation: token-level perplexity exactly as ``shared/protocol.md`` defines it.

Perplexity = exp(mean token NLL over every predicted token) on non-overlapping windows; the first token
of each window is never predicted (64 windows x 256 tokens -> 16,320 predicted tokens). Every result
carries its window length and token count, because perplexities at different lengths differ.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from importance.data.sources import Windows
from importance.engine.objective import require_loss, token_nll
from importance.models.load import input_device


@dataclass(frozen=True)
class Perplexity:
    """``ppl = exp(nll)``; ``nll`` the mean token NLL in nats over ``predicted`` tokens."""

    ppl: float
    nll: float
    predicted: int
    windows: int
    seq_len: int
    data: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        return (f"perplexity {self.ppl:.2f} (mean NLL {self.nll:.4f} nats; {self.windows} windows x {self.seq_len} "
                f"tokens, {self.predicted} predicted tokens; data {self.data})")


@torch.no_grad()
def perplexity(model: Any, windows: Windows, task: str = "causal-lm", batch_size: int = 8,
               progress: bool = True) -> Perplexity:
    """Perplexity of ``model`` over ``windows`` (sum of token NLL / predicted tokens, then exp)."""
    require_loss(task, "perplexity")
    device = input_device(model)
    total, count = 0.0, 0
    bar = tqdm(total=len(windows), desc="eval", unit="win", disable=not progress, leave=False)
    for batch in windows.batches(batch_size):
        nll, counted = token_nll(model, batch.to(device), task)
        total += float(nll.double().sum())
        count += int(counted.sum())
        bar.update(batch.input_ids.shape[0])
        bar.set_postfix(ppl=f"{math.exp(total / max(count, 1)):.2f}")
    bar.close()
    mean = total / max(count, 1)
    return Perplexity(math.exp(mean), mean, count, len(windows), windows.seq_len,
                      str(windows.meta.get("data", "")))
