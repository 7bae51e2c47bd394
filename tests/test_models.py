"""Model specs (importance.models.load): random-model overrides, the byte tokenizer, errors, the built-in models."""

from __future__ import annotations

import random
import socket

import pytest
import torch
from conftest import ARCH_TYPES, BYTE_OFFSET, byte_ids, tiny

import importance.models.load as models
from importance.arch.canonical import model_map
from importance.engine.objective import has_loss, token_nll
from importance.errors import ImpruneError
from importance.models.load import load_model
from importance.models.tiny import BYTE_SPECIALS, byte_tokenizer, parse_random_spec
from pruning.eval.perplexity import perplexity

# ----------------------------------------------------------------------------------------- random specs


def test_random_spec_overrides_reach_config_and_map() -> None:
    lm = load_model("random:llama:layers=3,hidden=96,heads=6,kv_heads=3,head_dim=8,intermediate=40,positions=64")
    cfg = lm.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.intermediate_size, cfg.max_position_embeddings) == (3, 96, 6, 3, 8, 40, 64)
    mm = model_map(lm.model)
    b = mm.blocks[0]
    assert (mm.n_layers, b.n_heads, b.n_kv_heads, b.head_dim, b.intermediate) == (3, 6, 3, 8, 40)
    assert b.components["attn.q"].shape == (48, 96)
    assert lm.spec.startswith("random:llama") and lm.task == "causal-lm"


def test_random_seed_is_deterministic_and_matters() -> None:
    a, b = load_model("random:qwen2:seed=7"), load_model("random:qwen2:seed=7")
    c = load_model("random:qwen2:seed=8")
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    state = torch.random.get_rng_state()
    load_model("random:qwen2:seed=9")
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's global RNG is left alone


def test_parse_random_spec() -> None:
    assert parse_random_spec("random:gpt2") == ("gpt2", {})
    assert parse_random_spec("random:llama:layers=4,seed=3") == ("llama", {"num_hidden_layers": 4, "seed": 3})


@pytest.mark.parametrize("spec", ["random:", "random:llama:layers=x", "random:llama:depth=4",
                                  "random:llama:layers=-1"])
def test_bad_random_spec_raises(spec: str) -> None:
    with pytest.raises(ImpruneError) as err:
        load_model(spec)
    assert "\n" not in str(err.value) and "random" in str(err.value)


@pytest.mark.parametrize("model_type", ARCH_TYPES, ids=str)
def test_random_model_task_and_vocab(model_type: str) -> None:
    lm = tiny(model_type)
    expected = "masked-lm" if model_type in ("bert", "roberta") else "causal-lm"  # the two encoders of the grid
    assert lm.task == expected and has_loss(lm.task)
    emb = lm.model.get_input_embeddings().weight
    assert emb.shape[0] == len(lm.tokenizer) == 256 + len(BYTE_SPECIALS)
    assert not lm.model.training
    if lm.task == "masked-lm":
        assert lm.model.config.mask_token_id == lm.tokenizer.mask_token_id


# ----------------------------------------------------------------------------------------- byte tokenizer

def _random_unicode(rng: random.Random, n: int) -> str:
    out = []
    while len(out) < n:
        cp = rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0, 0x20), rng.randrange(0x80, 0x800),
                         rng.randrange(0x800, 0x10000), rng.randrange(0x10000, 0x110000)])
        if not 0xD800 <= cp <= 0xDFFF:  # surrogates are not text
            out.append(chr(cp))
    return "".join(out)


@pytest.mark.parametrize("seed", range(5))
def test_byte_tokenizer_round_trips_arbitrary_unicode(seed: int) -> None:
    tok = byte_tokenizer()
    text = _random_unicode(random.Random(seed), 200) + " end . , ! ?  spaces\u00a0\u200b e\u0301 \U0001f600"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == byte_ids(text)  # exactly one token per UTF-8 byte
    assert tok.decode(ids) == text
    assert max(ids) < len(tok) == 261


def test_byte_tokenizer_specials() -> None:
    tok = byte_tokenizer()
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id] == \
        list(range(len(BYTE_SPECIALS)))
    assert tok.convert_ids_to_tokens(BYTE_OFFSET + ord("A")) == "A"


# ----------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("spec", ["no-such-thing", "builtin:nope", "random:not_a_model_type", "./missing/folder/x"])
def test_unknown_specs_raise_one_line(spec: str) -> None:
    with pytest.raises(ImpruneError) as err:
        load_model(spec)
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400
    assert any(k in msg for k in ("unknown", "random:")), msg


def test_unknown_dtype() -> None:
    with pytest.raises(ImpruneError, match="dtype"):
        load_model("random:llama", dtype="float8")


def test_folder_without_config(tmp_path) -> None:
    with pytest.raises(ImpruneError, match="config.json"):
        load_model(str(tmp_path))


def test_offline_hub_id_fails_fast_with_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("tried to open a network connection while HF_HUB_OFFLINE=1")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(ImpruneError) as err:
        load_model("imprune-tests/no-such-model-anywhere")
    msg = str(err.value)
    assert "\n" not in msg
    assert "imprune-tests/no-such-model-anywhere" in msg and "folder" in msg and "--model" in msg


def test_saved_random_model_reloads_from_a_folder(tmp_path) -> None:
    lm = tiny("qwen3")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    assert again.task == "causal-lm" and again.source == str(tmp_path)
    ids = torch.tensor([byte_ids("hello there")])
    with torch.no_grad():
        torch.testing.assert_close(again.model(input_ids=ids).logits, lm.model(input_ids=ids).logits)
    assert again.tokenizer("hé", add_special_tokens=False)["input_ids"] == byte_ids("hé")


# ----------------------------------------------------------------------------------------- built-in models

@pytest.mark.integration
def test_smollm2_second_load_does_not_convert_again(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    first = load_model("builtin:smollm2-135m")  # converts once if the cache is empty
    del first
    capsys.readouterr()

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted the GGUF file again")

    import transformers

    real = transformers.AutoModelForCausalLM.from_pretrained

    def from_pretrained(*args, **kwargs):
        if kwargs.get("gguf_file"):
            no_conversion()
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "atomic_dir", no_conversion)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    lm = load_model("builtin:smollm2-135m")
    assert "converting" not in capsys.readouterr().out
    cfg = lm.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size) == ("llama", 30, 9, 3, 1536)
    assert lm.task == "causal-lm" and any("GGUF" in n for n in lm.notes)
    assert lm.model.dtype == torch.float32


@pytest.mark.integration
def test_minilm_is_an_encoder_without_loss() -> None:
    lm = load_model("builtin:minilm-l6")
    assert lm.task == "encoder" and not has_loss(lm.task)
    assert lm.model_type == "bert"
    mm = model_map(lm.model)
    assert mm.n_layers == 6 and mm.blocks[0].n_heads == 12
    ids = lm.tokenizer(["a short sentence"], return_tensors="pt")
    with torch.no_grad():
        out = lm.model(**ids)
    assert out.last_hidden_state.shape[-1] == lm.model.config.hidden_size
    from importance.data.sources import Windows

    w = Windows(ids["input_ids"], ids["attention_mask"], ids["attention_mask"].bool())
    with pytest.raises(ImpruneError, match="no language-model head"):
        perplexity(lm.model, w, lm.task, progress=False)
    with pytest.raises(ImpruneError, match="no language-model head"):
        token_nll(lm.model, next(w.batches(1)), lm.task)
