"""Registered maps of the families whose layout the generic discovery cannot know (fused, interleaved, grouped).

Imported at the end of ``importance.arch.canonical`` (which holds the registry and the Llama-like families); each entry
here is one ``register_arch`` call with the family's own paths, proven by the test grid
(``tests/test_arch.py``) and by ``importance.arch.check``.
"""

from __future__ import annotations

from typing import Any

from importance.arch.canonical import ArchSpec, Fused, register_arch


def _qkv(path: str, layout: str) -> dict[str, Fused]:
    return {name: Fused(path, layout, i) for i, name in enumerate(("attn.q", "attn.k", "attn.v"))}


def _falcon_layout(config: Any) -> str:
    """Falcon-40B/180B ('new decoder architecture'): per KV group [q_1..q_g | k | v]; Falcon-7B (multi-query):
    [q (H*d) | k (d) | v (d)]; otherwise per head [q_h | k_h | v_h]."""
    if getattr(config, "new_decoder_architecture", False):
        return "qkv_grouped"
    return "qkv" if getattr(config, "multi_query", True) else "qkv_heads"


_DENSE_4H = {"mlp.up": "mlp.dense_h_to_4h", "mlp.down": "mlp.dense_4h_to_h"}
_NO_GQA = {"gqa": False, "config_heads": None, "config_kv_heads": None}  # head_dim = hidden / heads in the config
_PRE_NORMS = {"norm.attn_in": "input_layernorm", "norm.mlp_in": "post_attention_layernorm"}

# Persimmon (and Fuyu, its language model): per head [q_h | k_h | v_h] like GPT-NeoX, per-head q / k layer norms
_PERSIMMON = {**_qkv("self_attn.query_key_value", "qkv_heads"), "attn.o": "self_attn.dense", **_DENSE_4H}
_PERSIMMON_NORMS = {**_PRE_NORMS, "norm.q": "self_attn.q_layernorm", "norm.k": "self_attn.k_layernorm"}
register_arch("persimmon")(ArchSpec("model.layers", _PERSIMMON, _PERSIMMON_NORMS, final_norm="model.final_layernorm",
                                    attn_bias_flag=None, mlp_bias_flag=None, **_NO_GQA))
register_arch("fuyu")(ArchSpec("language_model.layers", _PERSIMMON, _PERSIMMON_NORMS,
                               final_norm="model.language_model.final_layernorm", attn_bias_flag=None,
                               mlp_bias_flag=None, **_NO_GQA))
# GPT-NeoX-Japanese: per head [q_h | k_h | v_h]; its attention adds the dense bias outside the module (dense_bias)
register_arch("gpt_neox_japanese")(ArchSpec(
    "gpt_neox_japanese.layers", {**_qkv("attention.query_key_value", "qkv_heads"), "attn.o": "attention.dense",
                                 **_DENSE_4H}, _PRE_NORMS, attn="attention",
    final_norm="gpt_neox_japanese.final_layer_norm", attn_bias_flag=None, mlp_bias_flag=None, **_NO_GQA))
# CodeGen: qkv_proj in 4 model-parallel shards of [q | v | k]; its forward splits them by embed_dim / 4
register_arch("codegen")(ArchSpec(
    "transformer.h", {**_qkv("attn.qkv_proj", "qvk_mp4"), "attn.o": "attn.out_proj", "mlp.up": "mlp.fc_in",
                      "mlp.down": "mlp.fc_out"}, {"norm.attn_in": "ln_1"}, attn="attn", final_norm="transformer.ln_f",
    config_intermediate="n_inner", attn_bias_flag=None, mlp_bias_flag=None,
    heads_fixed="CodeGen splits its fused qkv_proj into 4 model-parallel shards of the model width, so its heads "
                "cannot be removed structurally; prune unstructured, N:M, channels or layers", **_NO_GQA))

register_arch("falcon")(ArchSpec(
    "transformer.h", {**_qkv("self_attention.query_key_value", "qkv"), "attn.o": "self_attention.dense", **_DENSE_4H},
    {"norm.attn_in": ("input_layernorm", "ln_attn"), "norm.mlp_in": ("post_attention_layernorm", "ln_mlp")},
    optional_norms=("norm.mlp_in",),  # parallel attention + MLP from one norm (Falcon-7B)
    attn="self_attention", final_norm="transformer.ln_f", config_heads=None, config_kv_heads=None,
    config_intermediate="ffn_hidden_size", attn_bias_flag="bias", mlp_bias_flag="bias", layout_of=_falcon_layout))

register_arch("bloom")(ArchSpec(
    "transformer.h", {**_qkv("self_attention.query_key_value", "qkv_heads"), "attn.o": "self_attention.dense",
                      **_DENSE_4H},
    {"norm.attn_in": "input_layernorm", "norm.mlp_in": "post_attention_layernorm"}, gqa=False,
    attn="self_attention", final_norm="transformer.ln_f", config_heads=None, config_kv_heads=None,
    config_intermediate=None, attn_bias_flag=None, mlp_bias_flag=None,
    heads_fixed="BLOOM builds its ALiBi slopes from the model's one head count, so heads cannot leave single "
                "layers; prune unstructured, N:M, channels or layers"))
