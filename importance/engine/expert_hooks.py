"""Hooks of the collection pass on stacked MoE experts (``mlp.experts``: one [E, ...] parameter per projection).

The experts module is called with the routed hidden states, the top-k expert index and the routing weights;
each expert's small MLP is recomputed on its own tokens (``importance.arch.experts`` reads the layout: gate /
up order, transposition, biases, the gate function), forward-only sums of squares per expert channel, and in
the backward hook the row products ``d * y`` per sequence (and, on request, the per-expert weight gradients).
``ExpertHooks`` is a mixin of the pass in ``importance.engine.collect``: it reads the pass's ``cfg``, ``mask``,
``stats``, ``batch_size`` and ``_add_rows``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from importance.arch import experts
from importance.arch.canonical import Component
from importance.arch.experts import expert_layout


class ExpertHooks:
    """Forward / backward hooks of a stacked-experts module (see the module docstring)."""

    def _experts_forward(self, comps: list[Component]):
        named = {c.name: c for c in comps}

        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            hidden, index, weights = (list(args) + [kwargs.get(k) for k in ("top_k_index", "top_k_weights")])[:3]
            if self.cfg.activation:
                self._experts_activation(module, named, hidden.detach(), index)
            y = out[0] if isinstance(out, tuple) else out
            if self.cfg.grad and torch.is_grad_enabled() and y.requires_grad:
                cap = (hidden.detach(), index, weights.detach())
                y.register_hook(lambda d: self._experts_backward(module, named, *cap, d))

        return hook

    @staticmethod
    def _expert_mlp(module: nn.Module, e: int, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """gate, up, hidden (the module's own gate function) for expert ``e`` on routed tokens ``x`` [n, H]
        (fp32, biases included)."""
        layout = expert_layout(module)
        gu = experts.gate_up(module, layout, e, x)  # [n, 2I] in the module's order
        gate, up = experts.split(layout, gu)
        return gate, up, experts.hidden(module, gu)

    @torch.no_grad()
    def _experts_activation(self, module: nn.Module, named: dict[str, Component], hidden: torch.Tensor,
                            index: torch.Tensor) -> None:
        n_exp = module.gate_up_proj.shape[0]
        valid = self.mask.reshape(-1)
        sums: dict[tuple[str, str], torch.Tensor] = {}
        tokens = torch.zeros(n_exp)
        for e in range(n_exp):
            tok = torch.where(index == e)[0]
            if tok.numel() == 0:
                continue
            x, m = hidden[tok].float(), valid[tok].float()[:, None]
            gate, up, h = self._expert_mlp(module, e, x)
            down = experts.down(module, expert_layout(module), e, h)
            tokens[e] = m.sum()
            for name, xin, out in (("mlp.experts.gate", x, gate), ("mlp.experts.up", x, up),
                                   ("mlp.experts.down", h, down)):
                for stat, v in (("in_sq", xin), ("out_sq", out)):
                    acc = sums.setdefault((name, stat), torch.zeros(n_exp, v.shape[-1]))
                    acc[e] = (v.square() * m).sum(0)
        layer = named["mlp.experts.gate"].layer
        for (name, stat), v in sums.items():
            self.stats.add(f"{layer}|{name}|{stat}", v)
        self.stats.add(f"{layer}|mlp.experts|tokens", tokens)

    @torch.no_grad()
    def _experts_backward(self, module: nn.Module, named: dict[str, Component], hidden: torch.Tensor,
                          index: torch.Tensor, weights: torch.Tensor, d: torch.Tensor) -> None:
        b = self.batch_size
        seq_len = hidden.shape[0] // b
        n_exp = module.gate_up_proj.shape[0]
        rows: dict[str, torch.Tensor] = {}
        for e in range(n_exp):
            tok, pos = torch.where(index == e)
            if tok.numel() == 0:
                continue
            x = hidden[tok].float()
            with torch.enable_grad():
                gate, up, _ = self._expert_mlp(module, e, x)
                gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
                layout = expert_layout(module)
                h = experts.hidden(module, experts.join(layout, gate, up))
                y = experts.down(module, layout, e, h)
                dy = d[tok].float() * weights[tok, pos, None].float()  # routing weight scales the output
                dgate, dup = torch.autograd.grad(y, (gate, up), dy)
            seq = tok // seq_len
            for name, grad_out, out, xin in (("mlp.experts.gate", dgate, gate, x), ("mlp.experts.up", dup, up, x),
                                             ("mlp.experts.down", dy, y, h)):
                acc = rows.setdefault(name, torch.zeros(b, n_exp, out.shape[-1]))
                acc[:, e].index_add_(0, seq, grad_out * out.detach())
                if self.cfg.elements:
                    self._expert_elements(named[name], e, n_exp, xin.detach(), grad_out.detach(), seq)
        for name, s in rows.items():
            self._add_rows(named[name], s)

    def _expert_elements(self, comp: Component, e: int, n_exp: int, x: torch.Tensor, dy: torch.Tensor,
                         seq: torch.Tensor) -> None:
        units = [seq == s for s in seq.unique()] if self.cfg.fisher_unit == "sequence" else [seq >= 0]
        g_sum = torch.zeros(n_exp, dy.shape[-1], x.shape[-1])
        g_sq = torch.zeros_like(g_sum)
        for sel in units:
            g = dy[sel].T @ x[sel]
            g_sum[e] += g
            g_sq[e] += g.square()
        self.stats.add(f"{comp.layer}|{comp.name}|grad", g_sum)
        self.stats.add(f"{comp.layer}|{comp.name}|grad_sq", g_sq)
