"""GPTQ: error-compensated quantization of one linear layer, on the second-order core.

The grid is the integer format the compressed-tensors library stores (``pruning.quant.ct_format``): signed codes
q in [-2^(b-1), 2^(b-1) - 1], one float scale s and one integer zero point z per output row (per channel) or
per row and group of ``group_size`` consecutive inputs, w' = (q - z) s with q = clamp(round(w / s + z)).
The range always contains 0: lo = min(min w, 0), hi = max(max w, 0);
    asymmetric  s = (hi - lo) / (2^b - 1), z = round(clamp(qmin - lo / s, qmin, qmax))
    symmetric   s = max(|lo|, |hi|) / ((2^b - 1) / 2), z = 0
(compressed-tensors' ``calculate_qparams``). The *observer* chooses lo and hi: ``minmax`` takes them as they are;
``mse`` shrinks the range to f x [lo, hi] for f in ``SHRINK`` (1.00, 0.99, ..., 0.80) and keeps, per row of the
slice, the f whose grid gives the least squared rounding error sum_j h_j (w_j - w'_j)^2 (h_j = 1, or with ``mse-h``
the diagonal of X^T X: the input energy of column j). Either way the parameters are the same formula on a range, so
the stored grid is the one compressed-tensors reloads. Round-to-nearest (``rtn``) takes the parameters from the
weights as they are; GPTQ (``gptq``) visits the columns in order through ``pruning.second_order.core.compensate``
with ``GridProjection``: a group's scale and zero point come from the current (already error-updated) weights when
the loop reaches the group's first column; per channel they come from the initial weights; with act-order and groups
(or ``static_groups``) they are fixed from the initial weights per original group ("static" groups, so the stored
format keeps contiguous groups). Joint mode: a ``MaskProjection`` (unstructured chooser or N:M) decides which
weights of the column go to zero (code z, exactly 0 after dequantization); the kept ones are rounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from importance.errors import ImpruneError
from pruning.second_order.core import compensate, output_error
from pruning.second_order.sparsegpt import Chooser, MaskProjection

GPTQ_BITS = (2, 3, 4, 8)
OBSERVERS = ("minmax", "mse", "mse-h")
SHRINK = tuple(1.0 - 0.01 * i for i in range(21))  # range factors the mse observers try: 1.00 .. 0.80


@dataclass(frozen=True)
class QuantSpec:
    """One width: ``bits``, symmetric or not, ``group_size`` inputs per scale (None = one scale per row)."""

    bits: int
    sym: bool = False
    group_size: int | None = None

    def check(self, in_features: int, name: str = "the layer") -> None:
        if self.bits not in GPTQ_BITS:
            raise ImpruneError(f"unsupported width {self.bits} bits; use one of {', '.join(map(str, GPTQ_BITS))}")
        g = self.group_size
        if g is not None and (g < 1 or in_features % g):
            divs = [k for k in range(8, in_features + 1) if in_features % k == 0][:8]
            raise ImpruneError(f"--group-size {g} does not divide the {in_features} inputs of {name}; "
                               f"divisors: {', '.join(map(str, divs))}")

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else in_features // self.group_size

    @property
    def qrange(self) -> tuple[int, int]:
        return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1


@dataclass(frozen=True)
class Quantized:
    """A quantized layer: dequantized weight [out, in] (float32), codes [out, in] (int8), scale and zero
    point [out, groups] (float32; zero points are integers), the calibration output error
    ||X (W - W')^T||^2 (NaN without a Hessian) and, jointly pruned, the mask (a kept weight may still round
    to 0)."""

    weight: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec
    error: float = float("nan")
    pruned: torch.Tensor | None = None  # joint mode: bool [out, in], True = pruned by the mask


def grid_params(x: torch.Tensor, spec: QuantSpec, observer: str = "minmax", weight: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point [out] of the slice ``x`` [out, k] (module docstring); ``weight`` [k] (or [out, k])
    the column weights h_j of the ``mse-h`` observer (None: 1)."""
    lo = x.amin(dim=1).clamp(max=0)  # [out]
    hi = x.amax(dim=1).clamp(min=0)
    if observer == "minmax":
        return _range_params(lo, hi, spec)
    if observer not in OBSERVERS:
        raise ImpruneError(f"unknown --observer '{observer}'; use one of {', '.join(OBSERVERS)}")
    h = None if observer == "mse" or weight is None else weight.to(x.dtype).expand_as(x)  # [out, k]
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    for f in SHRINK:
        scale, zero = _range_params(lo * f, hi * f, spec)
        err = decode(encode(x, scale[:, None], zero[:, None], spec), scale[:, None], zero[:, None]) - x
        err = (err.square() if h is None else err.square() * h).sum(1)  # [out]
        if best is None:
            best = (err, scale, zero)
            continue
        better = err < best[0]  # ties keep the wider range
        best = (torch.where(better, err, best[0]), torch.where(better, scale, best[1]),
                torch.where(better, zero, best[2]))
    return best[1], best[2]


def _range_params(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point [out] of the ranges [lo, hi] [out] (lo <= 0 <= hi)."""
    qmin, qmax = spec.qrange
    if spec.sym:
        scale = torch.maximum(lo.abs(), hi) / ((qmax - qmin) / 2)
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(scale.dtype).eps), scale)
    if not spec.sym:
        zero = torch.round(torch.clamp(qmin - lo / scale, qmin, qmax))
    return scale, zero


def encode(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes of ``x`` [out, ...] on the grid (scale, zero broadcast against x), as float."""
    qmin, qmax = spec.qrange
    return torch.clamp(torch.round(x / scale + zero), qmin, qmax)


def decode(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero) * scale


class GridProjection:
    """Round each visited column to the grid (module docstring), optionally after a mask's zeros."""

    def __init__(self, spec: QuantSpec, mask: MaskProjection | None = None, static_groups: bool = False,
                 observer: str = "minmax", hdiag: torch.Tensor | None = None) -> None:
        self.spec, self.mask, self.static = spec, mask, static_groups
        self.observer, self.hdiag = observer, hdiag  # hdiag [in] in the original column order
        g = spec.group_size or 1
        self.align = g if mask is None else g * mask.align // _gcd(g, mask.align)
        self.perm: torch.Tensor | None = None

    def start(self, w: torch.Tensor, perm: torch.Tensor | None) -> None:
        out, cols = w.shape
        self.spec.check(cols)
        if self.mask is not None:
            self.mask.start(w, perm)
        self.perm = perm
        n = self.spec.groups(cols)
        self.scale = torch.zeros(out, n)
        self.zero = torch.zeros(out, n)
        self.codes = torch.zeros(out, cols)  # [out, in] in visiting order
        self.dropped = torch.zeros(out, cols, dtype=torch.bool)
        g = self.spec.group_size
        if g is None or perm is not None or self.static:  # per channel, or static groups of the initial weights
            orig = w if perm is None else w[:, torch.argsort(perm)]
            for k in range(n):
                cols_k = slice(None) if g is None else slice(k * g, (k + 1) * g)
                self.scale[:, k], self.zero[:, k] = self._params(orig[:, cols_k], cols_k)

    def _params(self, x: torch.Tensor, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid parameters of the slice ``x`` [out, k] of the original columns ``cols``."""
        return grid_params(x, self.spec, self.observer, None if self.hdiag is None else self.hdiag[cols])

    def block(self, w1: torch.Tensor, d: torch.Tensor, start: int) -> None:
        if self.mask is not None:
            self.mask.block(w1, d, start)

    def column(self, w1: torch.Tensor, j: int, start: int, d: torch.Tensor) -> torch.Tensor:
        g, k = self.spec.group_size, start + j
        if g is None:
            grp = 0
        elif self.perm is not None:
            grp = int(self.perm[k]) // g
        else:
            grp = k // g
            if k % g == 0 and not self.static:  # a group starts: parameters from the current weights (in this block)
                self.scale[:, grp], self.zero[:, grp] = self._params(w1[:, j:j + g], slice(k, k + g))
        s, z = self.scale[:, grp], self.zero[:, grp]
        q = encode(w1[:, j], s, z, self.spec)  # [out]
        if self.mask is not None:
            drop = self.mask.pruned(w1, j, d)
            self.dropped[:, k] = drop
            q = torch.where(drop, z, q)  # code z: exactly 0
        self.codes[:, k] = q
        return decode(q, s, z)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


@torch.no_grad()
def gptq(weight: torch.Tensor, xtx: torch.Tensor, n_tokens: int, spec: QuantSpec, choose: Chooser | None = None,
         nm: tuple[int, int] | None = None, blocksize: int = 128, damp: float = 0.01, act_order: bool = False,
         error: bool = True, static_groups: bool = False, observer: str = "minmax") -> Quantized:
    """GPTQ of ``weight`` [out, in] from X^T X [in, in] over ``n_tokens``; with ``choose`` or ``nm`` jointly
    pruned (as ``pruning.second_order.sparsegpt``) and quantized. ``error=False`` skips the float64 output error
    (NaN; a sixth of the time of one call, wasted where the caller does not read it). ``static_groups``: in natural
    order too, every group's scale and zero point from the initial weights (as llm-compressor does), not from the
    error-updated weights when the loop reaches the group. ``observer``: how each group's range is chosen
    (module docstring; ``mse-h`` weights the columns by the diagonal of ``xtx``)."""
    spec.check(weight.shape[1])
    mask = MaskProjection(choose, nm) if (choose is not None or nm is not None) else None
    proj = GridProjection(spec, mask, static_groups, observer, torch.diagonal(xtx).float())
    w = compensate(weight, xtx, n_tokens, proj, blocksize, damp, act_order)
    inv = slice(None) if proj.perm is None else torch.argsort(proj.perm)
    err = output_error(weight.detach().float() - w, xtx) if error else float("nan")
    return Quantized(w, proj.codes[:, inv].to(torch.int8), proj.scale, proj.zero, spec, err,
                     proj.dropped[:, inv] if mask is not None else None)


@torch.no_grad()
def rtn(weight: torch.Tensor, spec: QuantSpec, xtx: torch.Tensor | None = None, observer: str = "minmax"
        ) -> Quantized:
    """Round-to-nearest on the same grid (parameters from the weights as they are, by ``observer``; ``mse-h``
    weights by the diagonal of ``xtx``, as ``mse`` without it)."""
    w = weight.detach().float()  # [out, in]
    out, cols = w.shape
    spec.check(cols)
    g = spec.group_size or cols
    grouped = w.reshape(out, cols // g, g)  # [out, groups, g]
    hd = None if xtx is None else torch.diagonal(xtx).float().reshape(cols // g, g).repeat(out, 1)  # [out*groups, g]
    scale, zero = grid_params(grouped.reshape(-1, g), spec, observer, hd)
    scale, zero = scale.reshape(out, -1), zero.reshape(out, -1)  # [out, groups]
    q = encode(grouped, scale[..., None], zero[..., None], spec)
    deq = decode(q, scale[..., None], zero[..., None]).reshape(out, cols)
    err = output_error(w - deq, xtx) if xtx is not None else float("nan")
    return Quantized(deq, q.reshape(out, cols).to(torch.int8), scale, zero, spec, err)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The float weight [out, in] of codes [out, in] with per-group scale / zero [out, groups]."""
    out, cols = codes.shape
    g = cols // scale.shape[1]
    q = codes.float().reshape(out, -1, g)
    return decode(q, scale[..., None], zero[..., None]).reshape(out, cols)
