"""The sums a scoring pass produces (``Statistics``) and what the pass gathers (``CollectConfig``).

Kept apart from the hooks (``importance.engine.collect``) so that scorers, tables, the ablation and the distributed
all-reduce can read and merge statistics without the pass itself. Keys are ``'{layer}|{component or group}|{stat}'``
(run counts: ``'-|run|{name}'``); every value is a plain sum over sequences, so shards merge by addition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Statistics:
    """Flat fp32 sums keyed ``'{layer}|{component or group}|{stat}'`` plus run metadata.

    Everything in ``sums`` (counts included) is a plain sum over sequences, so statistics from shards of
    the data merge by elementwise addition (``merge``, or an all-reduce across processes).
    """

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        if key in self.sums:
            self.sums[key] += value.to(self.sums[key].device)
        else:
            self.sums[key] = value.clone()

    def get(self, layer: int, name: str, stat: str) -> torch.Tensor | None:
        return self.sums.get(f"{layer}|{name}|{stat}")

    def merge(self, other: Statistics) -> Statistics:
        for k, v in other.sums.items():
            self.add(k, v)
        return self

    def count(self, name: str) -> float:
        t = self.sums.get(f"-|run|{name}")
        return float(t) if t is not None else 0.0


@dataclass(frozen=True)
class CollectConfig:
    """What the pass gathers: ``grad`` (taylor/fisher), ``elements`` (per-weight tensors), ``activation``,
    ``block_influence``, ``residual_fisher`` (needs ``grad``), ``branch_fisher`` (needs ``grad``: the same gate
    Fisher per residual branch, ``{l}|block|attn_fisher`` / ``mlp_fisher``), ``token_fisher`` (needs ``grad``: the
    per-token gate Fisher of heads / KV groups / MLP channels, ``importance.engine.gates``); ``fisher_unit`` is
    'sequence' or 'batch' (the b of sum_b g_b^2)."""

    grad: bool = True
    elements: bool = False
    activation: bool = True
    block_influence: bool = True
    fisher_unit: str = "sequence"
    residual_fisher: bool = False
    branch_fisher: bool = False
    token_fisher: bool = False
