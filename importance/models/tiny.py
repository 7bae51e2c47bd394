"""Tiny seeded random models of any architecture (``--model random:<model_type>[:layers=4,hidden=128,...]``)
with a byte-level tokenizer that fits their vocabulary: what the tests, the coverage benchmark and quick trials
run on, fully offline.
"""

from __future__ import annotations

from typing import Any

import torch

from importance.errors import ImpruneError
from importance.models.load import LoadedModel

TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
             intermediate_size=128, max_position_embeddings=512)
# per-architecture extras so every family stays tiny (MoE experts, OPT's ffn_dim, ...)
TINY_EXTRA: dict[str, dict[str, Any]] = {
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "gpt_neox": dict(num_key_value_heads=4),
    "gpt2": dict(num_key_value_heads=4, n_inner=128),
    "bert": dict(num_key_value_heads=4),
    "gemma2": dict(sliding_window=64),
    "gemma3_text": dict(sliding_window=64),
    "dots3_note": dict(num_key_value_heads=4), "dots3_note_text": dict(num_key_value_heads=4),
    "dots1": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1),
    "mamba2": dict(num_heads=8, n_groups=1),  # hidden * expand = num_heads * head_dim
    # the same for their mamba layers, and block 1 of the two an attention block (their defaults: mamba only)
    "bamba": dict(mamba_n_heads=8, attn_layer_indices=[1]),
    "granitemoehybrid": dict(mamba_n_heads=8, layer_types=["linear_attention", "full_attention"]),
    "nemotron_h": dict(mamba_num_heads=8, n_groups=1),
    "xmod": dict(default_language="en_XX"),  # its forward picks the language adapter of this one
    "gemma3n_text": dict(num_kv_shared_layers=0),  # its default shares the KV cache of 15 of 35 layers
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),  # its default sets no types
    "reformer": dict(axial_pos_embds_dim=[32, 32], axial_pos_shape=[16, 32], attention_head_size=16,
                     feed_forward_size=128, lsh_attn_chunk_length=16, local_attn_chunk_length=16),
    "dbrx": dict(d_model=64, n_heads=4, n_layers=2, attn_config={"kv_n_heads": 2, "rope_theta": 10000.0},
                 ffn_config={"hidden_size": 64, "ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2}),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
    "gptj": dict(rotary_dim=16),  # rotary dimensions within the tiny head_dim
    "codegen": dict(rotary_dim=16),
}
# types the tiny builder does not size, with what is missing (a real checkpoint still loads with --model)
NOT_SIZED: dict[str, str] = {
    "blt": "the byte latent transformer's four sub-models (patcher, local encoder / decoder, global) and its "
           "500k-row hash embeddings",
}
OVERRIDE_KEYS = {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
                  "kv_heads": "num_key_value_heads", "head_dim": "head_dim", "intermediate": "intermediate_size",
                  "seed": "seed", "positions": "max_position_embeddings"}
BYTE_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<mask>")


def byte_tokenizer() -> Any:
    """A byte-level tokenizer with 5 special tokens + 256 byte tokens (vocab 261), fully offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()  # 256 printable stand-ins for the bytes
    byte_map = _bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(BYTE_SPECIALS)}
    for b in range(256):
        vocab[byte_map[b]] = len(vocab)
    assert set(byte_map.values()) == set(byte_alphabet)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(BYTE_SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", mask_token="<mask>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (written out from its definition)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def parse_random_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``random:llama:layers=4,hidden=128`` -> ('llama', {'num_hidden_layers': 4, 'hidden_size': 128})."""
    parts = spec.split(":", 2)
    if len(parts) < 2 or not parts[1]:
        raise ImpruneError("a random model spec needs a model type, e.g. --model random:llama")
    overrides: dict[str, Any] = {}
    if len(parts) == 3 and parts[2]:
        for item in parts[2].split(","):
            key, _, value = item.partition("=")
            if key not in OVERRIDE_KEYS or not value.isdigit():
                raise ImpruneError(f"bad random-model override '{item}'; use key=integer with keys "
                                   f"{', '.join(OVERRIDE_KEYS)}")
            if key != "seed" and int(value) < 1:
                raise ImpruneError(f"random-model override '{item}' must be at least 1")
            overrides[OVERRIDE_KEYS[key]] = int(value)
    return parts[1], overrides


# fields many families share (MoE experts, MLA ranks, linear-attention heads, encoder-decoder widths), set to
# these tiny values where the type's own default config has them larger
SHRINK: dict[str, int] = dict(
    moe_intermediate_size=32, n_routed_experts=4, num_experts=4, num_local_experts=4, moe_num_experts=4,
    num_experts_per_tok=2, num_experts_per_token=2, moe_top_k=2, moe_k=2, n_group=1, topk_group=1, n_shared_experts=1,
    shared_expert_intermediate_size=64,
    shared_experts_intermediate_size=64, moe_shared_expert_intermediate_size=64, expert_ffn_hidden_size=32,
    shared_intermediate_size=64, dense_intermediate_size=128, intermediate_size_mlp=128,
    q_lora_rank=32, kv_lora_rank=32, o_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    qk_head_dim=16, index_head_dim=16, index_n_heads=2, index_topk=8,
    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2,
    linear_head_dim=16, linear_num_heads=4, swa_num_attention_heads=4, swa_head_dim=16,
    encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_layers=2, decoder_layers=2, num_encoder_layers=2, num_decoder_layers=2,
    hidden_size_per_layer_input=16, vocab_size_per_layer_input=261, ffn_dim=128,
    mamba_d_state=16, mamba_n_heads=4, mamba_d_head=16, mamba_head_dim=16, mamba_num_heads=4, mamba_headdim=16,
    ssm_state_size=16, mamba_chunk_size=16, chunk_size=16, attention_head_dim=16, attention_hidden_size=64,
    codebook_size=64, base_channels=32, laurel_rank=8,
)
# the other sub-configs of a composite model (vision towers, VQ encoders): as small as they allow
SHRINK_TOWER: dict[str, int] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=2, head_dim=16, depth=1, num_heads=2, num_layers=1,
                                    out_hidden_size=64, projection_dim=32, vision_output_dim=32, codebook_size=64,
                                    base_channels=32, num_blocks=1, ext_pw_out_channel=32,
                                    depthwise_separable_out_channel=32, nemo_conv_channels=32)
PER_LAYER_LISTS = ("layer_types", "attention_layers", "layers_block_type", "hybrid_override_pattern")


def _defaults(model_type: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type)
    except Exception:  # noqa: BLE001 - a default that does not validate: no shrinking from it
        return None


def _shrunk(default: Any, table: dict[str, int], given: dict[str, Any]) -> dict[str, Any]:
    """``table``'s values for the fields ``default`` has with a larger integer, unless ``given`` sets them."""
    if default is None:
        return {}
    d = default.to_dict()
    return {k: v for k, v in table.items() if k not in given and isinstance(d.get(k), int)
            and not isinstance(d.get(k), bool) and d[k] > v}


def _layer_lists(default: Any, layers: int, given: dict[str, Any]) -> dict[str, Any]:
    """Per-layer lists of the default config cut to ``layers`` entries, keeping one full-attention entry where
    the default has one (a hybrid's 2-layer cut then still holds an attention layer)."""
    if default is None:
        return {}
    out: dict[str, Any] = {}
    n = int(getattr(default, "num_hidden_layers", 0) or 0)
    for key in PER_LAYER_LISTS:
        full = default.to_dict().get(key)
        if key in given or not isinstance(full, (list, str)) or len(full) <= layers or (n and len(full) != n):
            continue
        cut = list(full[:layers])
        attn = [v for v in full if isinstance(v, str) and v in ("full_attention", "attention", "global", "*")]
        if attn and attn[0] not in cut:
            cut[-1] = attn[0]
        out[key] = "".join(cut) if isinstance(full, str) else cut
    return out


def _tiny_kwargs(model_type: str, default: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {**TINY, **TINY_EXTRA.get(model_type, {}), **overrides}
    kwargs.pop("seed", None)
    kwargs.update(vocab_size=len(BYTE_SPECIALS) + 256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kwargs.update(_shrunk(default, SHRINK, kwargs))
    if default is not None and "num_experts_per_tok" in default.to_dict() and default.num_experts_per_tok is None:
        kwargs["num_experts_per_tok"] = 2  # a default (deepseek_v2) that routes to None experts
    if "qk_rope_head_dim" in kwargs and "head_dim" not in overrides:  # MLA: the rotary width is the rope part
        kwargs["head_dim"] = kwargs["qk_rope_head_dim"]
    if "kv_lora_rank" in kwargs and "num_key_value_heads" not in overrides:  # MLA expands k / v to every head
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    kwargs.update(_layer_lists(default, int(kwargs["num_hidden_layers"]), kwargs))
    return kwargs


def random_config(model_type: str, **overrides: Any) -> Any:
    """A tiny config for ``model_type`` (hidden 64, 4 heads / 2 KV heads, 2 layers, byte vocabulary); a composite
    model's text config gets these sizes and its other sub-configs (vision towers) the smallest they take."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        raise ImpruneError(f"unknown model type '{model_type}' for random:<model_type>; use a transformers "
                           "model_type such as llama, qwen3, gpt2, bert, mixtral")
    if model_type in NOT_SIZED and not overrides:
        raise ImpruneError(f"random:{model_type}: the tiny builder does not size {NOT_SIZED[model_type]}; try a real "
                           "checkpoint with --model")
    default = _defaults(model_type)
    subs = dict(getattr(default, "sub_configs", None) or {})
    if "text_config" in subs and default is not None:  # composite: the language model is the text config
        text = default.text_config
        kwargs = {"text_config": {**_tiny_kwargs(model_type, text, overrides),
                                  **({"model_type": text.model_type} if hasattr(text, "model_type") else {})}}
        for name in subs:
            sub = getattr(default, name, None)
            if name != "text_config" and hasattr(sub, "to_dict"):
                kwargs[name] = {**sub.to_dict(), **_shrunk(sub, SHRINK_TOWER, {})}
        kwargs.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    else:
        kwargs = _tiny_kwargs(model_type, default, overrides)
        for name in subs:  # a text model with towers of its own (phi4_multimodal: vision, audio)
            sub = getattr(default, name, None)
            if hasattr(sub, "to_dict") and name not in kwargs:
                kwargs[name] = {**sub.to_dict(), **_shrunk(sub, SHRINK_TOWER, {})}
    return _build_config(model_type, kwargs, overrides)


def _build_config(model_type: str, kwargs: dict[str, Any], overrides: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    for _ in range(len(kwargs)):
        try:
            return AutoConfig.for_model(model_type, **kwargs)
        except AttributeError as err:  # a derived, read-only attribute (falcon's head_dim): drop it
            bad = next((k for k in kwargs if f"'{k}'" in str(err)), None)
            if bad is None or bad in overrides:
                raise ImpruneError(f"random:{model_type} cannot take {err}") from None
            kwargs.pop(bad)
        except Exception as err:  # noqa: BLE001 - the config's own validation (ValueError, strict dataclasses)
            why = str(err).strip().splitlines()[-1].strip() if str(err).strip() else type(err).__name__
            raise ImpruneError(f"random:{model_type} cannot be built with these sizes ({why}); change the "
                               "overrides, e.g. hidden divisible by heads, heads divisible by kv_heads") from None
    raise ImpruneError(f"random:{model_type}: no tiny config found")


def _random_task(model_type: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return "masked-lm" if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "causal-lm"


def load_random(spec: str, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    model_type, overrides = parse_random_spec(spec)
    seed = int(overrides.get("seed", 0))
    config = random_config(model_type, **overrides)
    task = _random_task(model_type)
    cls = AutoModelForMaskedLM if task == "masked-lm" else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = cls.from_config(config, dtype=dtype)
        except ImportError as err:  # an optional dependency of the model's own code (timm for vision towers)
            raise ImpruneError(f"random:{model_type} needs a package that is not installed ("
                               f"{str(err).strip().splitlines()[0][:160]})") from None
        except Exception as err:  # noqa: BLE001 - transformers' own code rejects the tiny config
            msg = (str(err).strip().splitlines() or [""])[0][:160]
            raise ImpruneError(f"random:{model_type}: transformers cannot build this model from a tiny config "
                               f"({type(err).__name__}: {msg}); try a real checkpoint with --model") from None
    if task == "masked-lm":
        model.config.mask_token_id = BYTE_SPECIALS.index("<mask>")
    return LoadedModel(model, byte_tokenizer(), spec, task, source=f"random seed {seed}",
                       notes=["tiny random weights for tests and trials"])
