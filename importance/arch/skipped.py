"""The stand-in for a removed residual branch (an attention or MLP sub-block skipped by ``--method blocks``).

A pre-norm block adds each branch's output to the residual stream; a removed branch adds exactly zero, or, when
its removal was compensated (``--compensate mean``), a constant: the branch's mean output over the calibration
tokens, the one parameter it keeps (``bias`` [d]); or (``--compensate linear``) an affine map of the branch's
input, ``x W^T + b`` (``weight`` [d, d]), fitted by least squares to what the branch added. The stand-in takes
the removed module's place and returns that shaped like its input (attention: ``(out, None)``, the (output,
attention weights) pair every decoder attention returns), so the block's own forward runs unchanged and the
residual passes through (shifted by the constant, or by the map).

A skipped attention still tells a KV cache that tokens went by: it writes a one-number key and value per
token (``[B, 1, T, 1]``) into its layer's slot, so that the cache's sequence length (read from layer 0 by
generation) and the masks built from it stay right even when layer 0's attention is gone.

Kept free of the rest of ``importance.arch`` so that the canonical map can recognise it without a cycle.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

BRANCHES = ("attn", "mlp")


class SkippedBranch(nn.Module):
    """A removed attention (``kind='attn'``) or MLP (``kind='mlp'``) sub-block: adds nothing to the residual, or
    the constant ``bias`` [width] when built with ``width`` (a compensated removal; the values are loaded or set),
    plus ``input @ weight^T`` when also built with ``in_width`` (weight [width, in_width]: a linear stand-in)."""

    def __init__(self, kind: str, layer_idx: int | None = None, width: int | None = None,
                 in_width: int | None = None) -> None:
        super().__init__()
        if kind not in BRANCHES:
            raise ValueError(f"kind must be one of {BRANCHES}, not {kind!r}")
        self.kind = kind
        self.layer_idx = layer_idx  # the KV-cache slot (renumbered with the block when layers are dropped)
        self.bias = None if width is None else nn.Parameter(torch.zeros(width))  # [d]
        if in_width is not None and width is None:
            raise ValueError("a linear stand-in needs its output width too")
        self.weight = None if in_width is None else nn.Parameter(torch.zeros(width, in_width))  # [d, d_in]

    def extra_repr(self) -> str:
        comp = "linear" if self.weight is not None else self.bias is not None
        return f"kind={self.kind!r}, layer_idx={self.layer_idx}, compensated={comp}"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]  # [B, T, d]
        zero = torch.zeros_like(hidden)
        if self.bias is not None:
            zero = zero + self.bias.to(hidden.dtype)  # [B, T, d]: the branch's mean output at every token
        if self.weight is not None:
            zero = zero + hidden @ self.weight.to(hidden.dtype).T  # [B, T, d]: its linear stand-in
        if self.kind == "mlp":
            return zero
        cache = _cache_in(args[1:], kwargs)
        if cache is not None and self.layer_idx is not None:
            stub = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[1], 1)  # [B, 1, T, 1]
            cache.update(stub, stub, self.layer_idx)
        return zero, None


def _cache_in(args: tuple, kwargs: dict[str, Any]) -> Any:
    """The transformers ``Cache`` among a call's arguments (None when generation passes none)."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return next((v for v in (*args, *kwargs.values()) if isinstance(v, Cache)), None)
