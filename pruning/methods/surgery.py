"""Shape surgery: physically remove heads, KV groups, MLP channels and whole blocks from a model.

Everything goes through the canonical view (``importance.arch.canonical``): a component's ``rows`` say which output
rows of its module it owns (a slice of a fused q|k|v or gate|up projection, GPT-NeoX's interleaved rows)
and ``transposed`` marks GPT-2's Conv1D, so one function cuts every layout. All cuts of one module are
gathered first and applied at once (a fused module is cut once for q, k and v together); then the
attention is told its new head counts (``arch_edit.set_attention_heads``). Also here: the exact parameter
arithmetic of a cut (``head_params``, ``channel_params``), block removal with its config check, the
calibration means and bias folding of bias compensation, and ``resize_params_`` / ``config_shapes`` that
``pruning.io`` uses to record and rebuild shapes a config cannot describe (on meta tensors).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from importance.arch.canonical import Block, Component, ModelMap
from importance.arch.edit import config_shapes, drop_layers_config, renumber_block, set_attention_heads
from importance.data.sources import Windows
from importance.errors import ImpruneError


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def out_size(module: nn.Module) -> int:
    w = module.weight
    return int(w.shape[0] if w.dim() == 1 else w.shape[1] if _is_conv1d(module) else w.shape[0])


def in_size(module: nn.Module) -> int:
    w = module.weight
    return int(w.shape[0] if _is_conv1d(module) else w.shape[1])


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.contiguous(), requires_grad=like.requires_grad)


@torch.no_grad()
def shrink_(module: nn.Module, keep_out: torch.Tensor | None = None, keep_in: torch.Tensor | None = None) -> None:
    """Keep only output rows ``keep_out`` / input columns ``keep_in`` (module coordinates) of a Linear, a
    Conv1D (stored [in, out]) or a 1-D norm weight (``keep_out`` indexes it); bias and size attributes follow."""
    w = module.weight
    if w.dim() == 1:  # norm over a projection's full width (olmo2 q_norm / k_norm)
        if keep_out is not None:
            module.weight = _param(w[keep_out.to(w.device)], w)
            if getattr(module, "bias", None) is not None:
                module.bias = _param(module.bias[keep_out.to(w.device)], module.bias)
            if isinstance(getattr(module, "normalized_shape", None), tuple):
                module.normalized_shape = (len(keep_out),)
        return
    conv = _is_conv1d(module)
    out_dim, in_dim = (1, 0) if conv else (0, 1)
    if keep_out is not None:
        w = w.index_select(out_dim, keep_out.to(w.device))
        if getattr(module, "bias", None) is not None:
            module.bias = _param(module.bias[keep_out.to(w.device)], module.bias)
    if keep_in is not None:
        w = w.index_select(in_dim, keep_in.to(w.device))
    module.weight = _param(w, module.weight)
    if conv:
        module.nf = int(w.shape[1])
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = int(w.shape[0]), int(w.shape[1])


def module_rows(comp: Component, local: torch.Tensor) -> torch.Tensor:
    """Output rows of ``comp``'s module for the component's own rows ``local`` (through fused slices)."""
    if comp.rows is None:
        return local
    return torch.arange(out_size(comp.module))[comp.rows][local]


def _head_rows(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    return (torch.tensor(sorted(heads), dtype=torch.long).view(-1, 1) * head_dim + torch.arange(head_dim)).flatten()


def check_heads(block: Block, heads: Sequence[int], kv_heads: Sequence[int]) -> tuple[int, int]:
    """Validate a head removal for GQA; returns the kept (query heads, KV heads).

    Valid: every removed KV head takes all of its query heads with it, and every remaining KV group keeps
    the same number of query heads (>= 1), so query head i still reads KV head i // group size.
    """
    h, kv = block.n_heads, block.n_kv_heads
    if h == 0 or kv == 0:
        raise ImpruneError(f"layer {block.index} has no attention heads to remove")
    g = h // kv
    heads_set, kv_set = set(heads), set(kv_heads)
    if not heads_set <= set(range(h)) or not kv_set <= set(range(kv)):
        raise ImpruneError(f"layer {block.index}: head ids out of range ({h} heads, {kv} KV heads)")
    kept_per_group = [sum(1 for q in range(j * g, (j + 1) * g) if q not in heads_set) for j in range(kv)]
    for j in kv_set:
        if kept_per_group[j]:
            raise ImpruneError(f"layer {block.index}: KV head {j} removed but {kept_per_group[j]} of its query "
                               "heads kept; remove a whole KV group with all its query heads")
    left = {kept_per_group[j] for j in range(kv) if j not in kv_set}
    if len(left) != 1 or 0 in left:
        raise ImpruneError(f"layer {block.index}: removing heads {sorted(heads_set)} leaves KV groups with "
                           f"{sorted(left)} query heads; every group must keep the same number (>= 1)")
    return h - len(heads_set), kv - len(kv_set)


def full_width_norms(block: Block) -> dict[str, str]:
    """Norms over a whole q / k projection (olmo2), which lose rows with their heads: {norm: projection}.
    Norms over one head_dim (qwen3, gemma3) are shared by all heads and stay."""
    c = block.components
    return {norm: proj for norm, proj in (("norm.q", "attn.q"), ("norm.k", "attn.k"))
            if norm in c and proj in c and c[norm].numel == c[proj].shape[0] != block.head_dim}


def row_params(block: Block, name: str) -> int:
    """Parameters in one output row of a component (its input width + its bias element; 1 (+1) for a norm)."""
    comp = block.components[name]
    width = 1 if comp.kind == "norm" else comp.shape[1]
    return width + (comp.bias is not None)


def head_params(block: Block) -> tuple[int, int]:
    """(parameters of one query head: q rows + o columns (+ full-width q_norm), of one KV head: k + v rows)."""
    c = block.components
    dq, do, dk, dv = (c[n].head_dim for n in ("attn.q", "attn.o", "attn.k", "attn.v"))  # MLA's differ
    q = dq * row_params(block, "attn.q") + do * c["attn.o"].shape[0]
    q += dq * row_params(block, "attn.gate") if "attn.gate" in c else 0
    kv = dk * row_params(block, "attn.k") + dv * row_params(block, "attn.v")
    for norm, proj in full_width_norms(block).items():
        if proj == "attn.q":
            q += dq * row_params(block, norm)
        else:
            kv += dk * row_params(block, norm)
    return q, kv


def channel_params(block: Block) -> int:
    c = block.components
    gate = row_params(block, "mlp.gate") if "mlp.gate" in c else 0
    return gate + row_params(block, "mlp.up") + c["mlp.down"].shape[0]


def cut_block(mm: ModelMap, layer: int, heads: Sequence[int] = (), kv_heads: Sequence[int] = (),
              channels: Sequence[int] = ()) -> None:
    """Remove query ``heads`` (their q rows and o columns), ``kv_heads`` (k/v rows; models without GQA pass
    the same ids as ``heads``) and MLP ``channels`` (gate/up rows, down columns) from block ``layer``.

    Norms over a projection's full width (olmo2's q_norm/k_norm) are cut with it; per-head_dim norms
    (qwen3, gemma3) stay. The ``ModelMap`` is stale afterwards: rebuild it.
    """
    block = mm.blocks[layer]
    c = block.components
    d = block.head_dim
    if not mm.spec.gqa and set(heads) != set(kv_heads):
        raise ImpruneError(f"layer {layer}: this architecture has no GQA; pass the same ids as heads and KV heads")
    kept_h, kept_kv = check_heads(block, heads, kv_heads) if (heads or kv_heads) else (block.n_heads,
                                                                                         block.n_kv_heads)
    if channels and ("mlp.up" not in c or "mlp.down" not in c):
        raise ImpruneError(f"layer {layer} has no dense MLP channels to remove (MoE experts are not cut)")
    if channels and not set(channels) <= set(range(block.intermediate)):
        raise ImpruneError(f"layer {layer}: channel ids out of range ({block.intermediate} channels)")
    if channels and len(set(channels)) >= block.intermediate:
        raise ImpruneError(f"layer {layer}: cannot remove every MLP channel; keep at least one")
    def head_rows(ids: Sequence[int], name: str) -> torch.Tensor | None:  # per-component widths (MLA's differ)
        return _head_rows(ids, c[name].head_dim if name in c else d) if ids else None

    ch = torch.tensor(sorted(set(channels)), dtype=torch.long) if channels else None
    cuts: dict[int, tuple[nn.Module, set[int], set[int]]] = {}

    def cut(comp: Component | None, local: torch.Tensor | None, side: str) -> None:
        if comp is None or local is None:
            return
        entry = cuts.setdefault(id(comp.module), (comp.module, set(), set()))
        entry[1 if side == "out" else 2].update((module_rows(comp, local) if side == "out" else local).tolist())

    cut(c.get("attn.q"), head_rows(heads, "attn.q"), "out")
    cut(c.get("attn.gate"), head_rows(heads, "attn.gate"), "out")
    cut(c.get("attn.o"), head_rows(heads, "attn.o"), "in")
    cut(c.get("attn.k"), head_rows(kv_heads, "attn.k"), "out")
    cut(c.get("attn.v"), head_rows(kv_heads, "attn.v"), "out")
    for norm, proj in full_width_norms(block).items():
        cut(c[norm], head_rows(heads if proj == "attn.q" else kv_heads, proj), "out")
    for name in ("mlp.gate", "mlp.up"):
        cut(c.get(name), ch, "out")
    cut(c.get("mlp.down"), ch, "in")
    for module, drop_out, drop_in in cuts.values():
        keep_out = _complement(drop_out, out_size(module)) if drop_out else None
        keep_in = _complement(drop_in, in_size(module)) if drop_in else None
        shrink_(module, keep_out, keep_in)
    if heads:
        _cut_per_head_params(block, mm.spec.attn, _complement(set(heads), block.n_heads))
    if heads or kv_heads:
        set_attention_heads(block, mm.spec, mm.model.config, kept_h, kept_kv)


@torch.no_grad()
def _cut_per_head_params(block: Block, attn_path: str, keep: torch.Tensor) -> None:
    """The attention's own per-query-head vectors ([H], e.g. gpt_oss's softmax ``sinks``) keep ``keep``."""
    attn = block.module.get_submodule(attn_path) if attn_path else None
    for name, p in list(attn.named_parameters(recurse=False)) if attn is not None else []:
        if p.dim() == 1 and p.numel() == block.n_heads != block.head_dim:
            setattr(attn, name, _param(p[keep.to(p.device)], p))


def _complement(drop: set[int], size: int) -> torch.Tensor:
    return torch.tensor([i for i in range(size) if i not in drop], dtype=torch.long)


@torch.no_grad()
def fold_bias_(module: nn.Module, delta: torch.Tensor) -> None:
    """Add ``delta`` [out] to the module's bias, creating a zero bias first where it has none."""
    w = module.weight
    if getattr(module, "bias", None) is None:
        module.bias = nn.Parameter(torch.zeros(out_size(module), dtype=w.dtype, device=w.device),
                                   requires_grad=w.requires_grad)
    module.bias += delta.to(module.bias.dtype).to(module.bias.device)


def check_drop_config(mm: ModelMap, keep: list[int]) -> None:
    """Before touching the model: the updated config must describe the remaining blocks' structure."""
    cfg = copy.deepcopy(mm.model.config)
    drop_layers_config(cfg, keep)
    expected = set(config_shapes(mm.model, cfg))
    prefix = mm.blocks_path + "."
    new_index = {old: new for new, old in enumerate(keep)}
    actual = set()
    for name, _ in mm.model.named_parameters(remove_duplicate=False):
        if name.startswith(prefix):
            idx, rest = name[len(prefix):].split(".", 1)
            if int(idx) in new_index:
                actual.add(f"{prefix}{new_index[int(idx)]}.{rest}")
        else:
            actual.add(name)
    if expected != actual:
        diff = sorted(expected ^ actual)[:3]
        raise ImpruneError(f"model type '{mm.model_type}': its config cannot describe the remaining layers "
                           f"(differs at {', '.join(diff)}); layer removal is not supported for it")


def drop_blocks(mm: ModelMap, keep: Sequence[int]) -> list[str]:
    """Keep only blocks ``keep`` (ascending old indices): the block list, each kept block's ``layer_idx``
    (its KV-cache slot) and the config (layer count, per-layer type lists) follow. Returns config fields changed."""
    keep = sorted(set(keep))
    if not keep:
        raise ImpruneError("cannot remove every layer; keep at least one")
    check_drop_config(mm, keep)
    blocks = mm.model.get_submodule(mm.blocks_path)
    kept = [blocks[i] for i in keep]
    for new, module in enumerate(kept):
        renumber_block(module, new)
    parent, _, name = mm.blocks_path.rpartition(".")
    (mm.model.get_submodule(parent) if parent else mm.model).__setattr__(name, nn.ModuleList(kept))
    return drop_layers_config(mm.model.config, keep)


def param_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def add_missing_params_(model: Any) -> list[str]:
    """Create, as zeros, parameters the config now asks for and the model lacks (the q/k/v and gate/up
    biases that ``attention_bias`` / ``mlp_bias`` add when bias compensation switches them on)."""
    ours = dict(model.named_parameters(remove_duplicate=False))
    added = []
    for name, shape in config_shapes(model).items():
        if name in ours:
            continue
        owner, _, pname = name.rpartition(".")
        module = model.get_submodule(owner)
        w = module.weight
        if pname == "bias" and w.dim() == 2:  # this module's own width, which a pruned layer may have changed
            shape = (out_size(module),)
        setattr(module, pname, nn.Parameter(torch.zeros(shape, dtype=w.dtype, device=w.device),
                                            requires_grad=w.requires_grad))
        added.append(name)
    return added


@torch.no_grad()
def input_means(model: Any, modules: dict[str, nn.Module], windows: Windows,
                batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Mean input vector [in] of each module over the calibration tokens (padding excluded), one forward pass."""
    sums: dict[str, torch.Tensor] = {}
    mask: dict[str, torch.Tensor] = {}

    def hook(key: str):
        def fn(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0][mask["m"]].double()  # [tokens, in]
            sums[key] = sums.get(key, 0) + x.sum(0)
        return fn

    handles = [m.register_forward_pre_hook(hook(k)) for k, m in modules.items()]
    device = next(model.parameters()).device
    count = 0
    try:
        for batch in windows.batches(batch_size):
            b = batch.to(device)
            mask["m"] = b.attention_mask.bool()
            count += int(mask["m"].sum())
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: (v / max(count, 1)).float() for k, v in sums.items()}


def trial_cut(mm: ModelMap, heads: bool, channels: bool) -> None:
    """For a discovered map, before the model itself is touched: cut KV group 0 with its query heads (or query
    head 0 of a single group) and MLP channel 0 from a copy of the first block that has them (block 0 but in
    hybrids), run its attention / MLP on the inputs of a real forward, and compare with the original module whose
    ``attn.o`` / ``mlp.down`` input columns of what was cut are zeroed: the two must agree. One line where they
    do not (the module keeps a width, a head count or per-head parameters somewhere imprune does not know).
    Where q / k norms span all heads (``full_width_norms``, cut with them) the kept heads are normalised over a
    narrower width, as in the registered olmo2: there the cut attention must run and keep its output shape."""
    for want, out in ((heads, "attn.o"), (channels, "mlp.down")):
        block = next((b for b in mm.blocks if out in b.components), None)
        if want and block is not None:
            _trial_cut_block(mm, block, out == "attn.o", out == "mlp.down")


def _trial_cut_block(mm: ModelMap, b0: Block, heads: bool, channels: bool) -> None:
    from importance.arch.canonical import _build_block
    from importance.arch.check import _close, capture_calls

    d = b0.head_dim
    g = b0.n_heads // max(b0.n_kv_heads, 1)
    kv_cut = [0] if b0.n_kv_heads > 1 else []
    head_cut = list(range(g)) if kv_cut else ([0] if b0.n_heads > 1 else [])
    parts = [(p, path, out, cols) for p, want, path, out, cols in (
        ("attention", heads and bool(head_cut), mm.spec.attn, "attn.o", _head_rows(head_cut, b0.components[
            "attn.o"].head_dim if "attn.o" in b0.components else d)),
        ("MLP", channels and b0.intermediate > 1, mm.spec.mlp, "mlp.down", torch.tensor([0])))
        if want and path and out in b0.components]
    if not parts:
        return
    calls = capture_calls(mm, {p: b0.module.get_submodule(path) for p, path, _, _ in parts}, upto=b0.index)
    clone = copy.deepcopy(b0.module)
    block = _build_block(0, b0.path, clone, mm.spec, b0.n_heads, d, mm.model.config)
    trial = ModelMap(mm.model, mm.model_type, mm.spec, mm.blocks_path, [block], mm.discovered)
    try:
        cut_block(trial, 0, heads=head_cut if heads else (), kv_heads=kv_cut if heads else (),
                  channels=[0] if any(p == "MLP" for p, *_ in parts) else ())
    except ImpruneError:
        return  # the real cut raises the same line
    for part, path, out, cols in parts:
        if part not in calls:
            continue
        args, kwargs = calls[part]
        zero = b0.components[out].module.register_forward_pre_hook(
            lambda _m, a, cols=cols: (a[0].index_fill(-1, cols.to(a[0].device), 0), *a[1:]))
        try:
            with torch.no_grad():
                ref = b0.module.get_submodule(path)(*args, **kwargs)
                y = clone.get_submodule(path)(*args, **kwargs)
            y, ref = (y[0] if isinstance(y, tuple) else y), (ref[0] if isinstance(ref, tuple) else ref)
            if part == "attention" and full_width_norms(b0):  # q / k norms over all heads (olmo2, olmoe): the
                if y.shape != ref.shape or not torch.isfinite(y).all():  # kept heads' normalisation changes
                    raise RuntimeError("its output has another shape or is not finite")
            elif not _close(y, ref):
                raise RuntimeError("its output differs from the uncut module's with the cut part zeroed")
        except Exception as err:
            msg = (str(err).strip().splitlines() or [""])[0][:160]
            raise ImpruneError(f"the {part} of discovered model type '{mm.model_type}' cannot be cut: on a copy of "
                               f"block {b0.index}, {type(err).__name__}: {msg}; register a mapping, or prune "
                               "unstructured") from None
        finally:
            zero.remove()
