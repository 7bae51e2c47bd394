"""Settings of one heal (``HealConfig``) and the flags that set them, shared by ``imprune heal`` and the
``method: heal`` step of a recipe (``HEAL_ARGS``): one declaration, one check (``heal_config``).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from typing import Any

from importance.errors import ImpruneError
from pruning.methods.registry import Arg, arg

METHODS = ("lora", "full")
LOSSES = ("kd", "lm", "kd+lm")
PLACEMENTS = ("uniform", "importance", "gradient")
DEFAULT_LR = {"lora": 1e-3, "full": 5e-5}


@dataclass(frozen=True)
class HealConfig:
    """What a heal does; every field changes the result except ``save_every`` and ``progress``."""

    tokens: int = 65536  # training tokens (whole windows of seq_len), one pass in a seeded order
    seq_len: int = 256
    batch_size: int = 4  # windows per optimizer step
    steps: int | None = None  # optimizer steps; default one pass over the windows (more: further seeded passes)
    method: str = "lora"  # lora: adapters on the block linears, merged at the end | full: the kept weights
    loss: str = "kd"  # kd: KL(teacher || student) | lm: next-token cross-entropy | kd+lm: their sum
    temperature: float = 1.0  # of the distillation softmax (the KL is scaled by T^2)
    lm_weight: float = 1.0  # weight of the LM term in kd+lm
    lr: float | None = None  # peak learning rate (default: DEFAULT_LR[method])
    warmup: float = 0.05  # share of the steps with a linear warm-up, then cosine decay to 10% of the peak
    weight_decay: float = 0.0
    rank: int = 8  # LoRA rank of the uniform placement; it sets the trainable-parameter budget
    budget: int | None = None  # trainable LoRA parameters (default: what rank `rank` on every linear takes)
    placement: str = "uniform"  # uniform | importance (per layer, by error) | gradient (per module)
    placement_windows: int = 4  # calibration windows that measure each layer's error for the placement
    placement_floor: float = 0.5  # share of the budget the importance placement spreads uniformly
    seed: int = 0
    gradient_checkpointing: bool = False
    autocast: str = "auto"  # auto: bf16 on a CUDA device that supports it, off on CPU | bf16 | off
    save_every: int = 16  # steps between resumable checkpoints
    progress: bool = True

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def windows(self) -> int:
        return self.tokens // self.seq_len

    def total_steps(self) -> int:
        return self.steps if self.steps is not None else math.ceil(self.windows() / self.batch_size)

    def key_settings(self) -> dict[str, Any]:
        """What decides the healed weights (a checkpoint or a run stage is reused only for the same)."""
        d = asdict(self)
        for name in ("save_every", "progress"):
            d.pop(name)
        d["lr"] = self.peak_lr
        return d


# the flags, spelled once: `imprune heal` declares them all; a recipe's heal step takes the same names without
# '--' ("method" is the step's own key there, so the heal method is `heal-method`)
HEAL_ARGS: tuple[Arg, ...] = (
    arg("--method", dest="heal_method", default="lora", choices=list(METHODS),
        help="lora: peft LoRA on the block linears, merged at the end (a masked LoRA of imprune's own on sparse "
             "weights, so every pruned weight stays zero) | full: fine-tune the kept weights (zeros stay zero)"),
    arg("--loss", default="kd", choices=list(LOSSES),
        help="kd: distill the teacher's next-token distribution | lm: plain next-token loss | kd+lm: both"),
    arg("--temperature", type=float, default=1.0, help="distillation temperature (KL scaled by T^2)"),
    arg("--lm-weight", type=float, default=1.0, help="weight of the LM term in --loss kd+lm"),
    arg("--lr", type=float, default=None, help="peak learning rate (default 1e-3 for lora, 5e-5 for full)"),
    arg("--warmup", type=float, default=0.05, help="share of the steps warming up linearly (then cosine decay)"),
    arg("--weight-decay", type=float, default=0.0),
    arg("--steps", dest="heal_steps", type=int, default=None, metavar="N",
        help="optimizer steps (default: one pass over --tokens; more repeat the windows in a new order)"),
    arg("--tokens", dest="heal_tokens", type=int, default=65536, metavar="N",
        help="training tokens: --tokens / --seq-len windows of the data"),
    arg("--batch-size", dest="heal_batch_size", type=int, default=4, metavar="N", help="windows per optimizer step"),
    arg("--rank", type=int, default=8, help="LoRA rank of the uniform placement (sets the parameter budget)"),
    arg("--budget", type=int, default=None,
        help="trainable LoRA parameters (default: rank --rank on every block linear)"),
    arg("--placement", default="uniform", choices=list(PLACEMENTS),
        help="uniform: rank --rank everywhere | importance: the same budget, ranks per layer by how far each "
             "pruned layer's output is from the teacher's (measured on calibration windows) | gradient: the same "
             "budget, ranks per module where the heal loss's gradient has most to gain per parameter"),
    arg("--placement-floor", type=float, default=0.5,
        help="share of the budget --placement importance / gradient still spreads as uniform does"),
    arg("--gradient-checkpointing", action="store_true", help="recompute activations in backward (less memory)"),
    arg("--autocast", default="auto", choices=["auto", "bf16", "off"],
        help="auto: bf16 autocast on a CUDA device that supports it, off on CPU"),
    arg("--save-every", type=int, default=16, help="steps between resumable checkpoints"),
)


def heal_config(args: argparse.Namespace, seq_len: int, seed: int, progress: bool) -> HealConfig:
    """``HealConfig`` from parsed flags (a recipe step's or the command line's), every value checked."""
    cfg = HealConfig(tokens=args.heal_tokens, seq_len=seq_len, batch_size=args.heal_batch_size,
                     steps=args.heal_steps, method=args.heal_method, loss=args.loss, temperature=args.temperature,
                     lm_weight=args.lm_weight, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
                     rank=args.rank, budget=args.budget, placement=args.placement,
                     placement_floor=args.placement_floor, seed=seed,
                     gradient_checkpointing=args.gradient_checkpointing, autocast=args.autocast,
                     save_every=args.save_every, progress=progress)
    check_config(cfg)
    return cfg


def check_config(cfg: HealConfig) -> None:
    """One line naming the flag for every value a heal cannot use."""
    if cfg.tokens < 1 or cfg.windows() < 1:
        raise ImpruneError(f"--tokens {cfg.tokens} holds no window of --seq-len {cfg.seq_len}; train on at least "
                           f"{cfg.seq_len} tokens")
    for value, flag in ((cfg.batch_size, "--batch-size"), (cfg.rank, "--rank"), (cfg.save_every, "--save-every")):
        if value < 1:
            raise ImpruneError(f"{flag} must be at least 1, got {value}")
    if cfg.steps is not None and cfg.steps < 1:
        raise ImpruneError(f"--steps must be at least 1, got {cfg.steps}")
    if cfg.lr is not None and not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ImpruneError(f"--lr must be a positive learning rate, got {cfg.lr}")
    if not 0.0 <= cfg.warmup < 1.0:
        raise ImpruneError(f"--warmup is the share of steps warming up, in [0, 1); got {cfg.warmup}")
    if not (cfg.temperature > 0 and math.isfinite(cfg.temperature)):
        raise ImpruneError(f"--temperature must be positive, got {cfg.temperature}")
    if cfg.lm_weight < 0 or cfg.weight_decay < 0:
        raise ImpruneError("--lm-weight and --weight-decay must be 0 or more")
    if not 0.0 <= cfg.placement_floor <= 1.0:
        raise ImpruneError(f"--placement-floor is a share of the budget, in [0, 1]; got {cfg.placement_floor}")
    if cfg.budget is not None and cfg.budget < 1:
        raise ImpruneError(f"--budget must be at least 1 trainable parameter, got {cfg.budget}")
    if cfg.method == "full" and (cfg.placement != "uniform" or cfg.budget is not None):
        raise ImpruneError(f"--placement {cfg.placement} and --budget place LoRA ranks; --method full trains every "
                           "kept weight: drop them or use --method lora")
