"""Per-token gate Fisher of column groups: heads, KV groups and MLP channels at the input of attn.o / mlp.down.

A gate a_t on group G at token t multiplies G's slice of the module input (a head's output, an MLP channel's
activation) at that token only; d loss / d a_t = sum_{j in G} x_t[j] * gx_t[j] = p_t[G] with ``p = x * gx``
(the column hook's product before it is summed over tokens). The per-token gate Fisher is

  sum_b sum_t p_bt[G]^2          (``'{layer}|{group}|tok_sq'``; the scorer divides by N, the predicted tokens)

against the per-sequence mask Fisher sum_b (sum_t p_bt[G])^2: no cancellation between tokens. The signed sum
sum_b sum_t p_bt[G] (``'{layer}|{group}|tok'``) is the gradient of the summed NLL with respect to one gate shared
by every token (``token_second_order`` combines the two). A KV group gates
its query heads together (removing k/v of the group silences exactly those heads' outputs), so its per-token
value is the sum of its query heads' values before squaring. Pure tensor math; the hook is in ``collect``.
"""

from __future__ import annotations

import torch


def token_gate_sums(p: torch.Tensor, group: str, head_dim: int, n_kv_heads: int,
                    mask: torch.Tensor | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """``p`` [..., in] = x * gx per token (fp32), ``mask`` broadcastable to p[..., :1] (None: every token counts)
    -> {'head': sums, 'kv_group': sums} for a head-column component, {'mlp_channel': sums} for MLP columns, each
    ``sums`` {'tok_sq': sum of squares, 'tok': signed sum} over counted tokens ([H], [Hkv] or [in])."""
    flat = p.reshape(-1, p.shape[-1])  # [tokens, in]
    m = None if mask is None else mask.reshape(-1, 1).to(flat.dtype)  # [tokens, 1]
    if group == "head":
        heads = flat.reshape(flat.shape[0], -1, head_dim).sum(-1)  # [tokens, H] d loss / d head gate
        kv = heads.reshape(heads.shape[0], n_kv_heads, -1).sum(-1)  # [tokens, Hkv]
        return {"head": _masked_sums(heads, m), "kv_group": _masked_sums(kv, m)}
    if group == "mlp_channel":
        return {"mlp_channel": _masked_sums(flat, m)}
    return {}


def _masked_sums(v: torch.Tensor, m: torch.Tensor | None) -> dict[str, torch.Tensor]:
    v = v if m is None else v * m  # [tokens, n]; the mask is 0/1, so masking before squaring is the same
    return {"tok_sq": v.square().sum(0), "tok": v.sum(0)}
