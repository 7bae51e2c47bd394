"""Bit plans: which width each linear module gets, under a parameter-weighted average-bits budget.

A *unit* is one linear module of a transformer block (a fused module such as Phi-3's ``qkv_proj`` or GPT-2's
``c_attn`` is ONE unit holding several canonical components: quantization libraries store one width per
module). For every unit and every candidate width ``b`` the planner estimates the loss increase

    fisher      sum_ij F_ij (w_ij - Q_b(w)_ij)^2        (F = element empirical Fisher; the exact estimate)
    activation  sum_ij ||x_j||^2 (w_ij - Q_b(w)_ij)^2   (the layer's output error energy on calibration data)
    taylor / magnitude / fisher without elements
                S_c * ||W_c - Q_b(W)_c||^2 / ||W_c||^2   (component score times relative weight error)

summed over the unit's components, and then solves

    minimise sum_u E_u(b_u)   subject to   sum_u n_u b_u <= budget * sum_u n_u,   b_u in choices

a multiple-choice knapsack. ``solve`` does it exactly by dynamic programming over the extra bits above the
smallest width, counted in units of their greatest common divisor (transformer matrices share a few shapes,
so the grid is small: SmolLM2 has 960 cells). When the grid would exceed ``MAX_CELLS`` it falls back to a
greedy that upgrades the unit with the best error saved per extra bit while the budget allows (exact for
two widths up to one item; the plan says which solver ran). Ties go to the smaller width, so a unit whose
sensitivity is zero always gets the smallest width.

Modules outside the blocks (embeddings, a tied or untied ``lm_head``), norms and MoE expert tensors are not
planned: they stay in full precision and are listed as kept. ``keep`` patterns (fnmatch on module names)
keep more. The budget counts the planned units only, with nominal widths (scales come on top; see
``pruning.quant.quantize.weight_bytes`` for the measured storage).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from functools import reduce
from typing import Any

import torch

from importance.arch.canonical import Component, model_map
from importance.errors import ImpruneError
from importance.table import ImportanceTable, LayerMap, layer_map

SUPPORTED_BITS = (2, 4, 8)  # the integer weight types a real library stores (optimum-quanto qint2/4/8)
SENSITIVITIES = ("fisher", "activation", "taylor", "magnitude")
AUTO_GROUPS = (128, 96, 64, 32)  # automatic group size: the largest of these dividing the input dimension
MAX_CELLS = 50_000_000  # DP table size (units x grid) above which the greedy solver is used


@dataclass(frozen=True)
class QuantUnit:
    """One linear module planned as a whole: ``numel`` weights ``[out, in]``, low widths in groups along ``in``."""

    name: str
    layer: int
    components: tuple[str, ...]
    numel: int
    in_features: int
    group_size: int
    transposed: bool = False  # Conv1D storage [in, out]
    linear: bool = True  # a torch.nn.Linear (what optimum-quanto can quantize)


@dataclass(frozen=True)
class BitPlan:
    """The chosen width per unit, with what the planner assumed."""

    bits: dict[str, int]  # module name -> width
    units: tuple[QuantUnit, ...]
    choices: tuple[int, ...]
    budget: float
    sensitivity: str
    solver: str
    estimate: float  # estimated total loss increase of the plan (sensitivity units)
    kept: tuple[str, ...] = ()
    errors: dict[str, dict[int, float]] = field(default_factory=dict)  # unit -> width -> estimate

    def average_bits(self) -> float:
        n = sum(u.numel for u in self.units)
        return sum(u.numel * self.bits[u.name] for u in self.units) / max(n, 1)

    def layer_map(self) -> LayerMap:
        """``{layer: {component: bits}}`` (a fused unit's width is written for each of its components)."""
        return layer_map(((u.layer, c), float(self.bits[u.name])) for u in self.units for c in u.components)

    def to_json(self) -> dict[str, Any]:
        return {"bits": {str(k): v for k, v in self.layer_map().items()}, "modules": dict(self.bits),
                "group_sizes": {u.name: u.group_size for u in self.units}, "choices": list(self.choices),
                "budget": self.budget, "average_bits": round(self.average_bits(), 4),
                "sensitivity": self.sensitivity, "solver": self.solver, "estimate": self.estimate,
                "kept": list(self.kept), "units": [asdict(u) for u in self.units],
                "errors": {n: {str(b): e for b, e in row.items()} for n, row in self.errors.items()}}


# ----------------------------------------------------------------------------------------- validation

def parse_choices(text: str | list[int] | tuple[int, ...], supported: tuple[int, ...] = SUPPORTED_BITS
                  ) -> tuple[int, ...]:
    """'4,8' -> (4, 8), sorted, each a width the storage format holds (``supported``)."""
    try:
        items = [int(x) for x in (text.split(",") if isinstance(text, str) else text) if str(x).strip()]
    except ValueError:
        raise ImpruneError(f"--choices '{text}' is not a list of integers; give widths such as 4,8") from None
    bad = [b for b in items if b not in supported]
    if not items or bad:
        raise ImpruneError(f"unsupported bit width(s) {bad or text}; --choices takes widths from "
                           f"{','.join(map(str, supported))}, e.g. 4,8")
    return tuple(sorted(set(items)))


def check_budget(budget: float, choices: tuple[int, ...]) -> None:
    if not min(choices) <= budget <= max(choices):
        raise ImpruneError(f"--budget {budget} is outside the widths {min(choices)}..{max(choices)} of --choices; "
                           "give an average between the smallest and the largest choice")


def _group_size(name: str, in_features: int, group_size: int | None) -> int:
    if group_size is None:
        return next((g for g in AUTO_GROUPS if in_features % g == 0 and g < in_features), in_features)
    if group_size < 1 or in_features % group_size:
        divs = ", ".join(str(k) for k in range(8, in_features + 1) if in_features % k == 0)
        raise ImpruneError(f"--group-size {group_size} does not divide the input dimension {in_features} of {name}; "
                           f"use a divisor of it ({divs}) or leave --group-size out for an automatic one")
    return group_size


def quant_units(model: Any, keep: tuple[str, ...] = (), group_size: int | None = None, linear_only: bool = False
                ) -> tuple[list[QuantUnit], list[str]]:
    """The planned units of ``model`` (block linear modules not matched by ``keep``) and the kept modules: every
    other module holding a weight matrix (those matched, embeddings, lm_head, experts; norms are not listed).
    ``linear_only``: keep modules that are not ``torch.nn.Linear`` too (what a storage library cannot hold:
    GPT-2's Conv1D, MoE routers written as plain parameters)."""
    comps: dict[str, list[Component]] = {}
    for comp in model_map(model).components():
        if comp.kind == "linear":
            comps.setdefault(comp.path, []).append(comp)
    names = [n for n, m in model.named_modules() if getattr(m, "weight", None) is not None]
    unmatched = [p for p in keep if not any(fnmatch(n, p) for n in names)]
    if unmatched:
        raise ImpruneError(f"--keep pattern '{unmatched[0]}' matches no module with weights; patterns are shell "
                           "wildcards on module names, e.g. 'lm_head' or 'model.layers.0.*'")
    units = []
    for path, cs in comps.items():
        c0 = cs[0]
        if any(fnmatch(path, p) for p in keep) or (linear_only and not isinstance(c0.module, torch.nn.Linear)):
            continue
        out_total, in_features = c0._full().shape  # the whole module as [out, in]
        units.append(QuantUnit(path, c0.layer, tuple(c.name for c in cs), int(out_total * in_features),
                               int(in_features), _group_size(path, int(in_features), group_size), c0.transposed,
                               isinstance(c0.module, torch.nn.Linear)))
    planned = {u.name for u in units}
    kept = [n for n in names if n not in planned and model.get_submodule(n).weight.dim() >= 2
            and not any(n.startswith(p + ".") for p in planned)]
    return units, kept


# ----------------------------------------------------------------------------------------- quantization math

def fake_quantize(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Quantize-dequantize ``w`` [out, in] exactly as the stored integer formats do.

    8 bits: symmetric per output row, scale = max|w| / 127, q = clamp(round(w / scale), -128, 127).
    2 / 4 bits: affine per group of ``group_size`` inputs, scale = (max - min) / (2^b - 1),
    q = clamp(round((w - min) / scale), 0, 2^b - 1), w' = q * scale + min.
    """
    x = w.detach().float()
    if bits == 8:
        scale = x.abs().amax(dim=-1, keepdim=True) / 127
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return (torch.clamp(torch.round(x / scale), -128, 127) * scale).to(w.dtype)
    g = x.reshape(-1, group_size)  # [out * in / group, group]
    lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round((g - lo) / scale), 0, 2**bits - 1)
    return (q * scale + lo).reshape(w.shape).to(w.dtype)


def _unit_weight(model: Any, unit: QuantUnit) -> torch.Tensor:
    w = model.get_submodule(unit.name).weight
    return w.t() if unit.transposed else w  # [out, in]


def _rows(comp: Component, full: torch.Tensor) -> torch.Tensor:
    return full if comp.rows is None else full[comp.rows]


@torch.no_grad()
def unit_errors(model: Any, units: list[QuantUnit], choices: tuple[int, ...], table: ImportanceTable | None,
                sensitivity: str) -> tuple[dict[str, dict[int, float]], str]:
    """Estimated loss increase of every unit at every width, and the estimator used (module docstring)."""
    if sensitivity not in SENSITIVITIES:
        raise ImpruneError(f"unknown --sensitivity '{sensitivity}'; use one of {', '.join(SENSITIVITIES)}")
    if table is None:
        raise ImpruneError("planning needs an importance table: run `imprune score --elements --out DIR` and pass "
                           "--scores DIR (or give --random-seed / a single --choices width)")
    if sensitivity not in table.scorers:
        raise ImpruneError(f"the table has no '{sensitivity}' scores (it has {', '.join(table.scorers)}); choose "
                           "another --sensitivity or score with it")
    element = sensitivity == "fisher" and all(table.has("fisher", f"element/{u.layer}/{c}")
                                              for u in units for c in u.components)
    mm = model_map(model)
    comp_m = table.matrix(sensitivity, "component") if sensitivity != "activation" else None
    out: dict[str, dict[int, float]] = {}
    for u in units:
        full = _unit_weight(model, u).detach().float().cpu()  # [out, in]
        block = mm.blocks[u.layer].components
        row: dict[int, float] = {}
        for b in choices:
            diff2 = (full - fake_quantize(full, b, u.group_size)).square()  # [out, in]
            total = 0.0
            for name in u.components:
                comp, d2 = block[name], _rows(block[name], diff2)
                if element:
                    total += float((table.element("fisher", u.layer, name) * d2).sum())
                elif sensitivity == "activation":
                    norm = table.tensors.get(f"activation/in_norm/{u.layer}/{name}")
                    if norm is None:
                        raise ImpruneError(f"the table has no input norms for layer {u.layer} {name}; rescore it")
                    total += float((d2 * norm.square()).sum())
                else:
                    w2 = _rows(comp, full).square().sum().clamp_min(1e-30)
                    score = float(comp_m[u.layer, table.components.index(name)])
                    total += abs(score) * float(d2.sum() / w2)
            row[b] = total
        out[u.name] = row
    how = ("sum F (w - Q(w))^2" if element else "sum ||x||^2 (w - Q(w))^2" if sensitivity == "activation"
           else f"{sensitivity} component score x relative error ||W - Q(W)||^2 / ||W||^2")
    return out, how


# ----------------------------------------------------------------------------------------- solvers

def solve(sizes: list[int], errors: list[list[float]], choices: tuple[int, ...], budget: float,
          max_cells: int = MAX_CELLS) -> tuple[list[int], str]:
    """Pick one width index per item minimising the summed error with sum(size * width) <= budget * sum(size).

    Exact DP over the extra cost above the smallest width (in gcd units) when the table fits ``max_cells``;
    otherwise a greedy by error saved per extra bit. Returns (index per item, solver name).
    """
    base = min(choices)
    extra = [[n * (b - base) for b in choices] for n in sizes]  # exact integers
    cap_bits = math.floor((budget - base) * sum(sizes) + 1e-9)
    g = reduce(math.gcd, (e for row in extra for e in row if e), 0)
    if g == 0 or cap_bits < g:
        return [0] * len(sizes), "dp-exact"  # nothing can be raised: the smallest width everywhere
    cap = cap_bits // g
    if len(sizes) * (cap + 1) > max_cells:
        return _greedy(sizes, errors, choices, cap_bits), "greedy"
    inf = float("inf")
    best = torch.zeros(cap + 1, dtype=torch.float64)  # best[c] = least error with extra cost <= c (gcd units)
    pick = torch.zeros(len(sizes), cap + 1, dtype=torch.int8)
    for i, row in enumerate(errors):
        new = torch.full((cap + 1,), inf, dtype=torch.float64)
        for k, e in enumerate(row):  # smallest width first: on ties it stays
            c = extra[i][k] // g
            if c > cap:
                continue
            cand = torch.full((cap + 1,), inf, dtype=torch.float64)
            cand[c:] = best[: cap + 1 - c] + e
            better = cand < new
            new = torch.where(better, cand, new)
            pick[i][better] = k
        best = new
    choice, c = [0] * len(sizes), cap
    for i in range(len(sizes) - 1, -1, -1):
        k = int(pick[i, c])
        choice[i] = k
        c -= extra[i][k] // g
    return choice, "dp-exact"


def _greedy(sizes: list[int], errors: list[list[float]], choices: tuple[int, ...], cap_bits: int) -> list[int]:
    choice = [0] * len(sizes)
    spent = 0
    while True:
        best, arg = 0.0, None
        for i, n in enumerate(sizes):
            for k in range(choice[i] + 1, len(choices)):
                cost = n * (choices[k] - choices[choice[i]])
                gain = errors[i][choice[i]] - errors[i][k]
                if spent + cost <= cap_bits and gain / cost > best:
                    best, arg = gain / cost, (i, k, cost)
        if arg is None:
            return choice
        i, k, cost = arg
        choice[i], spent = k, spent + cost


def plan_bits(model: Any, table: ImportanceTable | None, budget: float, choices: tuple[int, ...] | str,
              sensitivity: str = "fisher", keep: tuple[str, ...] = (), group_size: int | None = None,
              linear_only: bool = False, supported: tuple[int, ...] = SUPPORTED_BITS) -> BitPlan:
    """The importance-guided plan for ``model`` (one width everywhere when only one choice is given)."""
    choices = parse_choices(choices, supported)
    check_budget(budget, choices)
    units, kept = _units(model, keep, group_size, linear_only)
    if len(choices) == 1:
        return BitPlan({u.name: choices[0] for u in units}, tuple(units), choices, budget, sensitivity, "uniform",
                       0.0, tuple(kept))
    errors, how = unit_errors(model, units, choices, table, sensitivity)
    rows = [[errors[u.name][b] for b in choices] for u in units]
    pick, solver = solve([u.numel for u in units], rows, choices, budget)
    bits = {u.name: choices[k] for u, k in zip(units, pick, strict=True)}
    estimate = sum(r[k] for r, k in zip(rows, pick, strict=True))
    return BitPlan(bits, tuple(units), choices, budget, f"{sensitivity}: {how}", solver, estimate, tuple(kept),
                   errors)


def _units(model: Any, keep: tuple[str, ...], group_size: int | None, linear_only: bool
           ) -> tuple[list[QuantUnit], list[str]]:
    units, kept = quant_units(model, keep, group_size, linear_only)
    if not units:
        raise ImpruneError("no block linear module is left to quantize" + (
            " as torch.nn.Linear (GPT-2's Conv1D cannot be stored packed; use --fake)" if linear_only else "")
            + "; loosen --keep")
    return units, kept


def random_plan(model: Any, budget: float, choices: tuple[int, ...] | str, seed: int,
                keep: tuple[str, ...] = (), group_size: int | None = None, linear_only: bool = False,
                supported: tuple[int, ...] = SUPPORTED_BITS) -> BitPlan:
    """A baseline at the same budget: units visited in a seeded random order, each raised to the largest
    width that still fits (so it fills the budget about as fully as the guided plan)."""
    choices = parse_choices(choices, supported)
    check_budget(budget, choices)
    units, kept = _units(model, keep, group_size, linear_only)
    order = list(range(len(units)))
    random.Random(seed).shuffle(order)
    room = math.floor((budget - choices[0]) * sum(u.numel for u in units) + 1e-9)
    bits = {u.name: choices[0] for u in units}
    for i in order:
        u = units[i]
        fit = [b for b in choices if u.numel * (b - choices[0]) <= room]
        bits[u.name] = fit[-1]
        room -= u.numel * (fit[-1] - choices[0])
    return BitPlan(bits, tuple(units), choices, budget, "random", f"random(seed={seed})", float("nan"), tuple(kept))


def uniform_plan(model: Any, bits: int, keep: tuple[str, ...] = (), group_size: int | None = None,
                 linear_only: bool = False) -> BitPlan:
    return plan_bits(model, None, float(bits), (bits,), keep=keep, group_size=group_size, linear_only=linear_only)
