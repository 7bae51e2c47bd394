"""Healing (``pruning.heal``) on tiny random models: the loss, the placement, sparsity kept, reload, resume."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import fresh, random_windows

from importance.errors import ImpruneError
from pruning.heal import train as heal_train
from pruning.heal.adapters import block_linears, uniform_budget
from pruning.heal.config import HealConfig, check_config
from pruning.heal.placement import allocate_by_spectrum, allocate_ranks, gradient_spectra, layer_errors
from pruning.heal.train import HealResult, heal, heal_loss, plan_ranks

SEQ = 32


def _cfg(**kw) -> HealConfig:
    base = dict(tokens=SEQ * 16, seq_len=SEQ, batch_size=4, rank=4, progress=False, save_every=2)
    return HealConfig(**{**base, **kw})


def _sparsify(lm, share: float = 0.5, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in block_linears(lm.model):
            w = t.module.weight
            w.mul_((torch.rand(w.shape, generator=gen) >= share).to(w.dtype))


def _damage(lm, layer: int | None = None, factor: float = 0.6) -> None:
    """Scale the block linears (of one layer, or all) so the student differs from its teacher without zeros."""
    with torch.no_grad():
        for t in block_linears(lm.model):
            if layer is None or t.layer == layer:
                t.module.weight.mul_(factor)


def _zeros(lm) -> list[torch.Tensor]:
    return [(t.module.weight == 0).clone() for t in block_linears(lm.model)]


def _windows(n: int = 16, seed: int = 0):
    return random_windows(n, SEQ, seed=seed)


# ------------------------------------------------------------------------------------------------- the loss

def test_heal_loss_matches_an_independent_kl_and_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    ids = torch.randint(0, 7, (2, 5), generator=gen)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False  # targets 3 and 4 of the second window are padding
    pos = [(b, i) for b in range(2) for i in range(4) if mask[b, i + 1]]
    temp = 2.0
    kl = ce = 0.0
    for b, i in pos:
        p, q = torch.softmax(t[b, i] / temp, -1), torch.softmax(s[b, i] / temp, -1)
        kl += float((p * (p.log() - q.log())).sum())
        ce += -float(torch.log_softmax(s[b, i], -1)[ids[b, i + 1]])
    kd = heal_loss(s, t, ids, mask, _cfg(loss="kd", temperature=temp))
    lm = heal_loss(s, t, ids, mask, _cfg(loss="lm"))
    both = heal_loss(s, t, ids, mask, _cfg(loss="kd+lm", temperature=temp, lm_weight=0.5))
    assert math.isclose(float(kd), kl / len(pos) * temp**2, rel_tol=1e-5)
    assert math.isclose(float(lm), ce / len(pos), rel_tol=1e-5)
    assert math.isclose(float(both), float(kd) + 0.5 * float(lm), rel_tol=1e-5)


def test_lm_loss_equals_the_models_own_label_loss() -> None:
    lm = fresh("llama")
    w = _windows(2)
    logits = lm.model(input_ids=w.input_ids).logits
    ours = heal_loss(logits, None, w.input_ids, w.loss_mask, _cfg(loss="lm"))
    theirs = lm.model(input_ids=w.input_ids, labels=w.input_ids).loss
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_schedule_warms_up_then_decays_to_a_tenth() -> None:
    cfg = _cfg(steps=40, warmup=0.1, lr=1e-3)
    rates = [heal_train.learning_rate(s, cfg) for s in range(40)]
    assert rates[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert all(a >= b for a, b in zip(rates[3:], rates[4:]))
    assert rates[-1] == pytest.approx(1e-4, rel=0.02)


# --------------------------------------------------------------------------------------------- placement

def test_allocate_ranks_exact_cases() -> None:
    assert allocate_ranks([10, 10, 10, 10], [1, 1, 1, 1], rank=4) == [4, 4, 4, 4]
    assert allocate_ranks([10, 10, 10, 10], [3, 1, 0, 0], rank=4) == [12, 4, 0, 0]
    assert allocate_ranks([10, 10, 10, 10], [3, 1, 0, 0], rank=4, floor=0.5) == [8, 4, 2, 2]  # half uniform
    assert allocate_ranks([10, 20], [5, 0], rank=4, floor=1.0) == [4, 4]  # floor 1: the uniform placement
    capped = allocate_ranks([10, 10, 10, 10], [100, 1, 1, 1], rank=4, cap=2.0)  # 8 at the cap, 8 shared
    assert capped[0] == 8 and sum(capped) == 16 and sorted(capped[1:]) == [2, 3, 3]


@pytest.mark.parametrize("seed", range(6))
def test_allocated_ranks_use_the_budget_and_never_exceed_it(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    costs = torch.randint(50, 400, (7,), generator=gen).tolist()
    errors = torch.rand(7, generator=gen).tolist()
    ranks = allocate_ranks(costs, errors, rank=8)
    spent = sum(r * c for r, c in zip(ranks, costs))
    assert spent <= 8 * sum(costs)
    assert 8 * sum(costs) - spent < max(costs)  # not one more layer's rank would have fit
    assert max(ranks) <= 32


def test_layer_errors_are_zero_for_the_teacher_itself_and_local_to_the_damaged_layer() -> None:
    teacher = fresh("llama", scale=0.05)
    w = _windows(4)
    assert layer_errors(copy.deepcopy(teacher.model), teacher.model, w, [0, 1]) == pytest.approx([0.0, 0.0],
                                                                                                 abs=1e-10)
    student = copy.deepcopy(teacher)
    _damage(student, layer=1)
    errors = layer_errors(student.model, teacher.model, w, [0, 1])
    assert errors[0] == pytest.approx(0.0, abs=1e-10) and errors[1] > 1e-3  # block 0 is fed the teacher's stream


def test_a_block_before_a_removed_one_must_stand_in_for_it() -> None:
    teacher = fresh("llama", scale=0.05)
    w = _windows(4)
    student = copy.deepcopy(teacher)
    del student.model.model.layers[1]
    student.model.config.num_hidden_layers = 1
    err = layer_errors(student.model, teacher.model, w, [0])[0]
    # independent: the teacher's own stream after block 0 and after block 1 (hooks on the teacher's blocks)
    outs = []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for b in teacher.model.model.layers]
    with torch.no_grad():
        teacher.model(input_ids=w.input_ids)
    for h in hooks:
        h.remove()
    h0_in = None
    grab = teacher.model.model.layers[0].register_forward_pre_hook(
        lambda m, a, k: outs.append(a[0] if a else k["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        teacher.model(input_ids=w.input_ids)
    grab.remove()
    h0_in = outs[-1]
    after0, after1 = outs[0], outs[1]
    want = float(((after0 - after1) ** 2).sum() / ((after1 - h0_in) ** 2).sum())
    assert err == pytest.approx(want, rel=1e-4)


def test_importance_placement_spends_the_uniform_budget() -> None:
    teacher = fresh("llama", scale=0.05)
    student = copy.deepcopy(teacher)
    _damage(student, layer=0, factor=0.3)
    targets = block_linears(student.model)
    ranks, per_layer, errors = plan_ranks(student, teacher, _cfg(placement="importance", rank=4), [0, 1], _windows(4))
    costs = [sum(t.cost for t in targets if t.layer == j) for j in range(2)]
    assert errors[0] > errors[1] and per_layer[0] > per_layer[1]
    assert sum(r * c for r, c in zip(per_layer, costs)) <= uniform_budget(targets, 4)
    assert uniform_budget(targets, 4) - sum(r * c for r, c in zip(per_layer, costs)) < max(costs)
    assert all(ranks[t.path] == per_layer[t.layer] for t in targets)


def test_uniform_placement_under_a_budget_gives_every_layer_the_same_rank() -> None:
    lm = fresh("llama")
    mlp = lm.model.model.layers[1].mlp  # a width-pruned layer: half its MLP channels, so it costs less per rank
    keep = mlp.up_proj.out_features // 2
    for name, shape in (("gate_proj", (keep, mlp.gate_proj.in_features)), ("up_proj", (keep, mlp.up_proj.in_features)),
                        ("down_proj", (mlp.down_proj.out_features, keep))):
        setattr(mlp, name, torch.nn.Linear(shape[1], shape[0], bias=False))
    targets = block_linears(lm.model)
    costs = [sum(t.cost for t in targets if t.layer == j) for j in range(2)]
    assert costs[0] > costs[1]
    _, per_layer, _ = plan_ranks(lm, None, _cfg(budget=uniform_budget(targets, 4)), [0, 1], None)
    assert per_layer == [4, 4]
    _, per_layer, _ = plan_ranks(lm, None, _cfg(budget=uniform_budget(targets, 2)), [0, 1], None)
    assert per_layer == [2, 2]


def test_allocate_by_spectrum_exact_cases() -> None:
    spectra = {"a": torch.tensor([3.0, 2.0, 0.5]), "b": torch.tensor([1.5, 0.1, 0.05])}
    # sigma^2 / cost: a 0.3, 0.133, 0.008; b 0.225, 0.001, 0.00025; a2 (cost 30) no longer fits at the end
    assert allocate_by_spectrum({"a": 30, "b": 10}, spectra, rank=2, budget=80, floor=0.0) == {"a": 2, "b": 2}
    assert allocate_by_spectrum({"a": 10, "b": 10}, spectra, rank=2, budget=40, floor=0.0) == {"a": 3, "b": 1}
    assert allocate_by_spectrum({"a": 10, "b": 10}, spectra, rank=2, budget=40, floor=1.0) == {"a": 2, "b": 2}
    assert allocate_by_spectrum({"a": 10, "b": 10}, spectra, rank=1, budget=40, cap=2.0, floor=0.0) == \
        {"a": 2, "b": 2}  # the cap (2 x rank) stops a at 2
    with pytest.raises(ImpruneError, match="floor"):
        allocate_by_spectrum({"a": 10, "b": 10}, spectra, rank=4, budget=20, floor=1.0)


@pytest.mark.parametrize("placement", ["importance", "gradient"])
def test_a_rank_placement_with_a_full_fine_tune_is_one_line_naming_it(placement: str) -> None:
    check_config(HealConfig(method="full"))  # uniform (the default) is what a full fine-tune is
    with pytest.raises(ImpruneError, match=f"--placement {placement} and --budget place LoRA ranks.*--method lora"):
        check_config(HealConfig(method="full", placement=placement))


def test_gradient_spectra_are_the_singular_values_of_the_masked_loss_gradient() -> None:
    lm = fresh("llama", scale=0.05)
    _sparsify(lm, 0.5)
    targets = block_linears(lm.model)
    w = _windows(4)
    loss_of = lambda b: lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float().pow(2).mean()
    flags = [p.requires_grad for p in lm.model.parameters()]
    spectra = gradient_spectra(lm.model, targets, w, loss_of, batch_size=2)
    assert [p.requires_grad for p in lm.model.parameters()] == flags
    assert all(p.grad is None for p in lm.model.parameters())
    weights = [t.module.weight for t in targets]
    for x in weights:
        x.requires_grad_(True)
    grads = [torch.zeros_like(x) for x in weights]
    for b in w.batches(2):  # independent: autograd.grad batch by batch, masked afterwards
        for g, d in zip(grads, torch.autograd.grad(loss_of(b), weights), strict=True):
            g += d
    for t, g in zip(targets, grads, strict=True):
        g = g.T if t.transposed else g
        masked = g * t.mask if t.mask is not None else g
        assert t.mask is not None and torch.allclose(spectra[t.path], torch.linalg.svdvals(masked), rtol=1e-4,
                                                     atol=1e-9)


def test_gradient_placement_spends_the_budget_per_module_and_keeps_the_zeros() -> None:
    teacher = fresh("llama", scale=0.05)
    student = copy.deepcopy(teacher)
    _sparsify(student, 0.5)
    _damage(student, layer=1, factor=0.5)
    targets = block_linears(student.model)
    budget = uniform_budget(targets, 4)
    ranks, per_layer, _ = plan_ranks(student, teacher, _cfg(placement="gradient", rank=4), [0, 1], _windows(4))
    spent = sum(ranks[t.path] * t.cost for t in targets)
    assert spent <= budget and budget - spent < max(t.cost for t in targets)
    assert len(set(ranks.values())) > 1 and min(ranks.values()) >= 2  # unequal, above the floor (half of 4)
    zeros = _zeros(student)
    result = heal(student, teacher, _windows(8), _cfg(placement="gradient", rank=4))
    assert [torch.equal(a, b) for a, b in zip(zeros, _zeros(student), strict=True)] == [True] * len(zeros)
    assert set(result.module_ranks) == {t.path for t in targets}  # the record says which module got which rank
    assert sum(result.module_ranks[t.path] * t.cost for t in targets) == result.trainable <= budget


def test_a_budget_larger_than_the_model_is_refused() -> None:
    lm = fresh("llama")
    with pytest.raises(ImpruneError, match="larger than the model"):
        plan_ranks(lm, None, _cfg(budget=10**9), [0, 1], None)


# ------------------------------------------------------------------------------------------------ healing

@pytest.mark.parametrize("method", ["lora", "full"])
def test_heal_lowers_the_distillation_loss_on_held_out_windows(method: str, text_file: Path) -> None:
    from importance.data.sources import load_data

    teacher = fresh("llama", scale=0.05)
    student = copy.deepcopy(teacher)
    _damage(student)
    text = load_data(str(text_file), teacher.tokenizer, seq_len=SEQ, samples=24, seed=0)  # text generalises
    train, held = text.subset(range(16)), text.subset(range(16, 24))
    cfg = _cfg(method=method, steps=24, lr=1e-2 if method == "lora" else 1e-3)
    result = heal(student, teacher, train, cfg, heldout=held)
    assert result.heldout["after"] < 0.6 * result.heldout["before"], result.heldout
    assert result.steps == 24 and len(result.curve) == 24 and result.tokens == 24 * 4 * SEQ


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_healed_sparse_model_keeps_exactly_its_zeros(method: str) -> None:
    teacher = fresh("llama", scale=0.05)
    student = copy.deepcopy(teacher)
    _sparsify(student)
    zeros = _zeros(student)
    res = heal(student, teacher, _windows(8), _cfg(method=method, steps=6, lr=1e-2, weight_decay=0.1))
    assert res.kind == ("masked-lora" if method == "lora" else "full")
    assert all(torch.equal(a, b) for a, b in zip(zeros, _zeros(student)))
    changed = [not torch.equal(t.module.weight, s.module.weight)
               for t, s in zip(block_linears(teacher.model), block_linears(student.model))]
    assert all(changed)  # and the kept weights did train


@pytest.mark.parametrize("sparse", [False, True], ids=["peft", "masked"])
def test_the_merged_model_reloads_in_plain_transformers_with_the_same_logits(sparse: bool, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    teacher = fresh("llama", scale=0.05)
    student = copy.deepcopy(teacher)
    (_sparsify if sparse else _damage)(student)
    res = heal(student, teacher, _windows(8), _cfg(steps=4, lr=1e-2))
    assert res.kind == ("masked-lora" if sparse else "peft-lora")
    assert all(type(t.module).__name__ == "Linear" for t in block_linears(student.model))  # adapters merged away
    student.model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = _windows(2, seed=3).input_ids
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, student.model(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(again(input_ids=ids).logits, teacher.model(input_ids=ids).logits, atol=1e-3)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_an_interrupted_heal_resumes_and_ends_where_an_uninterrupted_one_ends(method: str, tmp_path: Path,
                                                                                monkeypatch) -> None:
    teacher = fresh("llama", scale=0.05)
    pruned = copy.deepcopy(teacher)
    _sparsify(pruned)
    cfg = _cfg(method=method, steps=8, save_every=3, lr=5e-3)
    straight = copy.deepcopy(pruned)
    full_run = heal(straight, teacher, _windows(16), cfg)

    real_save = heal_train._save
    calls = []

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(args[5])
        raise KeyboardInterrupt  # killed right after the checkpoint of step 3

    monkeypatch.setattr(heal_train, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        heal(copy.deepcopy(pruned), teacher, _windows(16), cfg, checkpoint=tmp_path / "ckpt")
    monkeypatch.setattr(heal_train, "_save", real_save)
    resumed_model = copy.deepcopy(pruned)
    resumed = heal(resumed_model, teacher, _windows(16), cfg, checkpoint=tmp_path / "ckpt")
    assert calls == [3] and resumed.resumed_from == 3
    assert resumed.curve == pytest.approx(full_run.curve, rel=1e-5)
    for a, b in zip(straight.model.parameters(), resumed_model.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path: Path, monkeypatch) -> None:
    teacher = fresh("llama", scale=0.05)
    student = copy.deepcopy(teacher)
    _damage(student)
    heal(copy.deepcopy(student), teacher, _windows(16), _cfg(steps=4, save_every=2), checkpoint=tmp_path)
    assert (tmp_path / "state.json").is_file()
    other = heal(copy.deepcopy(student), teacher, _windows(16), _cfg(steps=4, save_every=2, lr=2e-3),
                 checkpoint=tmp_path)
    assert other.resumed_from == 0


def test_result_record_is_plain_json() -> None:
    import json

    r = HealResult(1, 32, 0.1, 10, "full", [1.0])
    assert json.loads(json.dumps(r.record()))["curve"] == [1.0]


def test_loss_mask_excludes_padding_targets() -> None:
    s = torch.randn(1, 4, 5)
    ids = torch.tensor([[1, 2, 3, 0]])
    mask = torch.tensor([[False, True, True, False]])
    cfg = _cfg(loss="lm")
    want = F.cross_entropy(s[0, :2], ids[0, 1:3])
    assert torch.allclose(heal_loss(s, None, ids, mask, cfg), want)
