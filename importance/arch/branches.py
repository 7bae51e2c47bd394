"""Residual branches (sub-blocks) of a pre-norm block: the attention and the MLP, each removable on its own.

A pre-norm block computes ``h = x + A(n_a(x))`` then ``y = h + M(n_m(h))`` (parallel blocks: ``y = x + A + M``),
where a branch may end in an output norm (Gemma-2/3 and OLMo-2: ``x + n_out(A(...))``). Removing a branch
means adding zero in its place: its module, its output norm and its input norm (when no other branch reads
that norm: Cohere and Falcon-7B feed both branches from one) go. This module is the one place that knows
which modules make up a branch, through the canonical map's paths (``ArchSpec.attn`` / ``ArchSpec.mlp`` and the
mapped norms):

  ``branches(mm)``       every branch still present, with the modules it consists of and its parameter count
  ``zeroed(mm, b, v)``   inside the context the branch's output is replaced by zeros, or by the constant ``v`` [d]
                         at every token (a forward hook on its last module): what the measured removal and the
                         one-pass gate estimate look at
  ``branch_means``       each branch's mean output over calibration tokens: the constant a compensated removal adds
  ``skip_branch_(mm, b)`` removes it for real: the module becomes a ``SkippedBranch`` (no parameters, the one
                         constant ``bias`` [d] of a compensated removal, or a linear stand-in's ``weight`` and
                         ``bias``), the norms ``nn.Identity``; the canonical map then lists no components of it
                         (``Block.skipped``)

``check_branches`` proves on block 0 that a block with both branch outputs zero passes its input through; post-norm
blocks (the norm sits on the residual sum) and BLOOM (its attention adds the residual itself) fail it, and OPT /
BERT keep their MLP linears directly in the block (no one module to replace): all refused with one line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from importance.arch.canonical import Block, ModelMap
from importance.arch.skipped import BRANCHES, SkippedBranch
from importance.errors import ImpruneError

# the canonical norms that belong to each branch: (input norm, output norm)
_NORMS = {"attn": ("norm.attn_in", "norm.attn_out"), "mlp": ("norm.mlp_in", "norm.mlp_out")}
_OTHER = {"attn": "mlp", "mlp": "attn"}


@dataclass(frozen=True)
class Branch:
    """One residual branch of block ``layer``: ``module`` (path relative to the block), the ``norms`` that go with
    it, ``last`` the module whose output joins the residual stream, and its parameter count."""

    layer: int
    kind: str  # 'attn' | 'mlp'
    module: str
    norms: tuple[str, ...]
    last: str
    params: int

    @property
    def label(self) -> str:
        return f"L{self.layer} {self.kind}"


def first_input(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states a block, branch or norm is called with (positionally or as ``hidden_states``)."""
    return args[0] if args else kwargs["hidden_states"]


def check_branches(mm: ModelMap) -> None:
    """Raise the one-line reason why this model's sub-blocks cannot be removed on their own: no one module per
    branch, or (checked on block 0 with the inputs of a real forward) a block that does not pass its input
    through when both branch outputs are zero (post-norm blocks; BLOOM adds the residual inside its attention)."""
    if not mm.spec.attn or not mm.spec.mlp:
        raise ImpruneError(f"model type '{mm.model_type}' keeps its MLP linears directly in the block (no one MLP "
                           "module to remove); use --method layers or channels")
    mixers = [b.index for b in mm.blocks if "attn" not in b.skipped and not b.n_heads]
    if mixers:  # a hybrid: those blocks' token mixers are not mapped, so no sub-block list is complete
        raise ImpruneError(f"model type '{mm.model_type}' is a hybrid (block {mixers[0]} mixes tokens without "
                           "attention, left unmapped), so its sub-blocks cannot be removed on their own; use "
                           "--method layers, heads or channels")
    from importance.arch.check import _close, _out, capture_calls

    block = mm.blocks[0]
    args, kwargs = capture_calls(mm, {"block": block.module})["block"]
    with contextlib.ExitStack() as stack:
        for kind in BRANCHES:
            if kind not in block.skipped:
                stack.enter_context(zeroed(mm, block_branch(block, mm, kind)))
        with torch.no_grad():
            out = _out(block.module(*args, **kwargs))
    x = first_input(args, kwargs)
    if not _close(out, x):
        raise ImpruneError(f"model type '{mm.model_type}': a block with its attention and MLP outputs zeroed does "
                           "not pass its input through (a post-norm block, or a residual added inside a module), so "
                           "no sub-block can be skipped on its own; use --method layers")


def _relative(block: Block, path: str) -> str:
    return path[len(block.path) + 1:]


def block_branch(block: Block, mm: ModelMap, kind: str) -> Branch:
    """The ``kind`` branch of ``block`` (present, not yet skipped)."""
    path = mm.spec.attn if kind == "attn" else mm.spec.mlp
    module = block.module.get_submodule(path)
    in_name, out_name = _NORMS[kind]
    other_in = _NORMS[_OTHER[kind]][0]
    norms = []
    if in_name in block.components and (other_in in block.components or _OTHER[kind] in block.skipped):
        norms.append(_relative(block, block.components[in_name].path))  # read by this branch alone
    if out_name in block.components:
        norms.append(_relative(block, block.components[out_name].path))
    owned = {id(p): p for m in (module, *(block.module.get_submodule(n) for n in norms)) for p in m.parameters()}
    last = norms[-1] if out_name in block.components else path
    return Branch(block.index, kind, path, tuple(norms), last, sum(p.numel() for p in owned.values()))


def branches(mm: ModelMap) -> list[Branch]:
    """Every branch still present in ``mm``, block by block, attention before MLP."""
    check_branches(mm)
    return [block_branch(b, mm, kind) for b in mm.blocks for kind in BRANCHES if kind not in b.skipped]


def _replace_output(value: torch.Tensor | None):
    def hook(_module: nn.Module, _args: tuple, out: Any) -> Any:
        y = out[0] if isinstance(out, tuple) else out  # [B, T, d]
        new = torch.zeros_like(y) if value is None else torch.zeros_like(y) + value.to(y.dtype)
        return (new, *out[1:]) if isinstance(out, tuple) else new
    return hook


@contextlib.contextmanager
def zeroed(mm: ModelMap, branch: Branch, value: torch.Tensor | None = None) -> Iterator[None]:
    """Inside the context, ``branch`` adds zero to the residual stream (its last module's output is zeros), or the
    constant ``value`` [d] at every token (a compensated removal)."""
    module = mm.blocks[branch.layer].module.get_submodule(branch.last)
    handle = module.register_forward_hook(_replace_output(value))
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def branch_means(model: nn.Module, mm: ModelMap, cands: list[Branch], windows: Any, batch_size: int = 4
                 ) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, kind): [d] float32 mean of the branch's output (what it adds to the residual) over the tokens of
    ``windows`` that attend (padding excluded)}, from one forward of the model as it is."""
    from importance.models.load import input_device

    sums: dict[tuple[int, str], torch.Tensor] = {}
    keep: list[torch.Tensor] = []  # the current batch's attention mask [B, T]
    count = 0

    def record(key: tuple[int, str]):
        def hook(_module: nn.Module, _args: tuple, out: Any) -> None:
            y = (out[0] if isinstance(out, tuple) else out).double()  # [B, T, d]
            s = (y * keep[0][..., None]).sum((0, 1))
            sums[key] = s if key not in sums else sums[key] + s
        return hook

    handles = [mm.blocks[b.layer].module.get_submodule(b.last).register_forward_hook(record((b.layer, b.kind)))
               for b in cands]
    try:
        device = input_device(model)
        for batch in windows.batches(batch_size):
            batch = batch.to(device)
            keep[:] = [batch.attention_mask.to(torch.float64)]
            count += int(batch.attention_mask.sum())
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        for h in handles:
            h.remove()
    return {k: (v / max(count, 1)).float().cpu() for k, v in sums.items()}


StandIn = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # a constant [d], or (weight [d, d_in], bias [d])


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def skip_branch_(mm: ModelMap, branch: Branch, value: StandIn | None = None) -> None:
    """Remove ``branch`` for real: its module becomes a parameter-free ``SkippedBranch`` (one that adds the
    constant ``value`` [d], or ``x W^T + b`` for ``value = (W, b)``, when given), its norms identities. Rebuild
    the map afterwards (``model_map``)."""
    weight, bias = value if isinstance(value, tuple) else (None, value)
    block = mm.blocks[branch.layer].module
    own = block.get_submodule(branch.module)
    layer_idx = next((m.layer_idx for m in own.modules() if isinstance(getattr(m, "layer_idx", None), int)),
                     branch.layer)
    for norm in branch.norms:
        _replace(block, norm, nn.Identity())
    stand_in = SkippedBranch(branch.kind, layer_idx if branch.kind == "attn" else None,
                             None if bias is None else int(bias.numel()),
                             None if weight is None else int(weight.shape[1]))
    if bias is not None:
        ref = next(own.parameters(), None)
        with torch.no_grad():
            stand_in.bias.copy_(bias.reshape(-1))
            if weight is not None:
                stand_in.weight.copy_(weight)
        stand_in.to(device=ref.device if ref is not None else "cpu",
                    dtype=ref.dtype if ref is not None and ref.is_floating_point() else torch.float32)
    _replace(block, branch.module, stand_in)


def skip_recorded_(model: nn.Module, skipped: dict[str, list[str]],
                   widths: dict[str, dict[str, Any]] | None = None) -> None:
    """Replay ``{layer: [kinds]}`` (as ``importance.models.pruned.load_pruned`` reads it from imprune.json) on a
    freshly built model, before its weights are loaded; ``widths`` ({layer: {kind: d or [d, d_in]}}) marks the
    compensated ones (a constant [d], or a linear stand-in [d, d_in] and its bias), whose values the weights
    then load."""
    from importance.arch.canonical import model_map

    mm = model_map(model)
    for layer, kinds in sorted(skipped.items(), key=lambda kv: int(kv[0])):
        for kind in kinds:
            width = ((widths or {}).get(layer) or {}).get(kind)
            value: StandIn | None = None
            if isinstance(width, list):
                value = (torch.zeros(int(width[0]), int(width[1])), torch.zeros(int(width[0])))
            elif width is not None:
                value = torch.zeros(int(width))
            skip_branch_(mm, block_branch(mm.blocks[int(layer)], mm, kind), value)
            mm = model_map(model)


def skipped_record(mm: ModelMap) -> dict[str, list[str]]:
    """``{layer: [kinds]}`` of the removed branches (empty when none is)."""
    return {str(b.index): list(b.skipped) for b in mm.blocks if b.skipped}


def compensated_record(mm: ModelMap) -> dict[str, dict[str, Any]]:
    """``{layer: {kind: d}}`` of the removed branches that add a constant, ``[d, d_in]`` for a linear stand-in
    (empty when none does)."""
    path = {"attn": mm.spec.attn, "mlp": mm.spec.mlp}
    rec: dict[str, dict[str, int]] = {}
    for b in mm.blocks:
        for kind in b.skipped:
            stand_in = b.module.get_submodule(path[kind])
            if getattr(stand_in, "weight", None) is not None:
                rec.setdefault(str(b.index), {})[kind] = [int(n) for n in stand_in.weight.shape]
            elif getattr(stand_in, "bias", None) is not None:
                rec.setdefault(str(b.index), {})[kind] = int(stand_in.bias.numel())
    return rec
