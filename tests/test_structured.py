"""Structured pruning: heads (GQA-aware), MLP channels, width and layers, on tiny models of every mapped
architecture; removal is checked against zeroing, shapes against the plan, folders against reloading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from importance.arch.canonical import model_map
from importance.data.sources import Windows
from importance.errors import ImpruneError
from importance.models.load import load_model
from importance.models.pruned import load_pruned
from importance.scoring import score
from pruning.io import save_model
from pruning.methods.depth import prune_layers
from pruning.methods.structured import (
    LayerPlan,
    StructuredConfig,
    apply_plans,
    plan_structured,
    prune_structured,
)
from pruning.methods.surgery import cut_block, param_count

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "granite", "olmo2", "gpt2",
         "gpt_neox", "opt", "bert", "mixtral", "qwen3_moe", "qwen2_moe"]
DENSE_MLP = [a for a in ARCHS if a not in ("mixtral", "qwen3_moe", "qwen2_moe")]
MHA = ("gpt2", "gpt_neox", "opt", "bert")  # no GQA in the architecture


def _lm(model_type: str, layers: int = 2, attn: str | None = None):
    """8 query heads / 2 KV heads (groups of 4) where the architecture has GQA, 4 heads otherwise. ``attn``:
    'eager' runs transformers' plain attention, which repeats KV heads by ``num_key_value_groups`` (SDPA
    infers the grouping from the shapes, so only eager proves that count); None: the model's default."""
    extra = "" if model_type in MHA else ",heads=8,kv_heads=2"
    lm = load_model(f"random:{model_type}:layers={layers}{extra}")
    if attn:
        lm.model.set_attn_implementation(attn)
    with torch.no_grad():  # larger weights than the 0.02 init, so every head and channel matters
        for p in lm.model.parameters():
            if p.dim() >= 2:
                p.mul_(4)
    return lm


def _windows(n: int = 3, t: int = 12, seed: int = 0) -> Windows:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 250, (n, t), generator=g)
    att = torch.ones_like(ids)
    att[-1, -3:] = 0
    return Windows(ids, att, att.bool(), {"data": "test"})


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to float summation order (a matmul over fewer zero terms may round differently)."""
    assert a.shape == b.shape
    assert (a - b).abs().max() <= 1e-5 * a.abs().max().clamp_min(1.0), f"max diff {(a - b).abs().max():.3g}"


def _head_cols(heads: list[int], d: int) -> torch.Tensor:
    return (torch.tensor(heads).view(-1, 1) * d + torch.arange(d)).flatten()


def _plans(mm) -> list[LayerPlan]:
    """A different valid removal per layer: per-group in layer 0, a whole KV group (+ channels) in layer 1."""
    b = mm.blocks[0]
    g = b.n_heads // b.n_kv_heads
    chans = [1, 5, 6] if b.intermediate else []
    if g > 1:
        return [LayerPlan(0, heads=[j * g for j in range(b.n_kv_heads)]),
                LayerPlan(1, heads=list(range(g)), kv_heads=[0], channels=chans)]
    return [LayerPlan(0, heads=[1], kv_heads=[1]), LayerPlan(1, heads=[0, 2], kv_heads=[0, 2], channels=chans)]


# ----------------------------------------------------------------------------------------- removal == zeroing

@pytest.mark.parametrize("model_type", [a for a in ARCHS if a != "olmo2"])
def test_removing_heads_with_zeroed_outputs_leaves_logits_identical(model_type: str) -> None:
    # olmo2 is left out on purpose: its q_norm/k_norm normalise over the whole projection width, so removing
    # heads changes every remaining head's normalisation (see test_olmo2_full_width_qk_norms_are_cut)
    lm = _lm(model_type, attn="eager")
    mm = model_map(lm.model)
    plans = _plans(mm)
    for p in plans:
        o = mm.blocks[p.layer].components["attn.o"]
        cols = _head_cols(p.heads, mm.blocks[p.layer].head_dim)
        o.update_weight_(lambda w, cols=cols: w.index_fill(1, cols, 0.0))
    ids = _windows().input_ids
    dense = _logits(lm.model, ids)
    for p in plans:
        cut_block(mm, p.layer, p.heads, p.kv_heads)
    _same(_logits(lm.model, ids), dense)


@pytest.mark.parametrize("model_type", DENSE_MLP)
def test_removing_channels_with_zeroed_outputs_leaves_logits_identical(model_type: str) -> None:
    lm = _lm(model_type)
    mm = model_map(lm.model)
    drop = {0: [0, 3, 64, 127], 1: list(range(10, 50))}
    for layer, chans in drop.items():
        mm.blocks[layer].components["mlp.down"].update_weight_(lambda w, c=chans: w.index_fill(1, torch.tensor(c), 0))
    ids = _windows().input_ids
    dense = _logits(lm.model, ids)
    for layer, chans in drop.items():
        cut_block(mm, layer, channels=chans)
    _same(_logits(lm.model, ids), dense)
    after = model_map(lm.model)
    assert [b.intermediate for b in after.blocks] == [128 - 4, 128 - 40]


def test_olmo2_full_width_qk_norms_are_cut() -> None:
    lm = _lm("olmo2")
    mm = model_map(lm.model)
    cut_block(mm, 0, heads=[0, 4], kv_heads=[])  # one query head from each KV group of 4
    b = model_map(lm.model).blocks[0]
    assert b.components["norm.q"].numel == b.components["attn.q"].shape[0] == 6 * 16
    assert b.components["norm.k"].numel == b.components["attn.k"].shape[0] == 2 * 16
    assert _logits(lm.model, _windows().input_ids).isfinite().all()


# ----------------------------------------------------------------------------------------- GQA stays valid

@pytest.mark.parametrize("gqa, attn", [("per-group", "eager"), ("groups", "eager"), ("per-group", None)])
@pytest.mark.parametrize("model_type", ARCHS)
def test_head_pruning_keeps_attention_valid(model_type: str, gqa: str, attn: str | None) -> None:
    lm = _lm(model_type, attn=attn)
    before = model_map(lm.model).blocks[0]
    res = prune_structured(lm, StructuredConfig(0.3, "heads", criterion="magnitude", gqa=gqa), windows=_windows())
    mm = model_map(lm.model)
    for b in mm.blocks:
        rec = res.record["structured"]["layers"][str(b.index)]
        g0 = before.n_heads // before.n_kv_heads
        removed = rec["heads_removed"]
        per_group = [sum(1 for h in removed if h // g0 == j) for j in range(before.n_kv_heads)]
        if gqa == "per-group" and g0 > 1:  # the same number from every group, every KV head kept
            assert len(set(per_group)) == 1 and rec["kv_heads_removed"] == []
        else:  # whole groups: each removed KV head took all its query heads
            assert sorted(removed) == sorted(h for j in rec["kv_heads_removed"] for h in range(j * g0, (j + 1) * g0))
        assert b.n_heads == before.n_heads - len(removed) and b.n_heads % b.n_kv_heads == 0
        for m in b.module.modules():
            if hasattr(m, "num_key_value_groups"):
                assert m.num_key_value_groups == b.n_heads // b.n_kv_heads
    assert {b.n_heads for b in mm.blocks} < set(range(1, before.n_heads))  # something went, something stayed
    ids = _windows().input_ids
    assert _logits(lm.model, ids).isfinite().all()
    if lm.task == "causal-lm":  # the KV cache path (one cache layer per kept attention)
        out = lm.model.generate(ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert out.shape == (1, ids.shape[1] + 3)


# ----------------------------------------------------------------------------------------- plan == shapes

@pytest.mark.parametrize("model_type", ["llama", "phi3", "gpt2", "gpt_neox", "olmo2", "opt"])
def test_parameter_counts_match_the_plan_exactly(model_type: str) -> None:
    lm = _lm(model_type, layers=3)
    table = score(lm, _windows(), ["taylor"], progress=False)
    half = model_map(lm.model).blocks[0].n_heads // 2
    for cfg in (StructuredConfig(0.0, "heads", criterion="taylor", keep_heads=half, gqa="groups"),
                StructuredConfig(0.2, "heads", criterion="taylor", gqa="per-group"),
                StructuredConfig(0.25, "channels", criterion="taylor"),
                StructuredConfig(0.25, "width", criterion="taylor", allocation="uniform")):
        mm = model_map(lm.model)
        if cfg.keep_heads is None:
            table = score(lm, _windows(), ["taylor"], progress=False)  # the shapes changed: score them again
        plans = plan_structured(mm, table, cfg)
        per_layer = [sum(p.numel() for p in b.module.parameters()) for b in mm.blocks]
        before = param_count(lm.model)
        res = prune_structured(lm, cfg, table)
        assert res.record["params_plan"]["after"] == param_count(lm.model) == before - sum(p.params for p in plans)
        after = [sum(p.numel() for p in b.module.parameters()) for b in model_map(lm.model).blocks]
        assert [x - y for x, y in zip(per_layer, after, strict=True)] == [p.params for p in plans]
    blocks = model_map(lm.model).blocks
    assert all(b.n_heads <= half and b.intermediate < 128 for b in blocks)  # heads and channels were both cut


def test_width_split_follows_importance() -> None:
    lm = _lm("llama")
    mm = model_map(lm.model)
    table = score(lm, _windows(), ["magnitude"], progress=False)

    class Scaled:  # the same table with heads made nearly free (or very costly) to remove
        def __init__(self, head_scale: float) -> None:
            self.s = head_scale

        def has(self, scorer: str, gran: str) -> bool:
            return table.has(scorer, gran)

        def matrix(self, scorer: str, gran: str, *a, **k) -> torch.Tensor:
            m = table.matrix(scorer, gran)
            return m * self.s if gran in ("head", "kv_group") else m

    for allocation in ("uniform", "importance"):
        if allocation == "importance":
            pytest.importorskip("pruning.methods.allocate")
        cfg = StructuredConfig(0.2, "width", criterion="magnitude", allocation=allocation, band=0.0)
        cheap_heads = plan_structured(mm, Scaled(1e-6), cfg)
        costly_heads = plan_structured(mm, Scaled(1e6), cfg)
        assert all(p.heads for p in cheap_heads)
        assert all(not p.heads and p.channels for p in costly_heads)


# ----------------------------------------------------------------------------------------- save -> load

@pytest.mark.parametrize("model_type", ARCHS)
def test_non_uniform_widths_save_and_load_identically(model_type: str, tmp_path: Path) -> None:
    lm = _lm(model_type, layers=3)
    apply_plans(lm, _plans(model_map(lm.model)))
    ids = _windows().input_ids
    want = _logits(lm.model, ids)
    save_model(lm, tmp_path / "m", {"method": "test", "shapes_changed": True})
    record = json.loads((tmp_path / "m" / "imprune.json").read_text())
    assert record["reload"] == "importance.models.pruned.load_pruned" and record["layer_shapes"]["params"]
    again = load_model(str(tmp_path / "m"))  # load_model routes the folder through load_pruned
    assert torch.equal(_logits(again.model, ids), want)
    assert [(b.n_heads, b.n_kv_heads, b.intermediate) for b in model_map(again.model).blocks] == \
        [(b.n_heads, b.n_kv_heads, b.intermediate) for b in model_map(lm.model).blocks]


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "phi3", "gemma3_text", "olmo2"])
def test_uniform_widths_reload_with_plain_transformers(model_type: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    lm = _lm(model_type)
    res = prune_structured(lm, StructuredConfig(0.3, "width", criterion="magnitude", gqa="groups"),
                           windows=_windows())
    assert res.uniform
    ids = _windows().input_ids
    save_model(lm, tmp_path / "m", res.record)  # the record of a structured method says shapes_changed
    assert json.loads((tmp_path / "m" / "imprune.json").read_text())["reload"] == "transformers.from_pretrained"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.equal(_logits(plain, ids), _logits(lm.model, ids))


def test_gpt2_uniform_heads_need_load_pruned(tmp_path: Path) -> None:
    # GPT-2's config ties head_dim to hidden / n_head, so fewer heads cannot be written into it
    lm = _lm("gpt2")
    prune_structured(lm, StructuredConfig(0.0, "heads", criterion="magnitude", keep_heads=2), windows=_windows())
    save_model(lm, tmp_path / "m", {"method": "heads", "shapes_changed": True})
    assert lm.model.config.n_head == 4
    ids = _windows().input_ids
    assert torch.equal(_logits(load_pruned(tmp_path / "m"), ids), _logits(lm.model, ids))


# ----------------------------------------------------------------------------------------- layers

@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "qwen2_moe", "gpt2"])
def test_layer_removal_updates_config_and_reloads(model_type: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    lm = _lm(model_type, layers=4)
    table = score(lm, _windows(), ["block_influence"], progress=False)
    types = list(getattr(lm.model.config, "layer_types", None) or [])
    scores = table.layer_scores("block_influence")
    lowest = sorted(range(4), key=lambda i: float(scores[i]))[:2]
    res = prune_layers(lm, 0.5, "block_influence", table)
    keep = [i for i in range(4) if i not in lowest]
    assert res.record["structured"]["layers_kept"] == keep
    cfg = lm.model.config
    assert cfg.num_hidden_layers == 2
    if types:
        assert list(cfg.layer_types) == [types[i] for i in keep]
    mm = model_map(lm.model)
    assert [m.layer_idx for b in mm.blocks for m in b.module.modules() if hasattr(m, "layer_idx")] == \
        sorted(m.layer_idx for b in mm.blocks for m in b.module.modules() if hasattr(m, "layer_idx"))
    assert res.record["params_plan"]["after"] == param_count(lm.model)
    ids = _windows().input_ids
    save_model(lm, tmp_path / "m", {"method": "layers", "shapes_changed": True})
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.equal(_logits(plain, ids), _logits(lm.model, ids))
    out = plain.generate(ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, ids.shape[1] + 3)


def test_layer_removal_refuses_removing_every_layer() -> None:
    lm = _lm("llama")
    with pytest.raises(ImpruneError, match="removes all 2 layers"):
        prune_layers(lm, 0.8, "block_influence", windows=_windows())


# ----------------------------------------------------------------------------------------- bias compensation

@torch.no_grad()
def _mean_output(module, model, ids: torch.Tensor) -> torch.Tensor:
    got = []
    h = module.register_forward_hook(lambda m, a, out: got.append(out.reshape(-1, out.shape[-1]).mean(0)))
    try:
        model(input_ids=ids)
    finally:
        h.remove()
    return got[0]


@pytest.mark.parametrize("compensate", [True, False])
@pytest.mark.parametrize("part, comp, flag", [("channels", "mlp.down", "mlp_bias"),
                                              ("heads", "attn.o", "attention_bias")])
def test_bias_compensation_keeps_the_mean_output(part: str, comp: str, flag: str, compensate: bool,
                                                 tmp_path: Path) -> None:
    lm = _lm("llama")
    w = Windows(_windows().input_ids, torch.ones(3, 12, dtype=torch.long), torch.ones(3, 12, dtype=torch.bool), {})
    module = model_map(lm.model).blocks[0].components[comp].module
    dense = _mean_output(module, lm.model, w.input_ids)  # layer 0's inputs do not change when its widths do
    res = prune_structured(lm, StructuredConfig(0.3, part, criterion="magnitude", bias_compensation=compensate),
                           windows=w)
    assert res.record["structured"]["layers"]["0"]["heads_removed" if part == "heads" else "channels_removed"]
    pruned = _mean_output(model_map(lm.model).blocks[0].components[comp].module, lm.model, w.input_ids)
    close = torch.allclose(pruned, dense, atol=1e-5 * float(dense.abs().max()))
    assert close == compensate
    if compensate:  # the bias lives in the config now: plain from_pretrained keeps it
        from transformers import AutoModelForCausalLM

        assert getattr(lm.model.config, flag)
        assert res.record["params_plan"]["after"] == param_count(lm.model)
        save_model(lm, tmp_path / "m", {"method": part, "shapes_changed": True})
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
        assert torch.equal(_logits(plain, w.input_ids), _logits(lm.model, w.input_ids))


def test_bias_compensation_without_a_bias_flag_is_refused_before_any_change() -> None:
    lm = _lm("phi3")  # phi3's o_proj / down_proj have no bias and its config no flag to add one
    before = param_count(lm.model)
    with pytest.raises(ImpruneError, match="drop --bias-compensation"):
        prune_structured(lm, StructuredConfig(0.3, "channels", criterion="magnitude", bias_compensation=True),
                         windows=_windows())
    assert param_count(lm.model) == before


# ----------------------------------------------------------------------------------------- bad input (CLI)

@pytest.mark.parametrize("argv, message", [
    (["--method", "heads", "--heads", "3", "--sparsity", "0.2"], "--heads 3 would break the KV grouping"),
    (["--method", "layers", "--sparsity", "0.8"], "removes all 2 layers"),
    (["--method", "width", "--sparsity", "1.5"], "outside [0, 1)"),
    (["--method", "channels", "--sparsity", "0.2", "--band", "-1", "--allocation", "importance"], "--band"),
    (["--method", "heads", "--sparsity", "0.2", "--criterion", "block_influence"], "whole layers only"),
    (["--method", "width", "--sparsity", "0.2", "--criterion", "removal"], "whole layers only"),
    (["--method", "layers", "--sparsity", "0.5", "--criterion", "wanda"], "unknown --criterion 'wanda'"),
    (["--method", "layers", "--sparsity", "0.5", "--heads", "2"], "does not apply"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv: list[str], message: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from pruning.cli.core import main

    out = tmp_path / "out"
    code = main(["prune", "--model", "random:llama", "--no-eval", "--quiet", "--tokens", "64", "--seq-len", "32",
                 "--out", str(out), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("criterion", ["residual_fisher", "removal"])
def test_cli_layers_by_a_layer_only_scorer_removes_its_lowest_layer(criterion: str, tmp_path: Path) -> None:
    from pruning.cli.core import main

    out = tmp_path / "out"
    code = main(["prune", "--model", "random:llama", "--method", "layers", "--sparsity", "0.5", "--criterion",
                 criterion, "--no-eval", "--quiet", "--tokens", "64", "--seq-len", "32", "--out", str(out)])
    assert code == 0
    record = json.loads((out / "imprune.json").read_text())["structured"]
    scores = record["layer_scores"]
    assert record["criterion"] == criterion and len(scores) == 2 and all(v > 0 for v in scores)
    assert record["layers_removed"] == [min(range(2), key=scores.__getitem__)]


def test_cli_width_writes_a_folder_that_reloads(tmp_path: Path) -> None:
    from pruning.cli.core import main

    out = tmp_path / "out"
    code = main(["prune", "--model", "random:llama", "--method", "width", "--sparsity", "0.3", "--criterion",
                 "magnitude", "--no-eval", "--quiet", "--tokens", "64", "--seq-len", "32", "--out", str(out)])
    assert code == 0
    record = json.loads((out / "imprune.json").read_text())
    again = load_model(str(out))
    assert record["params"]["after"] == param_count(again.model) == record["params_plan"]["after"]


# ----------------------------------------------------------------------------------------- integration

@pytest.mark.integration
@pytest.mark.parametrize("method, sparsity", [("width", 0.2), ("layers", 0.25)])
def test_smollm2_prunes_reloads_and_generates(method: str, sparsity: float, tmp_path: Path) -> None:
    from importance.data.sources import load_data

    lm = load_model("builtin:smollm2-135m")
    windows = load_data("austen:train", lm.tokenizer, seq_len=64, samples=2)
    if method == "width":
        res = prune_structured(lm, StructuredConfig(sparsity, "width"), windows=windows)
    else:
        res = prune_layers(lm, sparsity, "block_influence", windows=windows)
    assert res.record["params_plan"]["after"] == param_count(lm.model)
    save_model(lm, tmp_path / "m", res.record)
    again = load_model(str(tmp_path / "m"))
    ids = again.tokenizer("It is a truth universally acknowledged", return_tensors="pt").input_ids
    out = again.model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8
    assert again.tokenizer.decode(out[0, ids.shape[1]:]).strip()
