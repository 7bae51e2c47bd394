"""Selective quantization: the bit-plan solver against brute force, the quantization formulas against quanto's own
dequantization, real packed storage against the fake-quant path, save -> reload, storage bytes against
arithmetic, and the CLI's refusals (one line, exit 2, nothing written)."""

from __future__ import annotations

import copy
import itertools
import json
import random

import pytest
import torch

from importance.data.sources import Windows
from importance.errors import ImpruneError
from importance.models.load import load_model
from importance.scoring import score
from pruning.cli.core import main
from pruning.quant.bits import fake_quantize, parse_choices, plan_bits, quant_units, random_plan, solve, uniform_plan
from pruning.quant.quantize import (
    fake_quantize_model_,
    float32_bytes,
    load_quantized,
    quantize_model_,
    save_quantized,
    weight_bytes,
)

SCORERS = ["fisher", "activation", "taylor", "magnitude"]


def _windows(n: int = 4, t: int = 16, seed: int = 0) -> Windows:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 250, (n, t), generator=g)
    att = torch.ones_like(ids)
    return Windows(ids, att, att.bool(), {"data": "test"})


def _lm(model_type: str = "llama"):
    return load_model(f"random:{model_type}:hidden=128,intermediate=256")


@pytest.fixture(scope="module")
def scored():
    lm = _lm()
    return lm, score(lm, _windows(), SCORERS, elements=True, progress=False)


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


# ----------------------------------------------------------------------------------------- solver

def _brute(sizes, errors, choices, budget):
    best = None
    for pick in itertools.product(range(len(choices)), repeat=len(sizes)):
        if sum(n * choices[k] for n, k in zip(sizes, pick)) <= budget * sum(sizes) + 1e-9:
            e = sum(errors[i][k] for i, k in enumerate(pick))
            best = e if best is None else min(best, e)
    return best


@pytest.mark.parametrize("choices", [(4, 8), (2, 4, 8)], ids=["4-8", "2-4-8"])
def test_solver_is_exact_and_within_budget(choices):
    rng = random.Random(0)
    for trial in range(40):
        n = rng.randint(1, 7)
        sizes = [rng.choice([64, 128, 192, 512]) for _ in range(n)]
        errors = [sorted((rng.random() for _ in choices), reverse=True) for _ in range(n)]
        budget = rng.uniform(choices[0], choices[-1])
        pick, solver = solve(sizes, errors, choices, budget)
        bits = sum(s * choices[k] for s, k in zip(sizes, pick))
        assert bits <= budget * sum(sizes) + 1e-9, (trial, bits, budget)
        if solver == "dp-exact":
            assert sum(errors[i][k] for i, k in enumerate(pick)) == pytest.approx(_brute(sizes, errors, choices,
                                                                                           budget))


def test_greedy_fallback_stays_within_budget():
    rng = random.Random(1)
    sizes = [rng.choice([96, 160, 352]) for _ in range(30)]
    errors = [[rng.random() + 1, rng.random()] for _ in sizes]
    pick, solver = solve(sizes, errors, (4, 8), 5.5, max_cells=10)
    assert solver == "greedy"
    assert sum(s * (4, 8)[k] for s, k in zip(sizes, pick)) <= 5.5 * sum(sizes)
    assert any(pick)  # it did spend the budget


def test_ties_take_the_smallest_width():
    pick, _ = solve([10, 10, 10], [[0.0, 0.0], [5.0, 1.0], [0.0, 0.0]], (4, 8), 8.0)
    assert pick == [0, 1, 0]


# ----------------------------------------------------------------------------------------- plans

@pytest.mark.parametrize("budget", [4.0, 4.7, 5.0, 6.5, 8.0])
def test_plan_never_exceeds_the_budget(scored, budget):
    lm, table = scored
    for plan in (plan_bits(lm.model, table, budget, "4,8"), plan_bits(lm.model, table, budget, "2,4,8"),
                 random_plan(lm.model, budget, "4,8", seed=3)):
        assert plan.average_bits() <= budget + 1e-9
        assert set(plan.bits.values()) <= set(plan.choices)


@pytest.mark.parametrize("sensitivity", SCORERS)
def test_every_sensitivity_plans_within_budget(scored, sensitivity):
    lm, table = scored
    plan = plan_bits(lm.model, table, 6.0, "4,8", sensitivity)
    assert plan.sensitivity.startswith(sensitivity) and plan.average_bits() <= 6.0
    assert all(row[8] <= row[4] for row in plan.errors.values())  # more bits, less estimated damage
    assert 4 in plan.bits.values() and 8 in plan.bits.values()


def test_guided_plan_is_optimal_for_its_estimate(scored):
    lm, table = scored
    plan = plan_bits(lm.model, table, 5.0, "4,8")
    assert plan.solver == "dp-exact"
    for seed in range(5):
        rnd = random_plan(lm.model, 5.0, "4,8", seed=seed)
        assert plan.estimate <= sum(plan.errors[n][b] for n, b in rnd.bits.items()) + 1e-12


def test_fisher_estimate_matches_an_independent_sum(scored):
    lm, table = scored
    plan = plan_bits(lm.model, table, 5.0, "4,8", group_size=32)
    name, layer = "model.layers.1.mlp.up_proj", 1
    w = lm.model.get_submodule(name).weight.detach()
    for b in (4, 8):
        if b == 8:
            scale = w.abs().amax(1, keepdim=True) / 127
            q = (w / scale).round().clamp(-128, 127) * scale
        else:
            g = w.reshape(-1, 32)
            lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
            q = (((g - lo) / ((hi - lo) / 15)).round().clamp(0, 15) * (hi - lo) / 15 + lo).reshape(w.shape)
        expect = float((table.element("fisher", layer, "mlp.up") * (w - q).square()).sum())
        assert plan.errors[name][b] == pytest.approx(expect, rel=1e-5)


def test_one_choice_gives_a_uniform_plan(scored):
    lm, table = scored
    for b in (2, 4, 8):
        plan = plan_bits(lm.model, table, float(b), str(b))
        assert set(plan.bits.values()) == {b} and plan.solver == "uniform"
        assert len(plan.bits) == 14  # 2 layers x 7 linear modules


def test_zero_fisher_module_gets_the_lowest_width(scored):
    lm, table = scored
    zeroed = copy.copy(table)
    zeroed.tensors = dict(table.tensors)
    zeroed.tensors["fisher/element/0/attn.v"] = torch.zeros_like(table.tensors["fisher/element/0/attn.v"])
    plan = plan_bits(lm.model, zeroed, 8.0, "2,4,8")  # the budget allows 8 bits everywhere
    assert plan.bits["model.layers.0.self_attn.v_proj"] == 2
    assert all(b == 8 for n, b in plan.bits.items() if n != "model.layers.0.self_attn.v_proj")


def test_keep_and_fused_modules():
    lm = _lm("phi3")
    units, kept = quant_units(lm.model, keep=("*.o_proj",))
    names = {u.name: u for u in units}
    assert "model.layers.0.self_attn.o_proj" in kept and "lm_head" in kept
    qkv = names["model.layers.0.self_attn.qkv_proj"]
    assert qkv.components == ("attn.q", "attn.k", "attn.v")
    assert qkv.numel == lm.model.get_submodule(qkv.name).weight.numel()
    plan = random_plan(lm.model, 6.0, "4,8", seed=0, keep=("*.o_proj",))
    assert plan.layer_map()[0]["attn.q"] == plan.layer_map()[0]["attn.v"] == plan.bits[qkv.name]


def test_real_path_keeps_what_quanto_cannot_store():
    lm = _lm("qwen3_moe")
    plan = random_plan(lm.model, 5.0, "4,8", seed=0, group_size=32, linear_only=True)
    assert "model.layers.0.mlp.gate" in plan.kept and "model.layers.0.self_attn.q_proj" in plan.bits
    fake = fake_quantize_model_(copy.deepcopy(lm.model), plan)
    quantize_model_(lm.model, plan)
    ids = _windows(2, 12).input_ids
    assert torch.allclose(_logits(fake, ids), _logits(lm.model, ids), atol=1e-5)
    with pytest.raises(ImpruneError, match="use --fake"):
        uniform_plan(_lm("gpt2").model, 8, linear_only=True)


# ----------------------------------------------------------------------------------------- quantization

def test_fake_quantize_small_cases():
    w = torch.tensor([[-1.0, 0.0, 0.5, 1.0], [0.0, 0.0, 0.0, 0.0]])
    q8 = fake_quantize(w, 8, 4)
    assert torch.equal(q8[0], torch.round(w[0] * 127) / 127) and torch.equal(q8[1], w[1])
    grid = torch.arange(16.0).reshape(1, 16) * 0.25 - 1.0  # 16 evenly spaced values: exact in 4 bits
    assert torch.allclose(fake_quantize(grid, 4, 16), grid)
    x = torch.randn(8, 64)
    for b, g in ((2, 16), (4, 32), (8, 64)):
        err = (fake_quantize(x, b, g) - x).abs()
        if b == 8:
            step = x.abs().amax(1, keepdim=True) / 127
        else:
            groups = x.reshape(-1, g)
            step = ((groups.amax(1, keepdim=True) - groups.amin(1, keepdim=True)) / (2**b - 1)).expand(-1, g)
            step = step.reshape(8, 64)
        assert (err <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fake_quantize_equals_quanto_dequantized(bits):
    from optimum.quanto import freeze, quantize

    lin = torch.nn.Sequential(torch.nn.Linear(128, 48, bias=False))
    torch.nn.init.normal_(lin[0].weight)
    ref = fake_quantize(lin[0].weight.detach(), bits, 32)
    quantize(lin, weights={2: "qint2", 4: "qint4", 8: "qint8"}[bits])
    if bits < 8:
        lin[0].weight_group_size = 32
    freeze(lin)
    assert torch.allclose(lin[0].weight.dequantize(), ref, atol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "phi3", "qwen3"])
def test_quanto_model_matches_fake_quant(model_type):
    lm = _lm(model_type)
    plan = random_plan(lm.model, 5.0, "2,4,8", seed=0, group_size=32)
    fake = fake_quantize_model_(copy.deepcopy(lm.model), plan)
    ids = _windows(2, 12).input_ids
    quantize_model_(lm.model, plan)
    a, b = _logits(fake, ids), _logits(lm.model, ids)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max().clamp_min(1.0)


def test_weight_bytes_match_the_format_arithmetic():
    lm = _lm()
    fp32 = float32_bytes(lm.model)
    assert weight_bytes(lm.model) == fp32
    plan = uniform_plan(lm.model, 4, group_size=32)
    quantize_model_(lm.model, plan)
    planned = sum(u.numel for u in plan.units)
    # 4-bit codes packed two per byte + a float32 scale and shift per group of 32
    expect = fp32 - planned * 4 + planned // 2 + (planned // 32) * 8
    assert weight_bytes(lm.model) == expect


def test_save_reload_gives_the_same_logits(tmp_path, scored):
    lm = _lm()
    table = scored[1]
    plan = plan_bits(lm.model, table, 5.0, "4,8")
    quantize_model_(lm.model, plan)
    ids = _windows(2, 12).input_ids
    before = _logits(lm.model, ids)
    save_quantized(lm, tmp_path / "q", plan, {"method": "quantize"})
    again = load_quantized(tmp_path / "q")
    assert torch.equal(_logits(again.model, ids), before)
    assert weight_bytes(again.model) == weight_bytes(lm.model)
    record = json.loads((tmp_path / "q" / "imprune.json").read_text())
    assert record["bits"]["0"]["attn.q"] == plan.bits["model.layers.0.self_attn.q_proj"]
    assert record["modules"] == plan.bits


def test_tied_embeddings_reload(tmp_path):
    from transformers import AutoModelForCausalLM

    from importance.models.load import LoadedModel
    from importance.models.tiny import byte_tokenizer, random_config

    torch.manual_seed(0)
    config = random_config("llama", hidden_size=128, intermediate_size=256, tie_word_embeddings=True)
    lm = LoadedModel(AutoModelForCausalLM.from_config(config).eval(), byte_tokenizer(), "tied", "causal-lm")
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    plan = uniform_plan(lm.model, 4, group_size=64)
    quantize_model_(lm.model, plan)
    ids = _windows(2, 12).input_ids
    save_quantized(lm, tmp_path / "q", plan, {})
    again = load_quantized(tmp_path / "q")
    assert again.model.lm_head.weight is again.model.model.embed_tokens.weight
    assert torch.equal(_logits(again.model, ids), _logits(lm.model, ids))


# ----------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("text", ["3,8", "4,16", "", "four"])
def test_unsupported_widths(text):
    with pytest.raises(ImpruneError, match="--choices|unsupported"):
        parse_choices(text)


def test_group_size_must_divide(scored):
    lm, table = scored
    with pytest.raises(ImpruneError, match="does not divide the input dimension 128"):
        plan_bits(lm.model, table, 5.0, "4,8", group_size=96)


def test_fisher_needs_a_table():
    with pytest.raises(ImpruneError, match="importance table"):
        plan_bits(_lm().model, None, 5.0, "4,8")


@pytest.fixture(scope="module")
def table_dir(tmp_path_factory, scored):
    path = tmp_path_factory.mktemp("scores") / "table"
    scored[1].save(path)
    return path


@pytest.mark.parametrize("extra, message", [
    (["--budget", "3.5"], "outside the widths"), (["--budget", "9"], "outside the widths"),
    (["--choices", "3,8"], "unsupported bit width"), (["--group-size", "96"], "does not divide"),
    (["--keep", "nothing.here"], "matches no module")])
def test_cli_refuses_bad_input(tmp_path, capsys, table_dir, extra, message):
    out = tmp_path / "q"
    args = ["quantize", "--model", "random:llama:hidden=128,intermediate=256", "--scores", str(table_dir),
            "--budget", "5", "--format", "quanto", "--no-eval", "--out", str(out), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_writes_a_reloadable_folder(tmp_path, table_dir):
    out = tmp_path / "q"
    args = ["quantize", "--model", "random:llama:hidden=128,intermediate=256", "--scores", str(table_dir),
            "--budget", "5", "--choices", "4,8", "--keep", "model.layers.0.mlp.*", "--format", "quanto",
            "--no-eval", "--quiet", "--out", str(out)]
    assert main(args) == 0
    assert {"model.safetensors", "quantization.json", "imprune.json", "bits.png", "config.json"} <= \
        {p.name for p in out.iterdir()}
    record = json.loads((out / "imprune.json").read_text())
    assert record["average_bits"] <= 5.0 and "model.layers.0.mlp.up_proj" in record["kept"]
    mem = record["memory"]
    assert mem["ratio"] == pytest.approx(mem["bytes"] / mem["float32_bytes"]) and mem["ratio"] < 0.75
    lm = load_quantized(out)
    assert weight_bytes(lm.model) == record["memory"]["bytes"]
    assert main(args) == 2  # exists: refused without --overwrite


def test_cli_fake_path_writes_a_plain_folder(tmp_path, table_dir):
    out = tmp_path / "f"
    assert main(["quantize", "--model", "random:gpt2", "--budget", "8", "--choices", "8", "--fake", "--format",
                 "quanto", "--no-eval", "--quiet", "--out", str(out)]) == 0
    again = load_model(str(out))
    ref = load_model("random:gpt2")
    plan = uniform_plan(ref.model, 8)
    fake_quantize_model_(ref.model, plan)
    ids = _windows(2, 12).input_ids
    assert torch.equal(_logits(again.model, ids), _logits(ref.model, ids))


@pytest.mark.integration
def test_smollm2_five_bits_fits_the_memory_target():
    from importance.data.sources import load_data

    lm = load_model("builtin:smollm2-135m")
    windows = load_data("austen:train", lm.tokenizer, seq_len=64, tokens=128)
    table = score(lm, windows, ["fisher"], elements=True, progress=False)
    plan = plan_bits(lm.model, table, 5.0, "4,8")
    assert plan.average_bits() <= 5.0
    fp32 = float32_bytes(lm.model)
    quantize_model_(lm.model, plan)
    assert weight_bytes(lm.model) <= 0.4 * fp32
