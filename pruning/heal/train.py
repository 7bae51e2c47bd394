"""The heal itself: train what ``pruning.heal.adapters`` attached, by distillation from the teacher and / or
the plain next-token loss, in a seeded order, with resumable checkpoints; then merge.

One step: windows ``order[s*b : (s+1)*b]`` of the training set (``order``: a seeded permutation per pass),
teacher logits without gradient, the student's, the loss over the positions whose next token is a target
(``Windows.loss_mask``), a clipped AdamW step at the scheduled rate (linear warm-up, cosine decay to 10%),
the masks re-applied. Everything random is seeded by the step, so a heal stopped after step k and resumed
from its checkpoint (trainable weights and optimizer moments, safetensors + JSON, never a pickle) ends with
the same weights as one that ran through.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from importance.arch.canonical import model_map
from importance.data.sources import Windows
from importance.errors import ImpruneError
from importance.models.load import LoadedModel
from importance.store.cache import atomic_file
from pruning.heal.adapters import Trainable, attach, block_linears, uniform_budget
from pruning.heal.config import HealConfig
from pruning.heal.placement import allocate_by_spectrum, allocate_ranks, gradient_spectra, layer_errors

CHECKPOINT_SCHEMA = "imprune.heal-checkpoint/1"


@dataclass
class HealResult:
    """What a heal did: the record imprune.json keeps under "heal"."""

    steps: int
    tokens: int
    seconds: float
    trainable: int
    kind: str
    curve: list[float]  # training loss of every step
    ranks: list[int] = field(default_factory=list)  # LoRA rank per layer (empty for full)
    module_ranks: dict[str, int] = field(default_factory=dict)  # LoRA rank of every block linear, by path
    layer_errors: list[float] | None = None  # the measured placement errors, when placement is importance
    resumed_from: int = 0
    heldout: dict[str, float] = field(default_factory=dict)  # the heal loss on held-out windows before / after
    settings: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return asdict(self)


def heal_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, input_ids: torch.Tensor,
              loss_mask: torch.Tensor, cfg: HealConfig) -> torch.Tensor:
    """Mean over target positions of the KL (teacher || student) at temperature T (x T^2), the next-token
    cross-entropy, or their weighted sum. Logits [B, T, V]; ids and mask [B, T]."""
    pos = loss_mask[:, 1:]  # [B, T-1]: position t predicts the target token t + 1
    s = student_logits[:, :-1][pos].float()  # [n, V]
    loss = s.new_zeros(())
    if cfg.loss in ("kd", "kd+lm"):
        t = teacher_logits[:, :-1][pos].float()
        temp = cfg.temperature
        loss = loss + F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), log_target=True,
                               reduction="batchmean") * temp * temp
    if cfg.loss in ("lm", "kd+lm"):
        loss = loss + (cfg.lm_weight if cfg.loss == "kd+lm" else 1.0) * F.cross_entropy(s, input_ids[:, 1:][pos])
    return loss


def learning_rate(step: int, cfg: HealConfig) -> float:
    """Linear warm-up over ``warmup`` of the steps, then cosine decay from the peak to 10% of it."""
    total, peak = cfg.total_steps(), cfg.peak_lr
    warm = math.ceil(cfg.warmup * total)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def batch_order(n: int, cfg: HealConfig) -> list[int]:
    """Window indices of every step, concatenated: one seeded permutation per pass over the windows."""
    need, order, epoch = cfg.total_steps() * cfg.batch_size, [], 0
    while len(order) < need:
        order += torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        epoch += 1
    return order[:need]


def _autocast(cfg: HealConfig, device: torch.device) -> contextlib.AbstractContextManager:
    on = cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda"
                                    and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


def plan_ranks(student: LoadedModel, teacher: LoadedModel | None, cfg: HealConfig, origin: list[int],
               windows: Windows | None) -> tuple[dict[str, int], list[int], list[float] | None]:
    """LoRA rank of every target path, the rank per layer and (importance placement) the measured errors."""
    targets = block_linears(student.model)
    n_layers = max(t.layer for t in targets) + 1
    costs = [sum(t.cost for t in targets if t.layer == j) for j in range(n_layers)]
    budget = cfg.budget if cfg.budget is not None else uniform_budget(targets, cfg.rank)
    largest = sum(min(t.fan_in, t.fan_out) * t.cost for t in targets)
    if budget > largest:
        raise ImpruneError(f"--budget {budget:,} is larger than the model's LoRA can take ({largest:,} parameters "
                           "at full rank on every block linear); lower --budget or --rank")
    errors = None
    if cfg.placement == "gradient":
        if windows is None or (teacher is None and cfg.loss != "lm"):
            raise ImpruneError("--placement gradient measures the heal loss's gradient: pass --teacher")
        spectra = gradient_spectra(student.model, targets, windows, lambda b: _batch_loss(student, teacher, b, cfg))
        ranks = allocate_by_spectrum({t.path: t.cost for t in targets}, spectra, cfg.rank, budget,
                                     floor=cfg.placement_floor)
        per_layer = [round(sum(ranks[t.path] * t.cost for t in targets if t.layer == j) / costs[j])
                     for j in range(n_layers)]  # the parameter-weighted mean rank of each layer
        return ranks, per_layer, None
    if cfg.placement == "importance":
        if teacher is None or windows is None:
            raise ImpruneError("--placement importance measures each layer against the teacher: pass --teacher")
        errors = layer_errors(student.model, teacher.model, windows, origin)
        per_layer = allocate_ranks(costs, errors, cfg.rank, budget, floor=cfg.placement_floor)
    else:
        per_layer = [cfg.rank] * n_layers if cfg.budget is None else \
            allocate_ranks(costs, [1.0] * n_layers, cfg.rank, budget, floor=1.0)  # equal ranks, budget-scaled
    per_layer = [min(r, min((min(t.fan_in, t.fan_out) for t in targets if t.layer == j), default=r))
                 for j, r in enumerate(per_layer)]
    return {t.path: per_layer[t.layer] for t in targets}, per_layer, errors


def heal(student: LoadedModel, teacher: LoadedModel | None, train: Windows, cfg: HealConfig,
         origin: list[int] | None = None, checkpoint: Path | None = None, placement: Windows | None = None,
         heldout: Windows | None = None) -> HealResult:
    """Heal ``student`` in place (module docstring): afterwards its weights are merged and plain. ``origin``:
    the teacher layer of each student layer (default identity); ``checkpoint``: a folder to resume from and save
    to; ``placement``: windows that measure the layer errors; ``heldout``: windows for the loss before / after."""
    if teacher is None and cfg.loss != "lm":
        raise ImpruneError(f"--loss {cfg.loss} distills from a teacher: pass --teacher, or use --loss lm")
    model = student.model
    origin = origin if origin is not None else list(range(model_map(model).n_layers))
    ranks: dict[str, int] = {}
    per_layer: list[int] = []
    errors = None
    if cfg.method == "lora":  # placement errors: on the first placement_windows training windows by default
        placement = placement if placement is not None else train.subset(range(min(len(train),
                                                                                    cfg.placement_windows)))
        ranks, per_layer, errors = plan_ranks(student, teacher, cfg, origin, placement)
    device = next(model.parameters()).device
    before = _heldout(student, teacher, heldout, cfg) if heldout is not None else None
    trainable = attach(model, cfg.method, ranks, cfg.seed)
    names = sorted(trainable.params)
    opt = torch.optim.AdamW([trainable.params[n] for n in names], lr=cfg.peak_lr, weight_decay=cfg.weight_decay)
    key = _key(cfg, train, origin)
    start, curve, spent = _resume(checkpoint, key, trainable, names, opt)
    order = batch_order(len(train), cfg)
    total = cfg.total_steps()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if teacher is not None:
        teacher.model.eval()
    model.train()
    began = time.perf_counter()
    bar = tqdm(total=total, initial=start, desc="heal", unit="step", disable=not cfg.progress, leave=False)
    try:
        for step in range(start, total):
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            batch = next(train.subset(idx).batches(len(idx))).to(device)
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, cfg)
            torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout, if the model has any
            loss = _batch_loss(student, teacher, batch, cfg)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([trainable.params[n] for n in names], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            trainable.after_step()
            curve.append(round(float(loss.detach()), 6))
            bar.update(1)
            bar.set_postfix(loss=f"{curve[-1]:.4f}")
            done = step + 1
            if checkpoint is not None and done < total and done % cfg.save_every == 0:
                _save(checkpoint, key, trainable, names, opt, done, curve, spent + time.perf_counter() - began)
    finally:
        bar.close()
        model.train(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    trainable.finish()
    for p in model.parameters():
        p.requires_grad_(False)
    seconds = spent + time.perf_counter() - began
    result = HealResult(total, total * cfg.batch_size * train.seq_len, round(seconds, 2), trainable.n_params,
                        trainable.kind, curve, per_layer, dict(ranks), errors, start, settings=cfg.key_settings())
    if heldout is not None and before is not None:
        result.heldout = {"before": before, "after": _heldout(student, teacher, heldout, cfg)}
    return result


def _batch_loss(student: LoadedModel, teacher: LoadedModel | None, batch: Any, cfg: HealConfig) -> torch.Tensor:
    """The heal loss of one batch (on the model's device): the teacher's logits without gradient, the
    student's with it (when gradients are enabled)."""
    with _autocast(cfg, batch.input_ids.device):
        t_logits = None
        if teacher is not None and cfg.loss != "lm":
            with torch.no_grad():
                t_logits = teacher.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                         use_cache=False).logits
        s_logits = student.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 use_cache=False).logits
        return heal_loss(s_logits, t_logits, batch.input_ids, batch.loss_mask, cfg)


@torch.no_grad()
def _heldout(student: LoadedModel, teacher: LoadedModel | None, windows: Windows, cfg: HealConfig) -> float:
    """The heal loss over ``windows`` (no gradient), weighted by target positions."""
    device = next(student.model.parameters()).device
    num = den = 0.0
    for batch in windows.batches(cfg.batch_size):
        n = int(batch.loss_mask[:, 1:].sum())
        num += float(_batch_loss(student, teacher, batch.to(device), cfg)) * n
        den += n
    return round(num / max(den, 1), 6)


# ------------------------------------------------------------------------------------------ checkpoints

def _key(cfg: HealConfig, train: Windows, origin: list[int]) -> str:
    import hashlib

    h = hashlib.sha256(json.dumps({**cfg.key_settings(), "origin": origin}, sort_keys=True).encode())
    h.update(train.input_ids.numpy().tobytes())
    return h.hexdigest()[:16]


def _save(folder: Path, key: str, trainable: Trainable, names: list[str], opt: torch.optim.Optimizer, step: int,
          curve: list[float], seconds: float) -> None:
    """Trainable weights and AdamW moments as safetensors, then the JSON that names them (written last)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"step": torch.tensor([step])}
    for n in names:
        p = trainable.params[n]
        tensors[f"param::{n}"] = p.detach().cpu().contiguous()
        state = opt.state.get(p, {})
        for moment in ("exp_avg", "exp_avg_sq"):
            if moment in state:
                tensors[f"{moment}::{n}"] = state[moment].detach().cpu().contiguous()
        if "step" in state:
            tensors[f"adam_step::{n}"] = torch.as_tensor(state["step"]).reshape(1).float()
    with atomic_file(folder / "state.safetensors", "wb") as tmp:
        save_file(tensors, str(tmp))
    with atomic_file(folder / "state.json") as tmp:
        tmp.write_text(json.dumps({"schema": CHECKPOINT_SCHEMA, "key": key, "step": step, "curve": curve,
                                   "seconds": round(seconds, 2)}))


def _resume(folder: Path | None, key: str, trainable: Trainable, names: list[str],
            opt: torch.optim.Optimizer) -> tuple[int, list[float], float]:
    """(first step, loss curve so far, seconds spent) from a checkpoint of the same heal; (0, [], 0) without."""
    if folder is None or not (folder / "state.json").is_file() or not (folder / "state.safetensors").is_file():
        return 0, [], 0.0
    from safetensors.torch import load_file

    try:
        meta = json.loads((folder / "state.json").read_text())
        tensors = load_file(str(folder / "state.safetensors"))
    except (OSError, ValueError, RuntimeError):  # unreadable: start afresh (the checkpoint is only ours)
        return 0, [], 0.0
    if not isinstance(meta, dict) or meta.get("schema") != CHECKPOINT_SCHEMA or meta.get("key") != key \
            or int(tensors.get("step", torch.tensor([-1]))[0]) != meta.get("step"):
        return 0, [], 0.0
    with torch.no_grad():
        for n in names:
            p = trainable.params[n]
            p.copy_(tensors[f"param::{n}"].to(p.device))
            if f"exp_avg::{n}" in tensors:
                opt.state[p] = {"step": tensors[f"adam_step::{n}"].reshape(()).clone(),
                                "exp_avg": tensors[f"exp_avg::{n}"].to(p.device),
                                "exp_avg_sq": tensors[f"exp_avg_sq::{n}"].to(p.device)}
    return int(meta["step"]), list(meta.get("curve", [])), float(meta.get("seconds", 0.0))
