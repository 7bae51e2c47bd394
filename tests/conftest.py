"""Shared test fixtures: the mapped architecture types, a session cache of tiny random models, small text files.

``tiny(model_type)`` loads ``random:<model_type>`` once per session and returns the same ``LoadedModel`` every
time: treat it as read-only. ``fresh(model_type)`` returns a private deep copy for tests that change weights;
``fresh(model_type, scale=...)`` also refills every parameter (biases and norms included) with seeded noise, so
that a view which drops a bias or reads the wrong rows cannot pass by luck of zero-initialised tensors.
"""

from __future__ import annotations

import copy
import functools
import os
import random
from pathlib import Path

import pytest
import torch

from importance.data.sources import Windows
from importance.models.load import LoadedModel, load_model

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# every model type with a registered map (importance.arch.canonical), in the order the issue lists them
ARCH_TYPES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "granite", "olmo",
              "olmo2", "olmo3", "cohere", "gpt2", "gpt_neox", "opt", "bert", "roberta", "mixtral", "qwen3_moe",
              "qwen2_moe"]
MOE_TYPES = ["mixtral", "qwen3_moe", "qwen2_moe"]
# registered families whose modules take more than the hidden states (BLOOM's residual, ALiBi) or whose config
# fields differ from the Llama names (Falcon): checked by importance.arch.check and the view tests
FUSED_TYPES = ["falcon", "bloom", "persimmon", "fuyu", "gpt_neox_japanese", "codegen", "phi4_multimodal"]
# unregistered types that the generic discovery maps (with a warning); glm4 through its fused gate_up, gpt_oss
# through its stacked experts (transposed, interleaved, biased), deepseek_v3 through its latent attention (MLA)
# (and afmoe's attention output gate, lfm2's conv / attention hybrid with an activation its MLP does not name)
DISCOVERED_TYPES = ["phi", "stablelm", "starcoder2", "glm4", "gptj", "gpt_oss", "deepseek_v3", "afmoe", "lfm2"]
# registered types with a fused attention layout the discovery cannot know (tested under another model_type name)
UNKNOWN_FUSED_TYPES = ["codegen", "persimmon"]

BYTE_OFFSET = 5  # the byte tokenizer: ids 0-4 are <pad> <s> </s> <unk> <mask>, byte b is id 5 + b

SAMPLE_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters.\n"
)


def sample_words(n: int, seed: int = 0) -> str:
    """``n`` words drawn (seeded) from SAMPLE_TEXT plus a few non-ASCII ones, as lines of 12 words."""
    rng = random.Random(seed)
    vocab = SAMPLE_TEXT.split() + ["naïve", "café", "Ælfred", "—"]
    words = [rng.choice(vocab) for _ in range(n)]
    return "\n".join(" ".join(words[i:i + 12]) for i in range(0, n, 12)) + "\n"


@functools.cache
def tiny(model_type: str) -> LoadedModel:
    """``random:<model_type>`` built once per session (shared: do not modify its weights)."""
    return load_model(f"random:{model_type}")


def fresh(model_type: str, scale: float | None = None, seed: int = 0) -> LoadedModel:
    """A private copy of ``tiny(model_type)``; with ``scale``, every parameter refilled with N(0, scale^2)
    noise (norm weights around 1) so biases and norms are non-trivial."""
    lm = copy.deepcopy(tiny(model_type))
    if scale is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in lm.model.named_parameters():
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * scale
                is_norm = p.dim() == 1 and ("norm" in name.lower() or "ln_" in name)
                p.copy_(noise + 1.0 if is_norm and name.endswith("weight") else noise)
    return lm


def byte_ids(text: str) -> list[int]:
    """The byte tokenizer's ids for ``text``, computed from the UTF-8 bytes (independent of the tokenizer)."""
    return [BYTE_OFFSET + b for b in text.encode("utf-8")]


@functools.cache
def scaled_model(model_type: str) -> LoadedModel:
    """A tiny random model (cached per type) with its matrices x4: gradients far from zero for hook checks."""
    lm = load_model(f"random:{model_type}")
    with torch.no_grad():  # larger weights than the 0.02 init, so gradients are far from zero
        for p in lm.model.parameters():
            if p.dim() >= 2:
                p.mul_(4)
    return lm


def backprop_nll(lm: LoadedModel, windows: Windows, handles: list) -> None:
    """Backpropagate the summed token NLL of ``windows`` (one batch) through ``lm`` with the hooks of ``handles``
    installed; the hooks are removed and the parameter gradients cleared afterwards (what the hooks caught stays)."""
    from importance.engine.objective import token_nll

    try:
        nll, _ = token_nll(lm.model, next(windows.batches(len(windows))), lm.task)
        nll.sum().backward()
    finally:
        for h in handles:
            h.remove()
        lm.model.zero_grad(set_to_none=True)


def padded_windows(seed: int = 0, n: int = 3, t: int = 12, pad_last: int = 4) -> Windows:
    """``n`` windows of ``t`` ids in [5, 250), the last one padded (id 0, no attention) over ``pad_last``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 250, (n, t), generator=g)
    att = torch.ones_like(ids)
    if pad_last:
        att[-1, -pad_last:] = 0
        ids[-1, -pad_last:] = 0
    return Windows(ids, att, att.bool(), {"data": "test"})


def random_windows(n: int = 3, t: int = 16, pad_last: int = 0, seed: int = 0, low: int = 5,
                   high: int = 261) -> Windows:
    """``n`` windows of ``t`` random byte-token ids; the last ``pad_last`` positions of the last window padded."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, high, (n, t), generator=gen)
    att = torch.ones_like(ids)
    if pad_last:
        att[-1, -pad_last:] = 0
        ids[-1, -pad_last:] = 0
    return Windows(ids, att, att.bool(), {"data": "random"})


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small UTF-8 text file of about 3,400 bytes: seeded random words, so no two windows repeat."""
    path = tmp_path_factory.mktemp("data") / "sample.txt"
    path.write_text(sample_words(600), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model():
    """The session cache as a fixture: ``tiny_model('llama')``."""
    return tiny
