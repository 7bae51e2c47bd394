"""What a heal trains, and how it goes back into plain weights: LoRA adapters or the kept weights themselves.

``block_linears`` lists every linear module of the blocks (through the canonical map, so fused and Conv1D
layouts need no special case here) with its zero pattern when pruning left one. ``attach`` makes one of:

* ``lora`` on dense weights: peft's LoRA (``LoraConfig`` with a rank per module), merged by peft at the end;
* ``lora`` where some weight is sparse: ``MaskedLoRA``, our own adapter whose update is ``mask * (B @ A)``,
  so the merged weight keeps every pruned zero and equals what was trained (peft's adapter adds a dense
  ``B @ A``: merging it would refill the zeros, masking it afterwards would change the trained function);
* ``full``: the block linears and norms train themselves; gradients and weights are masked after every step.

Every variant is a ``Trainable``: its named parameters (for the optimizer and the checkpoint), the per-step
``after_step`` and ``finish`` which merges and leaves a plain transformers model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from importance.arch.canonical import model_map
from importance.errors import ImpruneError

SPARSE = 0.01  # a weight with at least this share of exact zeros was pruned: its zeros are kept


@dataclass(eq=False)
class Target:
    """One block linear: ``path`` in the model, its fan in / out, Conv1D orientation and its zero pattern
    ``mask`` [out, in] (True = kept; None when the weight is dense)."""

    layer: int
    path: str
    module: nn.Module
    fan_in: int
    fan_out: int
    transposed: bool
    mask: torch.Tensor | None

    @property
    def cost(self) -> int:
        """Trainable parameters per LoRA rank: A [r, in] and B [out, r]."""
        return self.fan_in + self.fan_out


def block_linears(model: nn.Module) -> list[Target]:
    """Every distinct linear module of the blocks, in block order."""
    seen: set[int] = set()
    out = []
    for c in model_map(model).components():
        if c.kind != "linear" or id(c.module) in seen or not isinstance(getattr(c.module, "weight", None),
                                                                       torch.Tensor):
            continue
        seen.add(id(c.module))
        w = c.module.weight.detach()
        w = w.t() if c.transposed else w  # [out, in]
        zeros = float((w == 0).float().mean())
        out.append(Target(c.layer, _module_path(model, c.module), c.module, int(w.shape[1]), int(w.shape[0]),
                          c.transposed, (w != 0) if zeros >= SPARSE else None))
    if not out:
        raise ImpruneError("the model has no block linears to heal")
    return out


def _module_path(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def uniform_budget(targets: list[Target], rank: int) -> int:
    return rank * sum(t.cost for t in targets)


@dataclass
class Trainable:
    """The parameters a heal trains; ``after_step`` keeps zeros zero, ``finish`` merges into plain weights."""

    kind: str  # 'peft-lora' | 'masked-lora' | 'full'
    params: dict[str, nn.Parameter]
    ranks: dict[str, int] = field(default_factory=dict)  # module path -> LoRA rank (0: no adapter)
    after_step: Callable[[], None] = lambda: None
    finish: Callable[[], nn.Module] = lambda: None  # type: ignore[assignment,return-value]

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params.values())


def attach(model: nn.Module, method: str, ranks: dict[str, int] | None = None, seed: int = 0) -> Trainable:
    """Freeze ``model`` and attach what ``method`` trains (``ranks``: LoRA rank per target path)."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = block_linears(model)
    if method == "full":
        return _full(model, targets)
    ranks = ranks or {}
    torch.manual_seed(seed)  # adapter initialisation is part of the seeded result
    if any(t.mask is not None for t in targets):
        return _masked_lora(model, targets, ranks)
    return _peft_lora(model, targets, ranks)


# --------------------------------------------------------------------------------------------- LoRA

class MaskedLoRA(nn.Module):
    """``base(x) + x @ (scale * (B @ A) * mask)^T``: a LoRA update that never touches a pruned weight."""

    def __init__(self, base: nn.Module, target: Target, rank: int, alpha: float) -> None:
        super().__init__()
        self.base, self.transposed, self.scale = base, target.transposed, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, target.fan_in, device=base.weight.device))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(target.fan_out, rank, device=base.weight.device))  # [out, r]
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.register_buffer("mask", target.mask if target.mask is not None else None, persistent=False)

    def delta(self) -> torch.Tensor:
        d = self.scale * (self.lora_B @ self.lora_A)  # [out, in]
        return d * self.mask if self.mask is not None else d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(x, self.delta().to(x.dtype))

    @torch.no_grad()
    def merged(self) -> nn.Module:
        d = self.delta()
        self.base.weight.add_((d.t() if self.transposed else d).to(self.base.weight.dtype))
        return self.base


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _masked_lora(model: nn.Module, targets: list[Target], ranks: dict[str, int]) -> Trainable:
    wrapped: dict[str, MaskedLoRA] = {}
    for t in targets:
        r = ranks.get(t.path, 0)
        if r > 0:
            wrapped[t.path] = MaskedLoRA(t.module, t, r, alpha=2.0 * r)
            _set_module(model, t.path, wrapped[t.path])
    params = {f"{path}.{n}": p for path, m in wrapped.items() for n, p in (("lora_A", m.lora_A), ("lora_B", m.lora_B))}

    def finish() -> nn.Module:
        for path, m in wrapped.items():
            _set_module(model, path, m.merged())
        return model

    return Trainable("masked-lora", params, {t.path: ranks.get(t.path, 0) for t in targets}, finish=finish)


def _peft_lora(model: nn.Module, targets: list[Target], ranks: dict[str, int]) -> Trainable:
    try:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer
    except ImportError:
        raise ImpruneError("--method lora needs peft: pip install 'imprune[heal]' (or use --method full)") from None
    used = {t.path: ranks[t.path] for t in targets if ranks.get(t.path, 0) > 0}
    if not used:
        raise ImpruneError("the placement gave every layer rank 0; raise --rank or --budget")
    first = next(iter(used.values()))
    # exact module names as targets; rank / alpha per module (alpha = 2 x rank: the same scale everywhere)
    config = LoraConfig(r=first, lora_alpha=2 * first, lora_dropout=0.0, bias="none", target_modules=list(used),
                        rank_pattern={f"^{_escape(p)}$": r for p, r in used.items()},
                        alpha_pattern={f"^{_escape(p)}$": 2 * r for p, r in used.items()})
    inject_adapter_in_model(config, model)
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    for p in params.values():
        p.requires_grad_(True)

    def finish() -> nn.Module:
        for path in used:
            layer = model.get_submodule(path)
            if isinstance(layer, LoraLayer):
                layer.merge(safe_merge=True)
                _set_module(model, path, layer.get_base_layer())
        return model

    got = {p: int(model.get_submodule(p).r["default"]) for p in used}
    if got != used:
        raise ImpruneError("peft did not give every module its planned LoRA rank; upgrade peft (>= 0.13)")
    return Trainable("peft-lora", params, {t.path: used.get(t.path, 0) for t in targets}, finish=finish)


def _escape(path: str) -> str:
    return path.replace(".", r"\.")


# ----------------------------------------------------------------------------------------------- full

def _full(model: nn.Module, targets: list[Target]) -> Trainable:
    params: dict[str, nn.Parameter] = {}
    masks: list[tuple[nn.Parameter, torch.Tensor]] = []
    for t in targets:
        for name in ("weight", "bias"):
            p = getattr(t.module, name, None)
            if isinstance(p, nn.Parameter):
                p.requires_grad_(True)
                params[f"{t.path}.{name}"] = p
        if t.mask is not None:
            stored = t.mask.t() if t.transposed else t.mask  # the weight's own orientation
            masks.append((t.module.weight, stored))
            t.module.weight.register_hook(lambda g, m=stored: g * m)
    for c in model_map(model).components():
        if c.kind == "norm" and isinstance(getattr(c.module, c.param, None), nn.Parameter):
            p = getattr(c.module, c.param)
            p.requires_grad_(True)
            params[f"{_module_path(model, c.module)}.{c.param}"] = p

    @torch.no_grad()
    def after_step() -> None:  # weight decay and Adam's momentum would move a zero: put it back
        for p, m in masks:
            p.mul_(m)

    return Trainable("full", params, after_step=after_step, finish=lambda: model)
