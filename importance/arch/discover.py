"""Generic discovery for model types with no registered map: repeated blocks and linears by well-known names.

``discover(model)`` returns an ``ArchSpec`` (fused [q|k|v] and gate|up modules read as plain blocks of rows,
stacked experts with their router, the attention / MLP module paths) or raises one line naming
``register_arch``. Nothing here is trusted: ``importance.arch.check`` proves the map against the model before
anything uses it, and ``pruning.methods.surgery.trial_cut`` before any head or channel of it is cut.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from importance.arch.canonical import SIDE_MODULES, ArchSpec, Fused, _get, _is_linear
from importance.arch.layouts import token_mixer
from importance.errors import ImpruneError

_W = r"(\.linear)?$"  # a projection may be a wrapper holding its nn.Linear as `.linear` (Moshi, Inkling)
_PATTERNS = {  # canonical -> module-name regex (full path in the block), for unregistered model types
    "attn.q": r"(q_proj|query|wq|Wq|to_q|project_q)" + _W, "attn.k": r"(k_proj|key|wk|Wk|to_k|project_k)" + _W,
    "attn.v": r"(v_proj|value|wv|Wv|to_v|project_v)" + _W,
    "attn.o": r"(attn|attention|self_attn|mixer)\.(o_proj|out_proj|dense|c_proj|wo|Wo|to_out|attention_out)" + _W
              + r"|attention\.output\.dense$",
    "mlp.gate": r"(^|\.)(gate_proj|w1|w_in\.w_0)$",  # CPM-Ant's w_in.w_0 / w_in.w_1 / w_out
    "mlp.up": r"(^|\.)(up_proj|w3|fc1|c_fc|dense_h_to_4h|fc_in|intermediate\.dense|w_in\.w_1|ffn\.0)$",
    "mlp.down": r"(down_proj|w2|fc2|dense_4h_to_h|fc_out|mlp\.c_proj|w_out|mlp\.Wo|ffn\.2)$|^output\.dense$",
}  # (CTRL: Wq / Wk / Wv / dense and an nn.Sequential ffn.0 / ffn.2; ModernBERT: Wqkv / Wo, mlp.Wi / mlp.Wo)
_FUSED = r"(qkv_proj|query_key_value|c_attn|wqkv|qkv|Wqkv)$"
_FUSED_GATE_UP = r"(^|\.)(gate_up_proj|gate_up|w13|Wi)$"  # rows [gate | up], proven by the functional check
_NORM_PATTERNS = {"norm.attn_in": r"^(input_layernorm|ln_1|attention_norm|self_attn_layer_norm)$",
                  "norm.mlp_in": r"^(post_attention_layernorm|ln_2|ffn_norm|final_layer_norm)$"}

# with a norm after the MLP (Gemma-2/3, OLMo-2 style), post_attention_layernorm is the attention's output norm
_POST_NORM_PATTERNS = {"norm.attn_in": r"^input_layernorm$", "norm.attn_out": r"^post_attention_layernorm$",
                       "norm.mlp_in": r"^pre_feedforward_layernorm$", "norm.mlp_out": r"^post_feedforward_layernorm$"}


def _block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Candidate block lists: one entry per layer (blocks of several classes allowed: hybrids with an attention
    and a linear-attention decoder layer), else lists of one class."""
    cfg = model.config
    n_layers = getattr(cfg, "num_hidden_layers", None)
    if n_layers is None and hasattr(cfg, "get_text_config"):  # a composite (vision + text): its language model's
        n_layers = getattr(cfg.get_text_config(), "num_hidden_layers", None)
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    per_layer = [x for x in lists if n_layers is not None and len(x[1]) == n_layers]
    return per_layer or [x for x in lists if len({type(c) for c in x[1]}) == 1]


def _match(linears: dict[str, nn.Module]) -> dict[str, str | Fused]:
    """Canonical names of one block's linears by the well-known patterns (MLA and fused q|k|v only where no plain
    q / k / v is found)."""
    found: dict[str, str | Fused] = {}
    for canon, pat in _PATTERNS.items():
        hits = [n for n in linears if re.search(pat, n) and not re.search(SIDE_MODULES, n)
                and not re.search(_FUSED, n)]  # 'query_key_value' / 'qkv_proj' end like a value / v_proj
        if len(hits) > 1:  # decoders with cross-attention (unused in a causal LM): the self-attention's
            hits = [n for n in hits if not re.search(r"encoder_attn|cross", n, re.IGNORECASE)]
        if len(hits) > 1 and canon.startswith("mlp."):  # an attention output gate named gate_proj (afmoe, beam)
            hits = [n for n in hits if not re.search(r"(^|\.)\w*(attn|attention)\w*\.", n)]
        if len(hits) == 1:
            found[canon] = hits[0]
    mla = _mla(linears)
    if mla and not {"attn.k", "attn.v"} & set(found):  # MLA's q_proj is named like a plain q
        found.update(mla)
    return found


_ATTN_KIND = re.compile(r"attention|attn", re.IGNORECASE)


def _attention_block(blist: nn.ModuleList) -> int:
    """The first block with softmax attention (q, k, v and o, or a fused q|k|v, found by name and not inside a
    linear-attention / state-space mixer); 0 where none has (the refusals below then name block 0)."""
    for i, block in enumerate(blist):
        linears = {n: m for n, m in block.named_modules() if _is_linear(m)}
        found = _match(linears)
        fused = [n for n in linears if re.search(_FUSED, n)]
        q = found.get("attn.q") or (fused[0] if len(fused) == 1 else None)
        if q is None or "attn.o" not in found:
            continue
        qpath = q.path if isinstance(q, Fused) else q
        parent = parent_path({"q": qpath, "o": found["attn.o"]}, "q", "o")
        kinds = [type(m).__name__ for m in (_get(block, parent) if parent else block).modules()]
        if not token_mixer(block, parent) and any(_ATTN_KIND.search(k) and "Rwkv" not in k for k in kinds):
            return i
    return 0


def discover(model: nn.Module) -> ArchSpec:
    """Find the repeated blocks and their linears by well-known names, or raise a one-line error.

    Hybrids (blocks of softmax attention among linear-attention / state-space / conv blocks) are read from their
    first attention block; the other blocks' token mixers are left unmapped (``ArchSpec.optional_attn``)."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    lists = _block_lists(model)
    how = f"register a mapping for '{model_type}' with importance.arch.register_arch(...)(ArchSpec(...))"
    if not lists:
        raise ImpruneError(f"model type '{model_type}' has no registered map and no repeated blocks were found; "
                           + how)
    bname, blist = max(lists, key=lambda x: sum(p.numel() for p in x[1].parameters()))
    twins = [n for n, m in lists if m is not blist and {type(c) for c in m} == {type(c) for c in blist}]
    if twins:  # HRM: a low- and a high-level stack of the same layers
        raise ImpruneError(f"model type '{model_type}' has several stacks of the same blocks ({bname}, "
                           f"{', '.join(twins)}); imprune maps one block list per model: " + how)
    ref = _attention_block(blist)
    ref_block = blist[ref]
    linears = {n: m for n, m in ref_block.named_modules() if _is_linear(m)}
    found = _match(linears)
    mla = {k: v for k, v in found.items() if isinstance(v, Fused) and v.layout == "mla_kv"}
    fused = [n for n in linears if re.search(_FUSED, n)]
    if len(fused) == 1 and not {"attn.q", "attn.k", "attn.v"} & set(found):  # try [q | k | v]; the check decides
        found.update({name: Fused(fused[0], "qkv", i) for i, name in enumerate(("attn.q", "attn.k", "attn.v"))})
    elif fused and "attn.q" not in found:
        raise ImpruneError(f"model type '{model_type}' has a fused attention projection of unknown layout; " + how)
    found.update(_gated_q(found, linears))
    gate_up = [n for n in linears if re.search(_FUSED_GATE_UP, n)]
    if len(gate_up) == 1 and not {"mlp.gate", "mlp.up"} & set(found):
        found.update({"mlp.gate": Fused(gate_up[0], "halves", 0), "mlp.up": Fused(gate_up[0], "halves", 1)})
    up, down = found.get("mlp.up"), found.get("mlp.down")
    if "mlp.gate" not in found and isinstance(up, str) and isinstance(down, str) and \
            _out_rows(linears[up]) == 2 * _in_cols(linears[down]):  # an fc1 computing [gate | up] (Moshi)
        found.update({"mlp.gate": Fused(up, "halves", 0), "mlp.up": Fused(up, "halves", 1)})
    kinds = {type(m).__name__ for m in ref_block.modules()}
    if not any(_ATTN_KIND.search(k) and "Rwkv" not in k for k in kinds):
        raise ImpruneError(f"model type '{model_type}' has no attention layers (its blocks mix tokens with "
                           f"{', '.join(sorted({n.split('.')[0] for n in linears})) or 'no linear'} modules); "
                           "imprune maps attention + MLP blocks only: " + how)
    # stacked experts: in the first block that has them (dense MLP layers may come first)
    experts, router = next(((e, r) for e, r in map(_stacked_experts, blist) if e), (None, None))
    attn_found = {"attn.q", "attn.k", "attn.v", "attn.o"} <= set(found)
    attn_path = parent_path(found, "attn.q", "attn.o") if attn_found else ""
    attn_paths = {(e.path if isinstance(e, Fused) else e) for k, e in found.items() if k.startswith("attn.")}
    absent = [i for i, b in enumerate(blist) if token_mixer(b, attn_path) or
              not any(_is_linear(_get(b, p)) for p in attn_paths)]
    hybrid = bool(absent) and attn_found and not token_mixer(ref_block, attn_path)
    # an MLP-less attention block of a hybrid (nemotron_h: attention, mamba and MLP blocks of one mixer each)
    attn_only = hybrid and set(linears) <= attn_paths
    if not attn_found or ("mlp.down" not in found and not experts and not attn_only):
        raise ImpruneError(f"model type '{model_type}': could not recognise attention and MLP linears among "
                           f"{sorted(linears)}; " + how)
    norms = {}
    children = {n for n, m in ref_block.named_children() if hasattr(m, "weight")}
    for canon, pat in (_POST_NORM_PATTERNS if "post_feedforward_layernorm" in children else _NORM_PATTERNS).items():
        hits = [n for n in children if re.search(pat, n)]
        if len(hits) == 1:
            norms[canon] = hits[0]
    for canon, child in (("norm.q", "q_norm"), ("norm.k", "k_norm")):  # qwen3 (per head) / olmo2 (full width)
        path = f"{attn_path}.{child}" if attn_path else child
        if isinstance(getattr(_get(ref_block, path), "weight", None), torch.Tensor):
            norms[canon] = path
    prefix = bname.split(".")[-1] if "." not in bname else ".".join(bname.split(".")[-2:])

    attn = attn_path
    for i, block in enumerate(blist):
        if i in absent and hybrid:
            continue  # a linear-attention / state-space block: its token mixer is left unmapped
        if not all(_is_linear(_get(block, p)) for p in attn_paths):  # attention layouts differ across blocks
            kinds = sorted({type(_get(b, attn) if attn else b).__name__ for b in blist})
            raise ImpruneError(f"model type '{model_type}' mixes attention layouts across its blocks ("
                               f"{', '.join(kinds)}; block {i} lacks {sorted(attn_paths)[0]}); imprune maps one "
                               "attention layout per model: " + how)
    mlp = parent_path(found, "mlp.up", "mlp.down") if {"mlp.up", "mlp.down"} <= set(found) else ""
    # heads / channels are cut only where pruning.methods.surgery.trial_cut proves a cut on a copy of block 0
    if mla:
        for canon, child in (("norm.q_a", "q_a_layernorm"), ("norm.kv_a", "kv_a_layernorm")):
            if isinstance(getattr(_get(ref_block, f"{attn}.{child}"), "weight", None), torch.Tensor):
                norms[canon] = f"{attn}.{child}"
    return ArchSpec(prefix, found, norms, gqa=not mla, attn=attn, mlp=mlp, optional_norms=tuple(norms),
                    optional_mlp=True, experts=experts, router=router, mla=bool(mla), optional_attn=hybrid)


def _mla(linears: dict[str, nn.Module]) -> dict[str, str | Fused]:
    """DeepSeek-V2/V3-style multi-head latent attention: q (q_proj, or q_b_proj after the low-rank q_a_proj),
    k_nope and v per head from ``kv_b_proj`` (rows per head [k_nope | v]), the shared ``kv_a_proj_with_mqa``
    and ``o_proj``; {} where the block has none."""
    kv_b = [n for n in linears if n.endswith("kv_b_proj")]
    if len(kv_b) != 1:
        return {}
    p = kv_b[0][: -len("kv_b_proj")]
    q = next((f"{p}{n}" for n in ("q_b_proj", "q_proj") if f"{p}{n}" in linears), None)
    if q is None or f"{p}o_proj" not in linears or f"{p}kv_a_proj_with_mqa" not in linears:
        return {}
    out: dict[str, str | Fused] = {"attn.q": q, "attn.k": Fused(kv_b[0], "mla_kv", 0),
                                   "attn.v": Fused(kv_b[0], "mla_kv", 1), "attn.o": f"{p}o_proj",
                                   "attn.kv_a": f"{p}kv_a_proj_with_mqa"}
    if f"{p}q_a_proj" in linears:
        out["attn.q_a"] = f"{p}q_a_proj"
    return out


def _gated_q(found: dict[str, str | Fused], linears: dict[str, nn.Module]) -> dict[str, Fused]:
    """A q projection twice as wide as the heads (o's input) computes per head [q_h | gate_h] (Qwen3.5 / Qwen3-Next
    gated attention), or a ``gate_proj`` of the heads' width sits beside q (AFMoE, Beam: one gate row per head
    channel); the functional check proves the rows (``importance.arch.check.check_gate``)."""
    q, o = found.get("attn.q"), found.get("attn.o")
    if not isinstance(q, str) or not isinstance(o, str) or not _is_linear(linears.get(q)):
        return {}
    width = linears[o].weight.shape[1]
    if linears[q].weight.shape[0] == 2 * width:  # (the heads' count may have been pruned)
        return {"attn.q": Fused(q, "q_gate_heads", 0), "attn.gate": Fused(q, "q_gate_heads", 1)}
    attn = parent_path({"q": q, "o": o}, "q", "o")  # a gate module of the heads' width beside q (afmoe, beam)
    gates = [n for n, m in linears.items() if n.rpartition(".")[0] == attn and re.search(r"(gate_proj|g_proj)$", n)
             and m.weight.shape[0] == width]
    return {"attn.gate": gates[0]} if len(gates) == 1 else {}


def _out_rows(m: nn.Module) -> int:
    return int(m.weight.shape[1] if type(m).__name__ == "Conv1D" else m.weight.shape[0])


def _in_cols(m: nn.Module) -> int:
    return int(m.weight.shape[0] if type(m).__name__ == "Conv1D" else m.weight.shape[1])


def parent_path(found: dict[str, str | Fused], *canon: str) -> str:
    """The deepest module holding all of ``canon``'s modules ('' = the block)."""
    paths = [(e.path if isinstance(e, Fused) else e).split(".")[:-1] for e in (found[c] for c in canon)]
    common: list[str] = []
    for parts in zip(*paths, strict=False):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _stacked_experts(block: nn.Module) -> tuple[str | None, str | None]:
    """The path of a module holding stacked 3-D ``gate_up_proj`` / ``down_proj`` experts, and of its router (a
    sibling ``gate`` / ``router`` with an [E, H] weight); the functional check proves them."""
    for name, mod in block.named_modules():
        gu, down = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
        if isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == down.dim() == 3:
            parent = name.rpartition(".")[0]
            for r in ("gate", "router"):
                w = getattr(_get(block, f"{parent}.{r}" if parent else r), "weight", None)
                if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == gu.shape[0]:
                    return name, f"{parent}.{r}" if parent else r
            return name, None
    return None, None
