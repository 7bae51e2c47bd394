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
    "gptj": dict(rotary_dim=16),  # rotary dimensions within the tiny head_dim
    "codegen": dict(rotary_dim=16),
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


def random_config(model_type: str, **overrides: Any) -> Any:
    """A tiny config for ``model_type`` (hidden 64, 4 heads / 2 KV heads, 2 layers, byte vocabulary)."""
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {**TINY, **TINY_EXTRA.get(model_type, {}), **overrides}
    kwargs.pop("seed", None)
    kwargs.update(vocab_size=len(BYTE_SPECIALS) + 256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        raise ImpruneError(f"unknown model type '{model_type}' for random:<model_type>; use a transformers "
                           "model_type such as llama, qwen3, gpt2, bert, mixtral")
    for _ in range(len(kwargs)):
        try:
            config = AutoConfig.for_model(model_type, **kwargs)
            break
        except AttributeError as err:  # a derived, read-only attribute (falcon's head_dim): drop it
            bad = next((k for k in kwargs if f"'{k}'" in str(err)), None)
            if bad is None or bad in overrides:
                raise ImpruneError(f"random:{model_type} cannot take {err}") from None
            kwargs.pop(bad)
        except Exception as err:  # noqa: BLE001 - the config's own validation (ValueError, strict dataclasses)
            why = str(err).strip().splitlines()[-1].strip() if str(err).strip() else type(err).__name__
            raise ImpruneError(f"random:{model_type} cannot be built with these sizes ({why}); change the "
                               "overrides, e.g. hidden divisible by heads, heads divisible by kv_heads") from None
    return config


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
        model = cls.from_config(config, dtype=dtype)
    if task == "masked-lm":
        model.config.mask_token_id = BYTE_SPECIALS.index("<mask>")
    return LoadedModel(model, byte_tokenizer(), spec, task, source=f"random seed {seed}",
                       notes=["tiny random weights for tests and trials"])
