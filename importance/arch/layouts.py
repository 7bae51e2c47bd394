"""Row layouts of fused projections and the token-mixer test of hybrids, for the canonical map.

``_fused_rows`` says which output rows of a fused module are one canonical component (see ``canonical.Fused``
for the layouts), ``_mla_dims`` / ``_mla_rows`` the per-head widths and ``kv_b_proj`` rows of multi-head latent
attention, and ``token_mixer`` whether a module in a block's attention slot mixes tokens without softmax
attention (linear attention, state-space or convolutional mixers of hybrid models), ``attention_absent`` whether
a hybrid's block has no softmax attention at all.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from importance.errors import ImpruneError


def _fused_rows(layout: str, part: int, out_total: int, head_dim: int, n_heads: int) -> slice | torch.Tensor:
    if layout == "halves":
        half = out_total // 2
        return slice(part * half, (part + 1) * half)
    if layout == "qkv":
        q = n_heads * head_dim
        kv = (out_total - q) // 2
        return [slice(0, q), slice(q, q + kv), slice(q + kv, q + 2 * kv)][part]
    if layout in ("qkv_heads", "q_gate_heads"):
        k = 3 if layout == "qkv_heads" else 2
        n = out_total // (k * head_dim)
        return (torch.arange(n).view(n, 1) * k * head_dim + part * head_dim + torch.arange(head_dim)).flatten()
    if layout == "qvk_mp4":  # 4 shards of [q | v | k], each a quarter of the heads
        quarter = out_total // 12
        offset = (0, 2, 1)[part] * quarter  # q, k, v -> position in the shard
        return (torch.arange(4).view(4, 1) * 3 * quarter + offset + torch.arange(quarter)).flatten()
    if layout == "qkv_grouped":  # per KV group: g query heads, then its k and its v head
        kv = (out_total // head_dim - n_heads) // 2
        g = n_heads // max(kv, 1)
        start = torch.arange(kv).view(kv, 1) * (g + 2)
        heads = start + (torch.arange(g) if part == 0 else torch.tensor([g + part - 1]))  # [kv, g or 1]
        return (heads.reshape(-1, 1) * head_dim + torch.arange(head_dim)).flatten()
    raise ImpruneError(f"unknown fused layout '{layout}'")


def _mla_dims(config: object) -> dict[str, int]:
    """MLA's per-head widths: q = qk_nope + qk_rope (the rope part of k is shared, from kv_a), k = qk_nope,
    v = o = v_head_dim."""
    nope, rope, v = (int(getattr(config, k)) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    return {"attn.q": nope + rope, "attn.k": nope, "attn.v": v, "attn.o": v}


def _mla_rows(part: int, out_total: int, dims: dict[str, int]) -> torch.Tensor:
    """Rows of ``kv_b_proj`` [H * (nope + v), r] that are k_nope (part 0) or v (part 1), head by head."""
    nope, v = dims["attn.k"], dims["attn.v"]
    n = out_total // (nope + v)
    start, width = (0, nope) if part == 0 else (nope, v)
    return (torch.arange(n).view(n, 1) * (nope + v) + start + torch.arange(width)).flatten()


_LINEAR_MIXER = re.compile(r"linear|delta|mamba|ssm|rwkv|retention|lightning|recurren", re.IGNORECASE)


def token_mixer(block: nn.Module, path: str) -> bool:
    """Whether the module at ``path`` of ``block`` mixes tokens without softmax attention (linear attention, a
    state-space or convolutional mixer: a short causal conv1d inside, or such a class name), though its
    projections may be named like attention's."""
    try:
        mod = block.get_submodule(path) if path else None
    except AttributeError:
        mod = None
    if mod is None or mod is block:
        return False
    if any(isinstance(m, nn.Conv1d) for m in mod.modules()):
        return True
    words, family = (re.findall(r"[A-Z][a-z0-9_]*|[a-z0-9_]+", type(m).__name__) for m in (mod, block))
    while words and family and words[0] == family[0]:  # the model's own name ('KimiLinear...') says nothing
        words, family = words[1:], family[1:]
    return bool(_LINEAR_MIXER.search("".join(words)))


def attention_absent(block: nn.Module, spec: Any) -> bool:
    """A hybrid's block without softmax attention: none of the mapped attention modules, or a token mixer in the
    attention's place (``ArchSpec.optional_attn``)."""
    if not spec.optional_attn:
        return False
    paths = {getattr(e, "path", e) for k, e in spec.linears.items() if k.startswith("attn.")}  # Fused or a path
    return token_mixer(block, spec.attn) or not any(_linear_at(block, p) for p in paths)


def _linear_at(block: nn.Module, path: str) -> bool:
    try:
        mod = block.get_submodule(path)
    except AttributeError:
        return False
    return isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 4] -> '0-2, 4'."""
    out: list[str] = []
    for i in ids:
        if out and int(out[-1].split("-")[-1]) == i - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ", ".join(out)
