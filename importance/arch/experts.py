"""Stacked MoE experts as transformers stores them: one module holding every expert's weights as 3-D tensors.

transformers' experts modules (``@use_experts_implementation``) declare their layout in flags:
``is_transposed`` (``gate_up_proj`` [E, H, 2I] / ``down_proj`` [E, I, H] instead of [E, 2I, H] / [E, H, I]),
``is_concatenated`` (gate|up rows as [gate | up]; False: interleaved [g0, u0, g1, u1, ...], as in gpt_oss),
``has_bias`` (``gate_up_proj_bias`` [E, 2I], ``down_proj_bias`` [E, H]) and their own gate function
``_apply_gate(gate_up) -> hidden`` (``act(gate) * up`` by default; gpt_oss: clamped ``(up + 1) * glu(gate)``).
``ExpertLayout`` reads those flags; ``gate_up`` / ``hidden`` / ``down`` compute one expert's small MLP from
the module's own parameters (fp32), so the collection pass and the functional check recompute exactly what the
module computes, and the canonical views (``mlp.experts.{gate,up,down}`` as ``[E, out, in]``) take their rows
from ``rows``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from importance.errors import ImpruneError


@dataclass(frozen=True)
class ExpertLayout:
    """How one stacked-experts module stores its weights (read from transformers' own flags)."""

    transposed: bool = False
    interleaved: bool = False
    bias: bool = False


def expert_layout(module: nn.Module) -> ExpertLayout:
    """The layout of ``module``; one-line refusal for the variants imprune cannot recompute."""
    if not getattr(module, "has_gate", True):
        raise ImpruneError(f"{type(module).__name__}: experts without a gate projection (up_proj only) are not "
                           "supported yet; prune the attention, or register a mapping without the experts")
    if getattr(module, "has_post_expert_norm", False):
        raise ImpruneError(f"{type(module).__name__}: experts with a norm after each expert are not supported yet; "
                           "prune the attention, or register a mapping without the experts")
    bias = bool(getattr(module, "has_bias", False))
    if bias and not all(isinstance(getattr(module, n, None), torch.Tensor)
                        for n in ("gate_up_proj_bias", "down_proj_bias")):
        raise ImpruneError(f"{type(module).__name__} declares biases but holds no gate_up_proj_bias / down_proj_bias")
    return ExpertLayout(bool(getattr(module, "is_transposed", False)),
                        not bool(getattr(module, "is_concatenated", True)), bias)


def rows(layout: ExpertLayout, two_i: int, part: int) -> slice | torch.Tensor:
    """The rows of the oriented ``[E, 2I, H]`` gate_up weight that are gate (part 0) or up (part 1)."""
    if layout.interleaved:
        return torch.arange(part, two_i, 2)
    half = two_i // 2
    return slice(part * half, (part + 1) * half)


def split(layout: ExpertLayout, gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., 2I] in the module's own order -> (gate [..., I], up [..., I])."""
    if layout.interleaved:
        return gate_up[..., 0::2], gate_up[..., 1::2]
    return gate_up.chunk(2, dim=-1)


def join(layout: ExpertLayout, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The inverse of ``split``: (gate, up) -> [..., 2I] in the module's own order."""
    if layout.interleaved:
        return torch.stack((gate, up), dim=-1).flatten(-2)
    return torch.cat((gate, up), dim=-1)


def _apply(w: torch.Tensor, x: torch.Tensor, transposed: bool) -> torch.Tensor:
    w = w.detach().float()
    return x @ w if transposed else x @ w.T


def gate_up(module: nn.Module, layout: ExpertLayout, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s gate_up projection of routed tokens ``x`` [n, H] -> [n, 2I] (module order, bias added)."""
    y = _apply(module.gate_up_proj[e], x, layout.transposed)
    return y + module.gate_up_proj_bias[e].detach().float() if layout.bias else y


def hidden(module: nn.Module, gate_up_out: torch.Tensor) -> torch.Tensor:
    """The module's own gate function on [n, 2I] -> [n, I]."""
    fn = getattr(module, "_apply_gate", None)
    if callable(fn):
        return fn(gate_up_out)
    g, u = gate_up_out.chunk(2, dim=-1)
    return module.act_fn(g) * u


def down(module: nn.Module, layout: ExpertLayout, e: int, h: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s down projection [n, I] -> [n, H] (bias added)."""
    y = _apply(module.down_proj[e], h, layout.transposed)
    return y + module.down_proj_bias[e].detach().float() if layout.bias else y
