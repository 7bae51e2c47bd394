"""The canonical view of a transformer: the ONLY place in imprune that knows module names.

``model_map(model)`` returns a ``ModelMap``: its blocks (layers), and in each block the canonical
components ``attn.q attn.k attn.v attn.o mlp.gate mlp.up mlp.down``, the norms ``norm.*``, and for MoE
layers ``mlp.router`` + the stacked expert weights ``mlp.experts.{gate,up,down}`` (and a shared expert).
Each ``Component`` hands out a plain ``[out, in]`` weight (``[E, out, in]`` for stacked experts):
transposed for GPT-2's Conv1D, sliced for fused modules (phi3 ``qkv_proj``/``gate_up_proj``, GPT-2
``c_attn``, GPT-NeoX ``query_key_value`` interleaved per head), so scorers and pruners never see a quirk.

Maps are registered per ``config.model_type`` with paths relative to each block. A model type with no
entry goes through the generic discovery of ``importance.arch.discover`` (repeated blocks + linear modules
with well-known names), said in a warning and proven by ``importance.arch.check``; where that cannot work,
``ImpruneError`` names the model type and ``register_arch``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from importance.arch.experts import expert_layout
from importance.arch.experts import rows as expert_rows
from importance.arch.layouts import _fused_rows, _mla_dims, _mla_rows, _ranges, attention_absent
from importance.arch.skipped import SkippedBranch
from importance.engine.offload import offloaded_weight, write_offloaded_
from importance.errors import ImpruneError

# attn.q_a / attn.kv_a: the low-rank down-projections of multi-head latent attention (DeepSeek-V2/V3's MLA),
# shared by every head, with their norms norm.q_a / norm.kv_a
# attn.gate: a per-head output gate computed by the q projection (Qwen3.5 / Qwen3-Next: o_in = attn * sigmoid(gate))
LINEAR_NAMES = ("attn.q", "attn.k", "attn.v", "attn.o", "attn.gate", "attn.q_a", "attn.kv_a", "mlp.gate", "mlp.up",
                "mlp.down")
NORM_NAMES = ("norm.attn_in", "norm.attn_out", "norm.mlp_in", "norm.mlp_out", "norm.q", "norm.k", "norm.q_a",
              "norm.kv_a")
MOE_NAMES = ("mlp.router", "mlp.experts.gate", "mlp.experts.up", "mlp.experts.down",
             "mlp.shared.gate", "mlp.shared.up", "mlp.shared.down", "mlp.shared.router")
CANONICAL_ORDER = LINEAR_NAMES + MOE_NAMES + NORM_NAMES
# modules inside an attention that are named like its projections but are not its heads: DeepSeek-V3.2's lightning
# indexer (its own small q / k and head count, to pick the tokens attended to), DeepSeek-V4's compressor; left
# unmapped (unscored, unpruned) and untouched by head surgery
SIDE_MODULES = r"(^|\.)(indexer|compressor)(\.|$)"
# how rows / columns of a component map onto the structural groups of its block
GROUPS = ("head", "kv_group", "mlp_channel", "expert")
_OUT_GROUP = {"attn.q": "head", "attn.gate": "head", "attn.k": "kv_group", "attn.v": "kv_group",
              "mlp.gate": "mlp_channel",
              "mlp.up": "mlp_channel"}
_IN_GROUP = {"attn.o": "head", "mlp.down": "mlp_channel"}


@dataclass(frozen=True)
class Fused:
    """A component that is a row slice of a fused module's output.

    ``layout``: 'qkv' = rows [q (H*d) | k (Hkv*d) | v (Hkv*d)]; 'qkv_heads' = per head [q_h | k_h | v_h]
    (GPT-NeoX, BLOOM); 'qkv_grouped' = per KV group [q_1 .. q_g | k | v] (Falcon-40B's new decoder
    architecture; with g = 1 it is 'qkv_heads'); 'q_gate_heads' = per head [q_h | gate_h] (Qwen3.5's gated
    attention); 'qvk_mp4' = CodeGen's four model-parallel shards, each [q_m | v_m | k_m] of a quarter of the
    heads; 'halves' = rows [gate | up]; 'mla_kv' = MLA's ``kv_b_proj``,
    per head [k_nope (qk_nope_head_dim) | v (v_head_dim)]. ``part`` is this piece's index.
    """

    path: str
    layout: str
    part: int


@dataclass(frozen=True)
class ArchSpec:
    """Paths relative to one block; a value in ``linears`` is a path or a ``Fused`` slice."""

    blocks: str
    linears: dict[str, str | Fused]
    norms: dict[str, str | tuple[str, ...]] = field(default_factory=dict)  # a tuple: alternative paths
    experts: str | None = None  # module with 3-D ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]
    router: str | None = None
    shared: dict[str, str] = field(default_factory=dict)  # canonical mlp.shared.* -> path
    gqa: bool = True  # False: the config's num_key_value_heads is ignored by the model (all MHA)
    attn: str = "self_attn"  # attention and MLP module paths, for structural surgery
    mlp: str = "mlp"
    final_norm: str | None = "model.norm"
    # structural surgery: config fields holding the geometry (None: the field also fixes head_dim = hidden /
    # heads, as in GPT-2, OPT, BERT and GPT-NeoX, so a changed head count cannot be written into the config)
    config_heads: str | None = "num_attention_heads"
    config_kv_heads: str | None = "num_key_value_heads"
    config_intermediate: str | None = "intermediate_size"
    attn_config_heads: bool = False  # the attention forward reads config.num_attention_heads (phi3's fused split)
    attn_bias_flag: str | None = "attention_bias"  # config flags that add biases (used by bias compensation)
    mlp_bias_flag: str | None = "mlp_bias"
    optional_norms: tuple[str, ...] = ()  # canonical norms a block may lack (parallel attention + MLP)
    optional_mlp: bool = False  # blocks may lack the dense MLP (discovered models with MoE layers after dense ones)
    # hybrids: blocks may mix tokens without softmax attention (linear attention, state-space, conv); such a block
    # maps no attention component and its token mixer is left unscored and unpruned (``attention_absent``)
    optional_attn: bool = False
    heads_fixed: str | None = None  # why heads cannot be removed structurally (None: they can)
    channels_fixed: str | None = None  # why MLP channels cannot be removed structurally
    layout_of: Callable[[object], str] | None = None  # fused attention layout chosen from the config (falcon)
    mla: bool = False  # multi-head latent attention: per-component head widths from the config (see _mla_dims)


_REGISTRY: dict[str, ArchSpec] = {}


def register_arch(*model_types: str) -> Callable[[ArchSpec], ArchSpec]:
    """Register ``spec`` for ``model_types``: ``register_arch('llama', 'mistral')(ArchSpec(...))``."""

    def add(spec: ArchSpec) -> ArchSpec:
        for t in model_types:
            _REGISTRY[t] = spec
        return spec

    return add


def registered_types() -> list[str]:
    return sorted(_REGISTRY)


_LLAMA_LIN = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
              "attn.o": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
              "mlp.down": "mlp.down_proj"}
_LLAMA_NORMS = {"norm.attn_in": "input_layernorm", "norm.mlp_in": "post_attention_layernorm"}
_QK_NORMS = {"norm.q": "self_attn.q_norm", "norm.k": "self_attn.k_norm"}
_GEMMA2_NORMS = {"norm.attn_in": "input_layernorm", "norm.attn_out": "post_attention_layernorm",
                 "norm.mlp_in": "pre_feedforward_layernorm", "norm.mlp_out": "post_feedforward_layernorm"}
_ATTN_ONLY = {k: v for k, v in _LLAMA_LIN.items() if k.startswith("attn.")}

register_arch("llama", "mistral", "qwen2", "gemma", "granite", "olmo")(  # OLMo-1's norms have no parameters
    ArchSpec("model.layers", _LLAMA_LIN, _LLAMA_NORMS))
register_arch("cohere")(ArchSpec("model.layers", _LLAMA_LIN, {"norm.attn_in": "input_layernorm"}))  # parallel
register_arch("qwen3")(ArchSpec("model.layers", _LLAMA_LIN, {**_LLAMA_NORMS, **_QK_NORMS}))
register_arch("gemma2")(ArchSpec("model.layers", _LLAMA_LIN, _GEMMA2_NORMS))
register_arch("gemma3_text")(ArchSpec("model.layers", _LLAMA_LIN, {**_GEMMA2_NORMS, **_QK_NORMS}))
register_arch("olmo2", "olmo3")(ArchSpec("model.layers", _LLAMA_LIN, {
    "norm.attn_out": "post_attention_layernorm", "norm.mlp_out": "post_feedforward_layernorm", **_QK_NORMS}))
register_arch("phi3", "phi4_multimodal")(ArchSpec("model.layers", {
    "attn.q": Fused("self_attn.qkv_proj", "qkv", 0), "attn.k": Fused("self_attn.qkv_proj", "qkv", 1),
    "attn.v": Fused("self_attn.qkv_proj", "qkv", 2), "attn.o": "self_attn.o_proj",
    "mlp.gate": Fused("mlp.gate_up_proj", "halves", 0), "mlp.up": Fused("mlp.gate_up_proj", "halves", 1),
    "mlp.down": "mlp.down_proj"}, _LLAMA_NORMS, attn_config_heads=True))
register_arch("gpt2")(ArchSpec("transformer.h", {
    "attn.q": Fused("attn.c_attn", "qkv", 0), "attn.k": Fused("attn.c_attn", "qkv", 1),
    "attn.v": Fused("attn.c_attn", "qkv", 2), "attn.o": "attn.c_proj", "mlp.up": "mlp.c_fc",
    "mlp.down": "mlp.c_proj"}, {"norm.attn_in": "ln_1", "norm.mlp_in": "ln_2"}, gqa=False, attn="attn",
    final_norm="transformer.ln_f", config_heads=None, config_kv_heads=None, config_intermediate="n_inner"))
register_arch("gpt_neox")(ArchSpec("gpt_neox.layers", {
    "attn.q": Fused("attention.query_key_value", "qkv_heads", 0),
    "attn.k": Fused("attention.query_key_value", "qkv_heads", 1),
    "attn.v": Fused("attention.query_key_value", "qkv_heads", 2), "attn.o": "attention.dense",
    "mlp.up": "mlp.dense_h_to_4h", "mlp.down": "mlp.dense_4h_to_h"}, _LLAMA_NORMS, gqa=False, attn="attention",
    final_norm="gpt_neox.final_layer_norm", config_heads=None, config_kv_heads=None))
register_arch("opt")(ArchSpec("model.decoder.layers", {
    "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.out_proj", "mlp.up": "fc1", "mlp.down": "fc2"},
    {"norm.attn_in": "self_attn_layer_norm", "norm.mlp_in": "final_layer_norm"}, gqa=False, mlp="",
    final_norm="model.decoder.final_layer_norm", config_heads=None, config_kv_heads=None,
    config_intermediate="ffn_dim"))
register_arch("bert", "roberta")(ArchSpec("encoder.layer", {
    "attn.q": "attention.self.query", "attn.k": "attention.self.key", "attn.v": "attention.self.value",
    "attn.o": "attention.output.dense", "mlp.up": "intermediate.dense", "mlp.down": "output.dense"},
    {"norm.attn_out": "attention.output.LayerNorm", "norm.mlp_out": "output.LayerNorm"}, gqa=False,
    attn="attention", mlp="", final_norm=None, config_heads=None, config_kv_heads=None))
register_arch("mixtral")(ArchSpec("model.layers", _ATTN_ONLY, _LLAMA_NORMS, experts="mlp.experts",
                                  router="mlp.gate", config_intermediate=None))  # experts read intermediate_size
register_arch("qwen3_moe")(ArchSpec("model.layers", _LLAMA_LIN, {**_LLAMA_NORMS, **_QK_NORMS},
                                    experts="mlp.experts", router="mlp.gate"))
register_arch("qwen2_moe")(ArchSpec("model.layers", _LLAMA_LIN, _LLAMA_NORMS, experts="mlp.experts",
                                    router="mlp.gate", shared={
                                        "mlp.shared.gate": "mlp.shared_expert.gate_proj",
                                        "mlp.shared.up": "mlp.shared_expert.up_proj",
                                        "mlp.shared.down": "mlp.shared_expert.down_proj",
                                        "mlp.shared.router": "mlp.shared_expert_gate"}))


# ----------------------------------------------------------------------------------------- views

@dataclass(eq=False)
class Component:
    """One canonical component of one block, as a plain weight view.

    ``kind``: 'linear' (weight [out, in]), 'experts' (stacked [E, out, in]) or 'norm' (weight [d]).
    ``rows`` selects this component's output rows in the module (slice or index tensor; None = all);
    ``transposed`` marks Conv1D (stored [in, out]); ``param`` names the module parameter.
    """

    name: str
    layer: int
    path: str
    module: nn.Module
    kind: str
    param: str = "weight"
    rows: slice | torch.Tensor | None = None
    transposed: bool = False
    head_dim: int = 0
    out_group: str | None = None  # 'head' | 'kv_group' | 'mlp_channel' | 'expert' along rows
    in_group: str | None = None  # ... along columns

    def _stored(self, name: str | None = None) -> tuple[torch.Tensor, bool]:
        """The module's parameter ``name`` (default: this component's) as stored, and whether it is
        accelerate's offloaded copy."""
        name = name or self.param
        w = getattr(self.module, name)
        if w.device.type == "meta" and hasattr(self.module, "_hf_hook"):  # offloaded by accelerate: its copy
            return offloaded_weight(self.module, name, self.path), True
        return w, False

    def _oriented(self, w: torch.Tensor) -> torch.Tensor:
        """The stored parameter as ``[..., out, in]`` (GPT-2's Conv1D stores ``[in, out]``)."""
        return w.transpose(-1, -2) if self.transposed else w

    def _full(self) -> torch.Tensor:
        return self._oriented(self._stored()[0])

    def _view(self, full: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            return full
        return full[..., self.rows, :] if self.kind == "experts" else full[self.rows]

    @property
    def weight(self) -> torch.Tensor:
        """``[out, in]`` (``[E, out, in]`` for experts, ``[d]`` for norms): a view where the layout allows.

        On an offloaded module this reads accelerate's CPU / disk copy (a disk copy afresh on every access)."""
        return self._view(self._full())

    @property
    def bias(self) -> torch.Tensor | None:
        b = getattr(self.module, "bias", None) if self.param == "weight" else None
        if not isinstance(b, torch.Tensor) or self.kind == "experts":
            return None
        b = self._stored("bias")[0]
        return b if self.rows is None else b[self.rows]

    def select_out(self, y: torch.Tensor) -> torch.Tensor:
        """This component's slice of the module's output ``[..., out_total] -> [..., out]``."""
        return y if self.rows is None else y[..., self.rows]

    @torch.no_grad()
    def update_weight_(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the weight view by ``fn(weight)`` in place (writes through slices and transposes, and into
        accelerate's offloaded copy when the module is offloaded)."""
        stored, offloaded = self._stored()
        full = self._oriented(stored)
        new = fn(self._view(full))
        if self.rows is None:
            full.copy_(new)
        elif self.kind == "experts":
            full[..., self.rows, :] = new
        else:
            full[self.rows] = new
        if offloaded:
            write_offloaded_(self.module, self.param, stored, self.path)

    @property
    def shape(self) -> tuple[int, ...]:
        """Read from the module's parameter itself (a meta tensor when offloaded): no weights are loaded."""
        return tuple(self._view(self._oriented(getattr(self.module, self.param))).shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(eq=False)
class Block:
    """One transformer block with its components and its attention / MLP geometry."""

    index: int
    path: str
    module: nn.Module
    components: dict[str, Component]
    n_heads: int = 0
    n_kv_heads: int = 0
    head_dim: int = 0
    n_experts: int = 0
    intermediate: int = 0
    skipped: tuple[str, ...] = ()  # removed residual branches ('attn', 'mlp'): ``importance.arch.branches``

    def group_size(self, group: str) -> int:
        return {"head": self.n_heads, "kv_group": self.n_kv_heads, "mlp_channel": self.intermediate,
                "expert": self.n_experts}[group]


@dataclass(eq=False)
class ModelMap:
    """The canonical view of a whole model; rebuild it after structural changes (it is cheap)."""

    model: nn.Module
    model_type: str
    spec: ArchSpec
    blocks_path: str
    blocks: list[Block]
    discovered: bool = False

    def components(self) -> Iterator[Component]:
        for block in self.blocks:
            yield from block.components.values()

    def component_names(self) -> list[str]:
        present = {c.name for c in self.components()}
        return [n for n in CANONICAL_ORDER if n in present]

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def max_size(self, group: str) -> int:
        return max((b.group_size(group) for b in self.blocks), default=0)

    def summary(self) -> list[dict[str, object]]:
        """One row per canonical component: path pattern, shape in the first block that has it, layers, params."""
        rows = []
        for name in self.component_names():
            comps = [b.components[name] for b in self.blocks if name in b.components]
            first = comps[0]
            pattern = first.path.replace(f"{self.blocks_path}.{first.layer}.", f"{self.blocks_path}.*.", 1)
            if first.rows is not None:
                pattern += " (slice)" if isinstance(first.rows, slice) else " (interleaved rows)"
            if first.transposed:
                pattern += " (stored transposed)" if first.kind == "experts" else " (Conv1D, transposed)"
            rows.append({"component": name, "path": pattern, "shape": list(first.shape), "layers": len(comps),
                         "params": sum(c.numel for c in comps)})
        return rows


def _get(root: nn.Module, path: str) -> nn.Module | None:
    mod: nn.Module | None = root
    for part in path.split("."):
        mod = getattr(mod, part, None) if mod is not None else None
    return mod


def _find_blocks(model: nn.Module, blocks: str) -> tuple[str, nn.ModuleList]:
    hits = [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and (n == blocks or n.endswith("." + blocks))]
    if len(hits) != 1:
        raise ImpruneError(f"expected one block list '{blocks}' in {type(model).__name__}, found {len(hits)}; "
                           "register a mapping with importance.arch.register_arch")
    return hits[0]


_ATTN_CLASS = re.compile(r"attention|attn", re.IGNORECASE)


def _geometry(model: nn.Module) -> tuple[int, int]:
    """(num_attention_heads, head_dim) from the config; head_dim from hidden size where not given."""
    cfg = model.config
    if not (getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)) and \
            hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()  # a composite model (vision + text): its language model's config
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    if not heads:
        raise ImpruneError(f"config of model type '{cfg.model_type}' names no attention head count")
    try:
        head_dim = getattr(cfg, "head_dim", None)
    except Exception:  # noqa: BLE001 - a per-layer field (gemma4): the attention modules' own width
        head_dim = next((m.head_dim for m in model.modules() if isinstance(getattr(m, "head_dim", None), int)
                         and _ATTN_CLASS.search(type(m).__name__)), None)
    return int(heads), int(head_dim or cfg.hidden_size // heads)


def _is_linear(m: nn.Module | None) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _layer_heads(block: nn.Module, spec: ArchSpec, n_heads_cfg: int, out_total: int, head_dim: int) -> int:
    """Query heads of one block with a fused [q | k | v] projection (may differ per layer after pruning)."""
    if not spec.gqa:  # q, k and v are equally wide
        return out_total // (3 * head_dim)
    attn = _get(block, spec.attn)
    own = getattr(attn, "config", None) if spec.attn_config_heads else None
    if own is None and isinstance(getattr(attn, "num_heads", None), int):  # kept per layer by head surgery
        return int(attn.num_heads)
    return int(getattr(own, spec.config_heads or "", None) or n_heads_cfg)


def branch_of(name: str) -> str:
    """The residual branch ('attn' or 'mlp') a canonical component belongs to."""
    return "mlp" if name.startswith(("mlp.", "norm.mlp")) else "attn"


def _build_block(index: int, bpath: str, block: nn.Module, spec: ArchSpec, n_heads_cfg: int,
                 head_dim: int, config: object = None) -> Block:
    comps: dict[str, Component] = {}
    dims = _mla_dims(config) if spec.mla else {}  # per-component head widths (MLA); else head_dim for all
    if dims:
        head_dim = dims["attn.o"]
    skipped = tuple(k for k, p in (("attn", spec.attn), ("mlp", spec.mlp))
                    if p and isinstance(_get(block, p), SkippedBranch))
    absent = "attn" not in skipped and attention_absent(block, spec)  # a hybrid's linear-attention block
    # q / k / v / o / MLP linears (plain or fused)
    q_entry = spec.linears.get("attn.q")
    for name, entry in spec.linears.items():
        path = entry.path if isinstance(entry, Fused) else entry
        mod = _get(block, path)
        if absent and name.startswith("attn."):
            continue
        if mod is None and (branch_of(name) in skipped or  # a removed sub-block
                            name.startswith("mlp.") and (spec.experts or spec.optional_mlp)):  # an MoE layer
            continue
        if not _is_linear(mod):
            raise ImpruneError(f"block {index}: '{path}' for {name} is missing or not a linear layer; "
                               "fix the mapping with importance.arch.register_arch")
        transposed = type(mod).__name__ == "Conv1D"
        rows = None
        if isinstance(entry, Fused):
            out_total = mod.weight.shape[1 if transposed else 0]
            layout = spec.layout_of(config) if spec.layout_of and entry.layout == "qkv" else entry.layout
            if layout == "mla_kv":
                rows = _mla_rows(entry.part, out_total, dims)
            else:
                n_heads = _layer_heads(block, spec, n_heads_cfg, out_total, head_dim) if layout not in (
                    "halves", "q_gate_heads", "qvk_mp4") else 0
                rows = _fused_rows(layout, entry.part, out_total, head_dim, n_heads)
        comps[name] = Component(name, index, f"{bpath}.{path}", mod, "linear", rows=rows, transposed=transposed,
                                head_dim=dims.get(name, head_dim), out_group=_OUT_GROUP.get(name),
                                in_group=_IN_GROUP.get(name))
    for name, path in spec.shared.items():
        mod = _get(block, path)
        if _is_linear(mod):
            comps[name] = Component(name, index, f"{bpath}.{path}", mod, "linear")
    experts = _get(block, spec.experts) if spec.experts else None
    n_experts = 0
    if experts is not None and hasattr(experts, "gate_up_proj"):
        layout = expert_layout(experts)  # [E, 2I, H] / [E, H, 2I] (transposed); [gate | up] or interleaved
        gu = experts.gate_up_proj
        n_experts, two_i = int(gu.shape[0]), int(gu.shape[-1] if layout.transposed else gu.shape[1])
        epath = f"{bpath}.{spec.experts}"
        for part, name in enumerate(("mlp.experts.gate", "mlp.experts.up")):
            comps[name] = Component(name, index, epath, experts, "experts", param="gate_up_proj",
                                    rows=expert_rows(layout, two_i, part), transposed=layout.transposed,
                                    out_group="expert")
        comps["mlp.experts.down"] = Component("mlp.experts.down", index, epath, experts, "experts",
                                              param="down_proj", transposed=layout.transposed, out_group="expert")
        router = _get(block, spec.router) if spec.router else None
        if router is not None and isinstance(getattr(router, "weight", None), torch.Tensor):
            comps["mlp.router"] = Component("mlp.router", index, f"{bpath}.{spec.router}", router, "linear",
                                            out_group="expert")
    for name, paths in spec.norms.items():
        if absent and branch_of(name) == "attn":  # the norms of the token mixer are left with it
            continue
        path = next((p for p in ((paths,) if isinstance(paths, str) else paths) if _get(block, p) is not None), None)
        mod = _get(block, path) if path else None
        if mod is None:
            if name in spec.optional_norms or branch_of(name) in skipped:
                continue
            raise ImpruneError(f"block {index}: norm '{paths}' for {name} is missing; "
                               "fix the mapping with importance.arch.register_arch")
        if isinstance(getattr(mod, "weight", None), torch.Tensor):  # parameter-free norms (OLMo-1) have nothing
            comps[name] = Component(name, index, f"{bpath}.{path}", mod, "norm")
    # geometry from the actual shapes (pruned models may differ per layer)
    n_heads = comps["attn.q"].shape[0] // comps["attn.q"].head_dim if "attn.q" in comps else 0
    n_kv = comps["attn.k"].shape[0] // comps["attn.k"].head_dim if "attn.k" in comps else 0
    if q_entry is not None and not spec.gqa:
        n_kv = n_heads
    inter = comps["mlp.up"].shape[0] if "mlp.up" in comps else 0
    return Block(index, bpath, block, comps, n_heads, n_kv, head_dim, n_experts, inter, skipped)


def model_map(model: nn.Module) -> ModelMap:
    """The canonical map of ``model`` (registered by ``config.model_type``, else discovered)."""
    model_type = str(getattr(model.config, "model_type", type(model).__name__))
    spec = _REGISTRY.get(model_type)
    discovered = spec is None
    if spec is None:
        from importance.arch.discover import discover

        spec = discover(model)
        warnings.warn(f"imprune: model type '{model_type}' has no registered map; discovered blocks "
                      f"'{spec.blocks}' and components {sorted(spec.linears)} by name. Check `imprune info`, "
                      "and register a mapping with importance.arch.register_arch if it is wrong.", stacklevel=2)
    bpath, blist = _find_blocks(model, spec.blocks)
    n_heads, head_dim = _geometry(model)
    blocks = [_build_block(i, f"{bpath}.{i}", b, spec, n_heads, head_dim, model.config) for i, b in enumerate(blist)]
    mm = ModelMap(model, model_type, spec, bpath, blocks, discovered)
    mixers = [b for b in blocks if not b.n_heads and "attn" not in b.skipped] if spec.optional_attn else []
    if mixers:
        kinds = sorted({f"{n}: {type(m).__name__}" for b in mixers for n, m in b.module.named_children()
                        if "norm" not in n.lower() and any(True for _ in m.parameters())
                        and not {id(c.module) for c in b.components.values()} & {id(x) for x in m.modules()}})
        warnings.warn(f"imprune: '{model_type}' is a hybrid: blocks {_ranges([b.index for b in mixers])} mix tokens "
                      f"without softmax attention ({', '.join(kinds)}); those token mixers are left unscored and "
                      "unpruned, their MLPs and the attention blocks are mapped", stacklevel=2)
    if discovered:  # proven against the model before anything uses it
        from importance.arch.check import check_map

        check_map(mm)
    return mm


from importance.arch import families as _families  # noqa: E402,F401  (registers the fused / grouped families)
