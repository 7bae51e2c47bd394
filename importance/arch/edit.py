"""Structural edits behind the canonical map: new head counts, per-layer config geometry, dropped layers.

These are the architecture quirks of physically pruned models (which attribute an attention module reads
its head count from, which config lists are per layer), kept next to ``importance.arch.canonical`` so that pruners
(``pruning.methods.surgery``, ``pruning.methods.structured``, ``pruning.io``) never touch module or config names.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from importance.arch.canonical import SIDE_MODULES, ArchSpec, Block, _get
from importance.errors import ImpruneError

# What structural surgery (pruning.methods.surgery / .structured) must know beyond the weights: which module
# attributes and config fields hold head counts, widths and layer indices. Attribute names are the ones
# transformers' attention classes use; only those present on a module are written.
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads")  # GPT-2, OPT (view by num_heads), BERT; MPT
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads")  # phi3, falcon
_WIDTH_ATTRS = ("all_head_size", "split_size", "embed_dim")  # BERT q/k/v, GPT-2 c_attn split, BART-like output
_LAYER_INDEX_LISTS = ("mlp_only_layers",)  # config lists of layer indices (the rest: per-layer lists)


def check_cuttable(spec: ArchSpec, config: Any, heads: bool, channels: bool) -> None:
    """Raise the one-line reason why this architecture's heads / MLP channels cannot be removed structurally."""
    why = None
    if heads:
        why = spec.heads_fixed or ("ALiBi slopes are built from the model's one head count, so heads cannot leave "
                                   "single layers; prune unstructured, N:M, channels or layers"
                                   if getattr(config, "alibi", False) else None)
    if why is None and channels:
        why = spec.channels_fixed
    if why:
        raise ImpruneError(why)


def attention_module(block: Block, spec: ArchSpec) -> nn.Module:
    mod = _get(block.module, spec.attn)
    if mod is None:
        raise ImpruneError(f"block {block.index}: no attention module at '{spec.attn}'; fix ArchSpec.attn")
    return mod


def set_attention_heads(block: Block, spec: ArchSpec, config: Any, n_heads: int, n_kv: int) -> None:
    """Make ``block``'s attention run with ``n_heads`` query and ``n_kv`` KV heads (weights already cut).

    Sets the counts the attention forward reads: ``num_key_value_groups`` (Llama family: repeat_kv / SDPA's
    GQA), GPT-2's ``split_size`` and ``num_heads``, OPT's ``num_heads``, BERT's ``num_attention_heads`` and
    ``all_head_size``; phi3 slices its fused qkv by ``config.num_attention_heads``, so a layer whose counts
    differ from the config gets a ``LayerConfig`` view of it with its own counts.
    """
    attn = attention_module(block, spec)
    for name, m in attn.named_modules():
        if re.search(SIDE_MODULES, name):  # an indexer keeps its own head count
            continue
        for names, value in ((_HEAD_ATTRS, n_heads), (_KV_ATTRS, n_kv), (_WIDTH_ATTRS, n_heads * block.head_dim)):
            for a in names:
                if isinstance(getattr(m, a, None), int):
                    setattr(m, a, value)
        if isinstance(getattr(m, "num_key_value_groups", None), int):
            m.num_key_value_groups = n_heads // max(n_kv, 1)
    if spec.attn_config_heads and spec.config_heads and spec.config_kv_heads:
        same = getattr(config, spec.config_heads) == n_heads and getattr(config, spec.config_kv_heads) == n_kv
        attn.config = config if same else LayerConfig(config, {spec.config_heads: n_heads,
                                                               spec.config_kv_heads: n_kv})


class LayerConfig:
    """A model config seen by one layer with a few fields overridden (its own head counts); everything else,
    the attention implementation included, is read live from the shared config."""

    def __init__(self, base: Any, overrides: dict[str, Any]) -> None:
        self._base, self._overrides = base, dict(overrides)

    def __getattr__(self, name: str) -> Any:
        if name in ("_base", "_overrides"):
            raise AttributeError(name)
        return self._overrides[name] if name in self._overrides else getattr(self._base, name)

    def __deepcopy__(self, memo: dict[int, Any]) -> LayerConfig:
        return LayerConfig(copy.deepcopy(self._base, memo), self._overrides)


def set_config_geometry(config: Any, spec: ArchSpec, head_dim: int, heads: int | None = None,
                        kv_heads: int | None = None, intermediate: int | None = None) -> list[str]:
    """Write counts shared by every layer into the config fields that hold them; return the fields written.

    A count the config cannot hold (GPT-2/OPT/BERT/NeoX head counts fix head_dim; an architecture with no
    intermediate field) is left out: the saved folder then records per-layer shapes for ``load_pruned``.
    """
    written = []
    if heads is not None and spec.config_heads:
        setattr(config, spec.config_heads, int(heads))
        config.head_dim = int(head_dim)  # explicit: it no longer equals hidden_size / heads
        written += [spec.config_heads, "head_dim"]
    if kv_heads is not None and spec.config_heads and spec.config_kv_heads and spec.gqa:
        setattr(config, spec.config_kv_heads, int(kv_heads))
        written.append(spec.config_kv_heads)
    if intermediate is not None and spec.config_intermediate:
        setattr(config, spec.config_intermediate, int(intermediate))
        written.append(spec.config_intermediate)
    return written


def renumber_block(module: nn.Module, index: int) -> None:
    """Give a block (after others were removed) its new position: every ``layer_idx`` (KV-cache slot) in it."""
    for m in module.modules():
        if isinstance(getattr(m, "layer_idx", None), int):
            m.layer_idx = index


def drop_layers_config(config: Any, keep: list[int]) -> list[str]:
    """Update the config for a model that keeps only blocks ``keep`` (old indices, ascending).

    Sets the layer count, slices per-layer lists (``layer_types`` sliding/full patterns, any list field named
    ``*layer*`` with one entry per layer) and renumbers lists of layer indices (``mlp_only_layers``).
    Returns the fields changed.
    """
    n_old = int(config.num_hidden_layers)
    new_index = {old: new for new, old in enumerate(keep)}
    changed = ["num_hidden_layers"]
    for key, value in list(vars(config).items()):
        if not isinstance(value, (list, tuple)) or "layer" not in key:
            continue
        if key in _LAYER_INDEX_LISTS:
            setattr(config, key, [new_index[i] for i in value if i in new_index])
        elif len(value) == n_old:
            setattr(config, key, [value[i] for i in keep])
        else:
            continue
        changed.append(key)
    config.num_hidden_layers = len(keep)
    return changed


def resize_params_(model: nn.Module, shapes: dict[str, Sequence[int]]) -> None:
    """Give named parameters new shapes (empty tensors; for a model about to be loaded): used by
    ``load_pruned``. A missing parameter (e.g. a bias added by bias compensation) is created."""
    for name, shape in shapes.items():
        owner, _, pname = name.rpartition(".")
        module = model.get_submodule(owner)
        old = getattr(module, pname, None)
        like = old if isinstance(old, torch.Tensor) else module.weight
        setattr(module, pname, nn.Parameter(torch.empty(tuple(shape), dtype=like.dtype, device=like.device),
                                            requires_grad=like.requires_grad))
        if pname == "weight":
            _sync_sizes(module)


def _sync_sizes(module: nn.Module) -> None:
    w = module.weight
    if w.dim() == 1 and isinstance(getattr(module, "normalized_shape", None), tuple):
        module.normalized_shape = (int(w.shape[0]),)
    elif type(module).__name__ == "Conv1D":
        module.nf = int(w.shape[1])
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = int(w.shape[0]), int(w.shape[1])


def config_shapes(model: Any, config: Any = None) -> dict[str, tuple[int, ...]]:
    """Parameter shapes that ``type(model)`` builds from ``config`` (default: its own), on the meta device:
    what plain ``from_pretrained`` would create for a saved folder. Tied names are listed too."""
    with torch.device("meta"):
        fresh = type(model)(copy.deepcopy(config if config is not None else model.config))
    return {n: tuple(p.shape) for n, p in fresh.named_parameters(remove_duplicate=False)}
