"""GPTQ over a whole model: widths planned by their cost after error compensation, then a sequential pass.

Units are the block linear modules of ``pruning.quant.bits`` (a fused module is one unit). Both passes run on the
sequential block runner (``pruning.second_order.sequential``) with X^T X of every unit's input:

``gptq_errors``  (planning; dense propagation, every block sees the unchanged model's inputs): for every unit
    and candidate width b the GPTQ result Q_b and, per output row i, e_i(b) = (w_i - q_i)^T X^T X (w_i - q_i),
    the calibration output error that remains AFTER compensation. The loss increase is estimated as
        fisher     sum_i s_i e_i(b),  s_i = sum_j F_ij / sum_j [X^T X]_jj  (element Fisher F of the row over the
                   input energy: the output sensitivity of row i under F_ij ~ s_i [X^T X]_jj, a Kronecker
                   factorisation of the Fisher)
        component  |S_c| sum_i e_i(b) / ||X W_c^T||^2 (a component score times the relative output error)
        output     sum_i e_i(b) (no table: the plain output error)
    and the knapsack of ``pruning.quant.bits.solve`` picks one width per unit under the average-bits budget.
``quantize_model_gptq_``  (sequential: block l is calibrated on what the already-quantized blocks 0..l-1
    produce): every unit quantized at its planned width; the dequantized weights are written into the model
    (so it runs as a fake-quantized float model) and the codes / scales / zero points are returned for the
    compressed-tensors writer (``pruning.quant.ct_format``). ``method='rtn'`` rounds to nearest on the same grid
    without data.

Group sizes: widths below 8 use the unit's group size; 8 bits one scale per output row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from importance.arch.canonical import model_map
from importance.data.sources import Windows
from importance.errors import ImpruneError
from importance.table import ImportanceTable
from pruning.methods.masks import lowest_mask
from pruning.quant.bits import BitPlan, QuantUnit, _units, check_budget, parse_choices, solve
from pruning.second_order.gptq import GPTQ_BITS, OBSERVERS, Quantized, QuantSpec, gptq, rtn
from pruning.second_order.sequential import InputStatistics, run_sequential

METHODS = ("gptq", "rtn")


@dataclass(frozen=True)
class GPTQConfig:
    """How each unit is quantized: grid symmetry, second-order settings, optional joint pruning."""

    method: str = "gptq"
    sym: bool = False
    blocksize: int = 128
    damp: float = 0.01
    act_order: bool = True  # static groups; measured better on SmolLM2 (README)
    sparsity: float = 0.0  # joint unstructured pruning (fraction of each row's weights)
    nm: tuple[int, int] | None = None  # joint N:M pruning
    static_groups: bool = False  # natural order: group parameters from the initial weights (llm-compressor's way)
    observer: str = "mse"  # how a group's range is chosen: minmax | mse | mse-h; mse measured best (README)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ImpruneError(f"unknown --method '{self.method}'; use one of {', '.join(METHODS)}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ImpruneError(f"--sparsity {self.sparsity} must be in [0, 1)")
        if self.method == "rtn" and (self.sparsity or self.nm):
            raise ImpruneError("joint pruning needs --method gptq")
        if self.observer not in OBSERVERS:
            raise ImpruneError(f"unknown --observer '{self.observer}'; use one of {', '.join(OBSERVERS)}")

    def spec(self, bits: int, unit: QuantUnit) -> QuantSpec:
        return QuantSpec(bits, self.sym, unit.group_size if bits < 8 and unit.group_size < unit.in_features
                         else None)


def _weight(model: Any, unit: QuantUnit) -> torch.Tensor:
    w = model.get_submodule(unit.name).weight
    return w.t() if unit.transposed else w  # [out, in]


def _quantize_unit(w: torch.Tensor, st: InputStatistics | None, key: str, spec: QuantSpec, cfg: GPTQConfig
                   ) -> Quantized:
    if cfg.method == "rtn" or st is None:
        return rtn(w, spec, st.xtx[key] if st is not None else None, cfg.observer)
    choose = None
    if cfg.sparsity and cfg.nm is None:
        def choose(sal: torch.Tensor, start: int) -> torch.Tensor:  # the same share of every block
            return lowest_mask(sal, round(cfg.sparsity * sal.numel()), "matrix")
    return gptq(w, st.xtx[key], st.tokens[key], spec, choose, cfg.nm, cfg.blocksize, cfg.damp, cfg.act_order,
                error=False, static_groups=cfg.static_groups,  # the stacked callers measure what they need
                observer=cfg.observer)


def _quantize_layer(model: Any, units: list[QuantUnit], st: InputStatistics | None, bits: dict[str, int],
                    cfg: GPTQConfig) -> dict[QuantUnit, Quantized]:
    """Quantize one block's units; units with the same input (q / k / v, gate / up: equal X^T X), width and
    group size are stacked along the rows into one GPTQ call (rows are independent given H, so the result is
    the same, with fewer column-loop steps). Not with joint unstructured pruning, whose mask spans a matrix."""
    stacks: list[list[QuantUnit]] = []
    for u in units:
        for stack in stacks:
            v = stack[0]
            if (st is not None and not cfg.sparsity and bits[u.name] == bits[v.name]
                    and u.group_size == v.group_size and st.xtx[u.name].shape == st.xtx[v.name].shape
                    and torch.equal(st.xtx[u.name], st.xtx[v.name])):
                stack.append(u)
                break
        else:
            stacks.append([u])
    out: dict[QuantUnit, Quantized] = {}
    for stack in stacks:
        ws = [_weight(model, u).detach().float() for u in stack]
        q = _quantize_unit(torch.cat(ws), st, stack[0].name, cfg.spec(bits[stack[0].name], stack[0]), cfg)
        r0 = 0
        for u, w in zip(stack, ws, strict=True):
            rows = slice(r0, r0 + w.shape[0])
            r0 += w.shape[0]
            out[u] = Quantized(q.weight[rows], q.codes[rows], q.scale[rows], q.zero[rows], q.spec, float("nan"),
                               None if q.pruned is None else q.pruned[rows])
    return out


def _by_layer(units: list[QuantUnit]) -> dict[int, list[QuantUnit]]:
    out: dict[int, list[QuantUnit]] = {}
    for u in units:
        out.setdefault(u.layer, []).append(u)
    return out


@torch.no_grad()
def quantize_model_gptq_(model: Any, plan: BitPlan, windows: Windows | None, cfg: GPTQConfig,
                         batch_size: int = 4, progress: bool = False) -> dict[str, Quantized]:
    """Quantize every planned unit in place at ``plan.bits`` (module docstring); returns {unit: Quantized}."""
    cfg.validate()
    units = list(plan.units)
    result: dict[str, Quantized] = {}
    if cfg.method == "rtn":
        for u in units:
            result[u.name] = _write(model, u, _quantize_unit(_weight(model, u), None, "", cfg.spec(
                plan.bits[u.name], u), cfg))
        return result
    if windows is None:
        raise ImpruneError("GPTQ needs calibration data: pass --data (or use --method rtn)")
    by_layer = _by_layer(units)
    mm = model_map(model)

    def observe(layer: int, block: torch.nn.Module) -> InputStatistics | None:
        us = by_layer.get(layer, [])
        return InputStatistics({u.name: model.get_submodule(u.name) for u in us}, hessian=True) if us else None

    def step(layer: int, block: torch.nn.Module, inputs: Any, st: InputStatistics | None) -> None:
        us = by_layer.get(layer, [])
        for u, q in _quantize_layer(model, us, st, {u.name: plan.bits[u.name] for u in us}, cfg).items():
            result[u.name] = _write(model, u, q)
        if st is not None:
            st.xtx.clear()

    run_sequential(model, mm, windows, step, sequential=True, batch_size=batch_size, progress=progress,
                   observe=observe)
    return result


def _write(model: Any, unit: QuantUnit, q: Quantized) -> Quantized:
    view = _weight(model, unit)
    view.data.copy_(q.weight.to(view.dtype))
    return Quantized(torch.empty(0), q.codes, q.scale, q.zero, q.spec, q.error, q.pruned)  # drop the float copy


# ----------------------------------------------------------------------------------------- planning

def _row_sensitivity(unit: QuantUnit, table: ImportanceTable | None, xtx: torch.Tensor, w: torch.Tensor,
                     block: dict[str, Any]) -> tuple[torch.Tensor | None, str]:
    """Per output row weight [out] of the unit's output error, and the estimator's name."""
    if table is None:
        return None, "output"
    if all(table.has("fisher", f"element/{unit.layer}/{c}") for c in unit.components):
        s = torch.zeros(w.shape[0], dtype=torch.float64)
        energy = float(torch.diagonal(xtx).sum()) or 1.0
        for c in unit.components:
            f = table.element("fisher", unit.layer, c).double().sum(1)  # [out_c]
            rows = block[c].rows
            s[slice(None) if rows is None else rows] += f
        return s / energy, "fisher"
    if "fisher" not in table.scorers:
        raise ImpruneError("the table has no fisher scores; score with `imprune score --elements` for the estimate")
    comp_m = table.matrix("fisher", "component")
    s = torch.zeros(w.shape[0], dtype=torch.float64)
    y = ((w.double() @ xtx.double()) * w.double()).sum(1)  # [out] ||X w_i||^2
    for c in unit.components:
        rows = block[c].rows
        sel = slice(None) if rows is None else rows
        s[sel] = abs(float(comp_m[unit.layer, table.components.index(c)])) / float(y[sel].sum().clamp_min(1e-30))
    return s, "component"


@torch.no_grad()
def gptq_errors(model: Any, units: list[QuantUnit], choices: tuple[int, ...], windows: Windows,
                cfg: GPTQConfig, table: ImportanceTable | None = None, batch_size: int = 4,
                progress: bool = False, on_result: Callable[[QuantUnit, int, Quantized], None] | None = None
                ) -> tuple[dict[str, dict[int, float]], str]:
    """{unit: {width: estimated loss increase after compensation}} and the estimator (module docstring).
    ``on_result(unit, width, quantized)`` sees every GPTQ result (e.g. to measure what one unit alone costs)."""
    by_layer = _by_layer(units)
    mm = model_map(model)
    out: dict[str, dict[int, float]] = {}
    how = ["output"]

    def observe(layer: int, block: torch.nn.Module) -> InputStatistics | None:
        us = by_layer.get(layer, [])
        return InputStatistics({u.name: model.get_submodule(u.name) for u in us}, hessian=True) if us else None

    def step(layer: int, block: torch.nn.Module, inputs: Any, st: InputStatistics | None) -> None:
        us = by_layer.get(layer, [])
        sens = {}
        for u in us:
            sens[u.name], how[0] = _row_sensitivity(u, table, st.xtx[u.name], _weight(model, u).detach().float(),
                                                    mm.blocks[u.layer].components)
        for b in choices:
            for u, q in _quantize_layer(model, us, st, dict.fromkeys((u.name for u in us), b), cfg).items():
                w, xtx, s = _weight(model, u).detach().float(), st.xtx[u.name].double(), sens[u.name]
                d = (w - q.weight).double()
                e = ((d @ xtx) * d).sum(1)  # [out] per-row output error
                out.setdefault(u.name, {})[b] = float(e.sum() if s is None else (s * e).sum())
                if on_result is not None:
                    on_result(u, b, q)
        if st is not None:
            st.xtx.clear()

    run_sequential(model, mm, windows, step, sequential=False, batch_size=batch_size, progress=progress,
                   observe=observe)
    names = {"fisher": "sum_i s_i e_i(b), s_i = sum_j F_ij / tr(X^T X)",
             "component": "|S_c| x relative output error after GPTQ", "output": "output error after GPTQ"}
    return out, f"gptq-{how[0]}: {names[how[0]]}"


def plan_gptq(model: Any, table: ImportanceTable | None, budget: float, choices: tuple[int, ...] | str,
              windows: Windows, cfg: GPTQConfig, keep: tuple[str, ...] = (), group_size: int | None = None,
              linear_only: bool = False, batch_size: int = 4, progress: bool = False) -> BitPlan:
    """The plan whose widths minimise the estimated loss after error compensation under ``budget``."""
    choices = parse_choices(choices, GPTQ_BITS)
    check_budget(budget, choices)
    units, kept = _units(model, keep, group_size, linear_only)
    if len(choices) == 1:
        return BitPlan({u.name: choices[0] for u in units}, tuple(units), choices, budget, "uniform", "uniform",
                       0.0, tuple(kept))
    errors, how = gptq_errors(model, units, choices, windows, cfg, table, batch_size, progress)
    return plan_from_errors(units, kept, errors, choices, budget, how)


def plan_from_errors(units: list[QuantUnit], kept: list[str], errors: dict[str, dict[int, float]],
                     choices: tuple[int, ...], budget: float, how: str) -> BitPlan:
    """The knapsack's plan from estimates already measured (for several budgets from one planning pass)."""
    check_budget(budget, choices)
    rows = [[errors[u.name][b] for b in choices] for u in units]
    pick, solver = solve([u.numel for u in units], rows, choices, budget)
    bits = {u.name: choices[k] for u, k in zip(units, pick, strict=True)}
    estimate = sum(r[k] for r, k in zip(rows, pick, strict=True))
    return BitPlan(bits, tuple(units), choices, budget, how, solver, estimate, tuple(kept),
                   {n: {b: row[b] for b in choices} for n, row in errors.items()})
