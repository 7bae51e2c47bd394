"""The removable units of structured pruning: query heads with their KV heads (whole KV groups, or one head
per group), and MLP channels; each with its parameter count and importance score, in the order they go.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from importance.arch.canonical import Block
from pruning.methods.surgery import channel_params, head_params

ATTN = ("attn.q", "attn.k", "attn.v", "attn.o", "attn.gate", "norm.q", "norm.k")


MLP = ("mlp.gate", "mlp.up", "mlp.down")


@dataclass(frozen=True)
class Unit:
    """One removable piece of one layer: query heads with their KV heads, or MLP channels."""

    layer: int
    heads: tuple[int, ...] = ()
    kv_heads: tuple[int, ...] = ()
    channels: tuple[int, ...] = ()
    params: int = 0
    score: float = 0.0


def part_params(block: Block, part: str) -> int:
    names = ATTN if part == "heads" else MLP if part == "channels" else ATTN + MLP
    return sum(c.numel + (c.bias.numel() if c.bias is not None else 0) for n, c in block.components.items()
               if n in names)


def attention_units(block: Block, head: torch.Tensor, kv_group: torch.Tensor | None, gqa: str) -> list[Unit]:
    """Removable attention units in the order they must go (at least one always stays).

    per-group: unit r = the r-th least important query head of EVERY KV group (score: their sum);
    groups (or no GQA): one KV group with all its query heads (score: the table's kv_group score).
    """
    h, kv = block.n_heads, block.n_kv_heads
    if not h or "attn.o" not in block.components:
        return []
    g = h // kv
    pq, pkv = head_params(block)
    if gqa == "per-group" and g > 1:
        order = [sorted(range(j * g, (j + 1) * g), key=lambda q: (float(head[q]), q)) for j in range(kv)]
        return [Unit(block.index, heads=tuple(sorted(o[r] for o in order)), params=kv * pq,
                     score=float(sum(head[o[r]] for o in order))) for r in range(g - 1)]
    scores = kv_group if kv_group is not None else head[:h].reshape(kv, g).sum(-1)
    order = sorted(range(kv), key=lambda j: (float(scores[j]), j))[:-1]
    return [Unit(block.index, heads=tuple(range(j * g, (j + 1) * g)), kv_heads=(j,), params=g * pq + pkv,
                 score=float(scores[j])) for j in order]


def channel_units(block: Block, scores: torch.Tensor) -> list[Unit]:
    n = block.intermediate
    if not n or "mlp.down" not in block.components:
        return []
    p = channel_params(block)
    order = sorted(range(n), key=lambda j: (float(scores[j]), j))[:-1]
    return [Unit(block.index, channels=(j,), params=p, score=float(scores[j])) for j in order]
