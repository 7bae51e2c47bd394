"""Quantized vocabulary tables (pruning.quant.embeddings): the grid, tied weights once, the compressed-tensors
round trip and the bytes it saves on disk, the CLI flag."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import fresh, random_windows
from safetensors import safe_open

from pruning.cli.core import main
from pruning.quant.ct_format import packed_bytes, save_compressed_tensors
from pruning.quant.embeddings import quantize_embeddings_
from pruning.quant.gptq_model import GPTQConfig, plan_gptq, quantize_model_gptq_


def _quantized_model(model_type: str, bits: int, embeddings: bool):
    lm = fresh(model_type, scale=0.1)
    windows = random_windows(6, 24, seed=0, high=min(lm.model.config.vocab_size, 261))
    plan = plan_gptq(lm.model, None, 4.0, "4", windows, GPTQConfig("gptq"), group_size=16, linear_only=True)
    emb = quantize_embeddings_(lm.model, bits, False, 16) if embeddings else None
    quantized = quantize_model_gptq_(lm.model, plan, windows, GPTQConfig("gptq"))
    return lm, windows, plan, quantized, emb


def _keys(path) -> dict[str, int]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


@pytest.mark.parametrize("bits", [8, 4])
def test_table_rows_lie_on_their_grid_and_a_tied_pair_stays_one_parameter(bits):
    lm = fresh("opt", scale=0.1)  # OPT ties its head to the embedding
    before = lm.model.get_input_embeddings().weight.detach().clone()  # [vocab, hidden]
    targets, qs = quantize_embeddings_(lm.model, bits, False, 16)
    emb, head = lm.model.get_input_embeddings(), lm.model.get_output_embeddings()
    assert head.weight is emb.weight and [t.tied_to for t in targets] == [None, targets[0].name]
    assert qs[targets[0].name] is qs[targets[1].name]  # quantized once
    w = emb.weight.detach()
    g = 16 if bits < 8 else w.shape[1]
    groups = w.reshape(w.shape[0], -1, g)  # [vocab, groups, g]
    levels = max(len(torch.unique(groups[i, k])) for i in range(0, w.shape[0], 17) for k in range(groups.shape[1]))
    assert levels <= 2 ** bits
    # an independent rounding: the max error of a row-group is half its step (range / (2^b - 1)) at most
    span = (before.reshape(groups.shape).amax(-1).clamp(min=0) - before.reshape(groups.shape).amin(-1).clamp(max=0))
    err = (groups - before.reshape(groups.shape)).abs().amax(-1)
    assert (err <= span / (2 ** bits - 1) / 2 + 1e-6).all()
    assert not torch.equal(w, before)


@pytest.mark.parametrize("model_type", ["llama", "opt", "cohere", "gemma"])
def test_round_trip_with_embeddings_equals_the_fake_quantized_model_and_shrinks_the_file(tmp_path, model_type):
    lm, windows, plan, quantized, emb = _quantized_model(model_type, 8, True)
    tied = lm.model.get_output_embeddings().weight is lm.model.get_input_embeddings().weight
    with torch.no_grad():
        fake = lm.model(input_ids=windows.input_ids).logits
    save_compressed_tensors(lm, tmp_path / "ct", plan, quantized, {}, embeddings=emb)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    with torch.no_grad():
        logits = again(input_ids=windows.input_ids).logits
    assert torch.allclose(logits, fake, atol=1e-5, rtol=1e-5)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    targets = {t for g in config["config_groups"].values() for t in g["targets"]}
    assert {t.name for t in emb[0]} <= targets
    keys = _keys(tmp_path / "ct" / "model.safetensors")
    head = emb[0][-1].name
    # a tied head's codes are stored once, under the embedding; an untied head is packed like the block linears
    assert f"{head}.weight" not in keys and (f"{head}.weight_packed" in keys) == (not tied)
    assert keys[f"{emb[0][0].name}.weight"] == list(lm.model.get_input_embeddings().weight.shape)

    # the same model without --quantize-embeddings: the file grows by what the byte count predicts
    lm2, _, plan2, quantized2, _ = _quantized_model(model_type, 8, False)
    save_compressed_tensors(lm2, tmp_path / "plain", plan2, quantized2, {})
    saved = (tmp_path / "plain" / "model.safetensors").stat().st_size - \
        (tmp_path / "ct" / "model.safetensors").stat().st_size
    predicted = packed_bytes(lm2.model, plan2, quantized2) - packed_bytes(lm.model, plan, quantized, emb)
    vocab, hidden = lm.model.get_input_embeddings().weight.shape
    assert predicted > (1 if tied else 2) * vocab * hidden * 2.5  # about 3 of every 4 bytes of each table
    assert abs(saved - predicted) < 0.05 * predicted, (saved, predicted)  # headers, shapes, padded zero points


def test_cli_quantize_embeddings(tmp_path):
    base = ["quantize", "--model", "random:opt", "--data", "austen:train", "--tokens", "512", "--seq-len", "32",
            "--budget", "4", "--choices", "4", "--group-size", "16", "--no-eval", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert main([*base, "--quantize-embeddings", "8", "--out", str(tmp_path / "q")]) == 0
    record = json.loads((tmp_path / "q" / "imprune.json").read_text())
    mods = record["embeddings"]["modules"]
    assert record["embeddings"]["bits"] == 8 and any(m["tied_to"] for m in mods.values())
    plain = json.loads((tmp_path / "plain" / "imprune.json").read_text())["memory"]["bytes"]
    assert record["memory"]["bytes"] < plain
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.isfinite(again(input_ids=torch.tensor([[1, 5, 9, 12]])).logits).all()


@pytest.mark.parametrize("extra, message", [
    (["--quantize-embeddings", "5"], "--quantize-embeddings 5: unsupported width"),
    (["--quantize-embeddings", "8", "--format", "quanto", "--method", "rtn"], "does not store embeddings")])
def test_cli_refuses_bad_embedding_widths(tmp_path, capsys, extra, message):
    args = ["quantize", "--model", "random:llama", "--data", "austen:train", "--tokens", "512", "--seq-len", "32",
            "--budget", "4", "--choices", "4", "--no-eval", "--quiet", "--out", str(tmp_path / "q"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []
