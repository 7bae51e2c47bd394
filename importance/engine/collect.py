"""ONE hooked pass over the calibration batches -> ``Statistics`` (plain fp32 sums that merge by addition).

Every statistic of a linear layer is a function of its input ``x`` [tokens, in], its output ``y`` and
the gradient ``d = dL/dy`` [tokens, out], so no parameter ever holds a ``.grad``: weights are frozen
(``requires_grad_(False)``) while gradients still flow through activations, and autograd's own
weight-gradient matmul is never paid. Per sequence b (``s`` sums over the tokens of b):

  row i   (output channel, bias included)   s_b[i] = sum_t d_t[i] * y_t[i]      = sum_j W_ij G_b,ij + b_i gb_b,i
  column j (input channel, attn.o/mlp.down)  c_b[j] = sum_t x_t[j] * gx_t[j]     = sum_i W_ij G_b,ij
  element (only on request)                  G_b   = sum_t d_t x_t^T             (weight gradient of sequence b)

with ``gx`` the gradient reaching this module's input (caught on an alias of the input, so it is this
module's share even where q/k/v read the same tensor). Group sums (heads, KV groups, MLP channels,
experts, components, layers) are sums of these per-sequence vectors, squared only after a whole batch
has been backpropagated (with ``token_fisher``, the column products are also folded per token into the gate
Fisher of heads / KV groups / MLP channels, ``importance.engine.gates``). Norm weights are handled through
``a = dy/dw`` (a forward-mode derivative, so Gemma's ``1 + w`` needs no special case) and stacked MoE experts by
recomputing each expert's small MLP on its routed tokens inside the backward hook. Forward-only statistics:
per-channel sums of squares of inputs and outputs over non-padding tokens, and 1 - cos(block input, block output)
per token.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from importance.arch.branches import BRANCHES, block_branch, first_input
from importance.arch.canonical import Block, Component, ModelMap, model_map
from importance.arch.experts import expert_layout
from importance.data.sources import Batch, Windows
from importance.engine.expert_hooks import ExpertHooks
from importance.engine.gates import token_gate_sums
from importance.engine.objective import require_loss, token_nll
from importance.engine.offload import bare_forward, offloaded_weight
from importance.engine.stats import CollectConfig, Statistics
from importance.errors import ImpruneError
from importance.models.checks import nonfinite_advice
from importance.models.load import input_device

__all__ = ["CollectConfig", "Statistics", "collect"]


def _token_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a [B, T] token mask onto activation ``x`` ([B, T, ...], [B, H, T, d] or [B*T, C])."""
    b, t = mask.shape
    if x.dim() == 2 and x.shape[0] == b * t:
        return mask.reshape(b * t, 1)
    if x.shape[1] == t:
        return mask.view(b, t, *([1] * (x.dim() - 2)))
    if x.dim() == 4 and x.shape[2] == t:
        return mask.view(b, 1, t, 1)
    return torch.ones((), dtype=mask.dtype, device=mask.device)


def _per_seq(v: torch.Tensor, b: int) -> torch.Tensor:
    """[B, ..., C] or [B*T, C] -> [B, C] summed over every position of each sequence."""
    return v.reshape(b, -1, v.shape[-1]).sum(1)


class _Pass(ExpertHooks):
    """The hooks of one collection pass; ``install`` returns the handles to remove."""

    def __init__(self, mm: ModelMap, cfg: CollectConfig, stats: Statistics) -> None:
        self.mm, self.cfg, self.stats = mm, cfg, stats
        self.mask = torch.ones(1, 1)
        self.all_valid = True  # no padding in the current batch: skip mask multiplies
        self._last_x: torch.Tensor | None = None
        self._last_sq = torch.zeros(0)
        self.rows: dict[tuple[int, str], torch.Tensor] = {}  # per-batch [B, out] (experts [B, E, out])
        self.cols: dict[tuple[int, str], torch.Tensor] = {}  # per-batch [B, in]
        self._inside_norm = False

    # -------------------------------------------------------------------------------- installation
    def install(self, layers: set[int] | None = None) -> list[Any]:
        """Hook every component (or only those of ``layers``); returns the handles to remove."""
        handles: list[Any] = []
        by_module: dict[int, list[Component]] = defaultdict(list)
        for comp in self.mm.components():
            if layers is None or comp.layer in layers:
                by_module[id(comp.module)].append(comp)
        for comps in by_module.values():
            mod, kind = comps[0].module, comps[0].kind
            if kind == "linear":
                handles.append(mod.register_forward_hook(self._linear_forward(comps)))
                col = [c for c in comps if c.in_group]
                if col and self.cfg.grad:
                    handles.append(mod.register_forward_pre_hook(self._column_alias(col[0])))
            elif kind == "norm":
                handles.append(mod.register_forward_hook(self._norm_forward(comps[0])))
            elif kind == "experts":
                expert_layout(mod)  # refuses, in one line, a layout it cannot recompute
                handles.append(mod.register_forward_hook(self._experts_forward(comps), with_kwargs=True))
        if self.cfg.block_influence or (self.cfg.residual_fisher and self.cfg.grad):
            for block in self.mm.blocks:
                if layers is None or block.index in layers:
                    handles.extend(self._block_hooks(block))
        if self.cfg.branch_fisher and self.cfg.grad:
            handles.extend(self._branch_hooks(layers))
        return handles

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    def _add_rows(self, comp: Component, s: torch.Tensor) -> None:
        key = (comp.layer, comp.name)
        self.rows[key] = self.rows[key] + s if key in self.rows else s

    def _sumsq(self, v: torch.Tensor) -> torch.Tensor:
        """Sum over the non-padding tokens of v^2 per channel (last dim) -> [C] fp32."""
        v = v.float()
        if self.all_valid:
            return v.square().reshape(-1, v.shape[-1]).sum(0)
        m = _token_mask(self.mask, v)
        return (v.square() * m).reshape(-1, v.shape[-1]).sum(0)

    def _activation(self, comp: Component, x: torch.Tensor | None, y: torch.Tensor | None) -> None:
        if not self.cfg.activation:
            return
        with torch.no_grad():
            if x is not None:  # q/k/v (and gate/up) read the same tensor, one after the other: square it once
                if self._last_x is not x:  # identity, and the reference keeps its memory from being reused
                    self._last_x, self._last_sq = x, self._sumsq(x)
                self.stats.add(f"{comp.layer}|{comp.name}|in_sq", self._last_sq)
            if y is not None:
                self.stats.add(f"{comp.layer}|{comp.name}|out_sq", self._sumsq(y))

    # -------------------------------------------------------------------------------- linear layers
    def _linear_forward(self, comps: list[Component]):
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            x = args[0]
            y = out[0] if isinstance(out, tuple) else out
            for comp in comps:
                self._activation(comp, x, comp.select_out(y))
            if self.cfg.grad and torch.is_grad_enabled() and y.requires_grad:
                xd, yd = x.detach(), y.detach()
                y.register_hook(lambda d: self._linear_backward(comps, xd, yd, d))

        return hook

    @torch.no_grad()
    def _linear_backward(self, comps: list[Component], x: torch.Tensor, y: torch.Tensor, d: torch.Tensor) -> None:
        b = self.batch_size
        for comp in comps:
            dc = comp.select_out(d).float()  # [B, T, out]
            self._add_rows(comp, _per_seq(dc * comp.select_out(y).float(), b))
            if self.cfg.elements:
                self._elements(comp, x.float().reshape(b, -1, x.shape[-1]), dc.reshape(b, -1, dc.shape[-1]))

    def _elements(self, comp: Component, xb: torch.Tensor, db: torch.Tensor) -> None:
        """Per-sequence weight gradients G_b = d_b^T x_b [out, in]: sum and sum of squares, folded in place."""
        key = f"{comp.layer}|{comp.name}"
        out, inp = db.shape[-1], xb.shape[-1]
        grad = self.stats.sums.setdefault(f"{key}|grad", torch.zeros(out, inp))
        grad_sq = self.stats.sums.setdefault(f"{key}|grad_sq", torch.zeros(out, inp))
        if self.cfg.fisher_unit == "batch":
            xb, db = xb.reshape(1, -1, inp), db.reshape(1, -1, out)
        g = torch.empty(out, inp)
        for x_b, d_b in zip(xb, db):
            torch.mm(d_b.T, x_b, out=g)
            grad.add_(g)
            grad_sq.addcmul_(g, g)

    def _column_alias(self, comp: Component):
        """Feed the module an alias of its input, whose gradient is this module's share alone."""

        def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
            x = args[0]
            if not (torch.is_grad_enabled() and x.requires_grad):
                return None
            alias = x.view_as(x)
            xd = x.detach()
            alias.register_hook(lambda gx: self._column_backward(comp, xd, gx))
            return (alias, *args[1:])

        return pre_hook

    @torch.no_grad()
    def _column_backward(self, comp: Component, x: torch.Tensor, gx: torch.Tensor) -> None:
        key = (comp.layer, comp.name)
        p = x.float() * gx.float()  # [B, T, in] d loss / d per-token gate of each input column
        c = _per_seq(p, self.batch_size)  # [B, in]
        self.cols[key] = self.cols[key] + c if key in self.cols else c
        if self.cfg.token_fisher:
            mask = None if self.all_valid else _token_mask(self.mask, p)
            for group, sums in token_gate_sums(p, comp.in_group, comp.head_dim,
                                               self.mm.blocks[comp.layer].n_kv_heads, mask).items():
                for stat, v in sums.items():  # 'tok_sq' and 'tok'
                    self.stats.add(f"{comp.layer}|{group}|{stat}", v)

    # -------------------------------------------------------------------------------- norms
    def _norm_forward(self, comp: Component):
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            if self._inside_norm:
                return
            x = args[0]
            y = out[0] if isinstance(out, tuple) else out
            self._activation(comp, x, y)
            if self.cfg.grad and torch.is_grad_enabled() and y.requires_grad:
                a = self._norm_tangent(module, x.detach())  # dy/dw, same shape as y
                y.register_hook(lambda d: self._norm_backward(comp, a, d))

        return hook

    def _norm_tangent(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call, jvp

        params = {n: (p if p.device.type != "meta"  # offloaded (device_map): its copy, where the input is
                      else offloaded_weight(module, n, type(module).__name__).to(x.device)).detach()
                  for n, p in module.named_parameters(recurse=False)}
        w = params.pop("weight")
        self._inside_norm = True
        try:
            with torch.no_grad(), bare_forward(module):
                _, a = jvp(lambda w_: functional_call(module, {**params, "weight": w_}, (x,)), (w,),
                           (torch.ones_like(w),))
        finally:
            self._inside_norm = False
        return a

    @torch.no_grad()
    def _norm_backward(self, comp: Component, a: torch.Tensor, d: torch.Tensor) -> None:
        b = self.batch_size
        d = d.float()
        g = _per_seq(d * a.float(), b)  # [B, C] gradient of the weight, per sequence
        s = g * comp.weight.detach().float().to(g.device)
        bias = comp.bias
        if bias is not None:
            s = s + _per_seq(d, b) * bias.detach().float().to(s.device)
        self._add_rows(comp, s)
        if self.cfg.elements:
            gg = g.sum(0, keepdim=True) if self.cfg.fisher_unit == "batch" else g
            self.stats.add(f"{comp.layer}|{comp.name}|grad", gg.sum(0))
            self.stats.add(f"{comp.layer}|{comp.name}|grad_sq", gg.square().sum(0))

    # -------------------------------------------------------------------------------- blocks
    def _block_hooks(self, block: Block) -> list[Any]:
        """Block input and output: 1 - cos per token (block influence) and, in a gradient pass, the residual
        Fisher sum_t (g_t . (out_t - in_t))^2 from a gradient hook on the output. Both tensors are held by
        reference only: autograd keeps them anyway (the block's input norm and the next one's save them)."""
        held: dict[str, torch.Tensor] = {}
        want_fisher = self.cfg.residual_fisher and self.cfg.grad

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            held["x"] = first_input(args, kwargs).detach()

        def post(module: nn.Module, args: tuple, out: Any) -> None:
            out_t = out[0] if isinstance(out, tuple) else out
            h_in, h_out = held.pop("x"), out_t.detach()
            m = self.mask  # [B, T]
            if self.cfg.block_influence:
                cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1, eps=1e-8)  # [B, T]
                self.stats.add(f"{block.index}|block|influence", ((1 - cos) * m.to(cos.dtype)).sum().reshape(1))
                self.stats.add(f"{block.index}|block|influence_tokens", m.sum().reshape(1))
            if want_fisher and out_t.requires_grad:
                out_t.register_hook(self._gate_fisher_hook(f"{block.index}|block|residual_fisher", h_out, h_in, m))

        return [block.module.register_forward_pre_hook(pre, with_kwargs=True),
                block.module.register_forward_hook(post)]

    def _branch_hooks(self, layers: set[int] | None) -> list[Any]:
        """The gate Fisher of each residual branch (attention / MLP sub-block): the update it adds is its last
        module's output y, so d loss / d gate_t = g_t . y_t with g the gradient there."""
        def post(key: str):
            def hook(_m: nn.Module, _a: tuple, out: Any) -> None:
                y = out[0] if isinstance(out, tuple) else out
                if y.requires_grad:
                    y.register_hook(self._gate_fisher_hook(key, y.detach(), None, self.mask))
            return hook

        return [b.module.get_submodule(block_branch(b, self.mm, kind).last).register_forward_hook(
                    post(f"{b.index}|block|{kind}_fisher"))
                for b in self.mm.blocks for kind in BRANCHES
                if kind not in b.skipped and (layers is None or b.index in layers)]

    def _gate_fisher_hook(self, key: str, h_out: torch.Tensor, h_in: torch.Tensor | None, mask: torch.Tensor):
        """sum_t (g_t . delta_t)^2 over counted tokens, delta = h_out - h_in (h_in None: h_out itself)."""
        def hook(g: torch.Tensor) -> None:  # g: [B, T, d] gradient of the summed NLL at h_out
            delta = h_out.float() - h_in.float() if h_in is not None else h_out.float()
            gate = (g.float() * delta).sum(-1)  # [B, T] d loss / d per-token gate
            self.stats.add(key, (gate.square() * mask.to(gate.dtype)).sum().reshape(1))

        return hook

    # -------------------------------------------------------------------------------- folding
    @torch.no_grad()
    def fold(self) -> None:
        """Square the per-sequence sums of this batch into the running statistics."""
        unit = self.cfg.fisher_unit
        groups: dict[tuple[int, str], torch.Tensor] = {}

        def group_add(layer: int, group: str, v: torch.Tensor) -> None:
            key = (layer, group)
            groups[key] = groups[key] + v if key in groups else v

        for (layer, name), s in self.rows.items():
            if not torch.isfinite(s).all():
                raise ImpruneError(f"non-finite gradients in layer {layer} ({name}); "
                                   + nonfinite_advice(self.mm.model))
            if unit == "batch":
                s = s.sum(0, keepdim=True)
            comp = self.mm.blocks[layer].components[name]
            self.stats.add(f"{layer}|{name}|row_wg", s.sum(0))
            self.stats.add(f"{layer}|{name}|row_wg_sq", s.square().sum(0))
            total = s.flatten(1).sum(1)  # [B] the whole component
            self.stats.add(f"{layer}|{name}|comp_wg", total.sum().reshape(1))
            self.stats.add(f"{layer}|{name}|comp_wg_sq", total.square().sum().reshape(1))
            group_add(layer, "layer", total[:, None])
            if comp.kind == "experts":
                group_add(layer, "expert", s.sum(-1))
            elif comp.out_group:
                group_add(layer, comp.out_group, _fold_heads(s, comp.head_dim, comp.out_group))
        for (layer, name), c in self.cols.items():
            if unit == "batch":
                c = c.sum(0, keepdim=True)
            comp = self.mm.blocks[layer].components[name]
            self.stats.add(f"{layer}|{name}|col_wg", c.sum(0))
            self.stats.add(f"{layer}|{name}|col_wg_sq", c.square().sum(0))
            group_add(layer, comp.in_group or "", _fold_heads(c, comp.head_dim, comp.in_group))
        for (layer, group), v in list(groups.items()):
            if group == "head" and (layer, "kv_group") in groups:  # a KV group takes its query heads along
                kv = groups[(layer, "kv_group")]
                groups[(layer, "kv_group")] = kv + v.reshape(v.shape[0], kv.shape[1], -1).sum(-1)
        for (layer, group), v in groups.items():
            self.stats.add(f"{layer}|{group}|wg", v.sum(0))
            self.stats.add(f"{layer}|{group}|wg_sq", v.square().sum(0))
        self.rows.clear()
        self.cols.clear()


def _fold_heads(v: torch.Tensor, head_dim: int, group: str | None) -> torch.Tensor:
    """[B, H*d] -> [B, H] for head / KV-group slices; channels and experts pass through."""
    if group in ("head", "kv_group"):
        return v.reshape(v.shape[0], -1, head_dim).sum(-1)
    return v


@contextlib.contextmanager
def _frozen(model: nn.Module, grad: bool) -> Iterator[None]:
    """No parameter needs a gradient; the embedding output does, so gradients flow through activations."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    handles = []
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        if grad:  # the input embedding, and token embeddings like it (BART's decoder has its own copy)
            emb = model.get_input_embeddings()
            embs = {id(emb): emb} | {id(m): m for m in model.modules() if isinstance(m, nn.Embedding)
                                      and m.weight.shape == emb.weight.shape}
            # a non-leaf copy: a model that adds to its embeddings in place (GIT) may not do so on a leaf
            handles = [m.register_forward_hook(lambda m, a, out: out.requires_grad_(True).clone())
                       for m in embs.values()]
        yield
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


_DEFAULT_CONFIG = CollectConfig()


def collect(model: nn.Module, windows: Windows, task: str, cfg: CollectConfig = _DEFAULT_CONFIG,
            batch_size: int = 4, progress: bool = True, mm: ModelMap | None = None) -> Statistics:
    """Run the one pass over ``windows`` and return the accumulated ``Statistics``."""
    if cfg.grad:
        require_loss(task)
    if cfg.fisher_unit not in ("sequence", "batch"):
        raise ImpruneError(f"unknown fisher unit '{cfg.fisher_unit}'; use sequence or batch")
    mm = mm or model_map(model)
    stats = Statistics(meta={"collect": {**cfg.__dict__}, "batch_size": batch_size})
    run = _Pass(mm, cfg, stats)
    device = input_device(model)
    was_training = model.training
    model.eval()
    handles = run.install()
    bar = tqdm(total=windows.n_tokens, desc="score", unit="tok", unit_scale=True, disable=not progress,
               leave=False)
    start = time.perf_counter()
    try:
        with _frozen(model, cfg.grad):
            for batch in windows.batches(batch_size):
                _one_batch(model, batch.to(device), task, cfg, run)
                bar.update(batch.n_tokens)
    finally:
        for h in handles:
            h.remove()
        run.rows.clear()
        run.cols.clear()
        run._last_x = None
        bar.close()
        model.train(was_training)
    stats.meta["seconds"] = time.perf_counter() - start
    return stats


def _one_batch(model: nn.Module, batch: Batch, task: str, cfg: CollectConfig, run: _Pass) -> None:
    run.mask = batch.attention_mask.to(torch.float32)
    run.all_valid = bool(batch.attention_mask.all())
    run._last_x = None
    s = run.stats
    s.add("-|run|sequences", torch.tensor(float(batch.input_ids.shape[0])))
    s.add("-|run|tokens", torch.tensor(float(batch.n_tokens)))
    s.add("-|run|batches", torch.tensor(1.0))
    if not cfg.grad:
        with torch.no_grad():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        return
    nll, counted = token_nll(model, batch, task)
    loss = nll.sum()
    if not math.isfinite(float(loss.detach())):
        raise ImpruneError("the loss is not finite on a calibration batch; " + nonfinite_advice(model))
    s.add("-|run|targets", torch.tensor(float(counted.sum())))
    s.add("-|run|nll", loss.detach().double().float())
    loss.backward()
    run.fold()
