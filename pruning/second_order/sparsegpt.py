"""SparseGPT: prune one linear layer and update its remaining weights from the calibration Hessian.

The layer-wise problem: for inputs X [n, in] and weight W [out, in], find a masked W' minimising
||X W^T - X W'^T||^2. Removing weight j of a row and letting the not-yet-processed weights j' > j of that row
absorb the error (optimal brain surgeon restricted to the columns to the right) changes them by
-(w_j / [H^-1]_jj) [H^-1]_{j, j'}: the column loop of ``pruning.second_order.core`` with the projection
``MaskProjection`` (a column's pruned weights go to zero, the others stay).

The mask of a block is chosen from the current (already updated) weights by the OBS saliency w^2 / [U]_jj^2 at
the start of the block (unstructured, by the caller's chooser), or every M columns (N:M: the M - N lowest
saliencies of each row's group go). ``MaskProjection`` also serves GPTQ's joint prune + quantize mode.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from importance.errors import ImpruneError
from pruning.second_order.core import compensate, inverse_cholesky

__all__ = ["Chooser", "MaskProjection", "inverse_cholesky", "sparsegpt"]

# choose(saliency [out, cols], index of the first column) -> bool mask [out, cols], True = prune
Chooser = Callable[[torch.Tensor, int], torch.Tensor]


class MaskProjection:
    """Prune to zero: a block mask from ``choose`` at each block start, or an N:M mask every M columns."""

    def __init__(self, choose: Chooser | None = None, nm: tuple[int, int] | None = None) -> None:
        if (choose is None) == (nm is None):
            raise ImpruneError("sparsegpt needs exactly one of an unstructured chooser or an N:M pattern")
        self.choose, self.nm = choose, nm
        self.align = nm[1] if nm is not None else 1
        self.mask = torch.zeros(0, 0, dtype=torch.bool)  # [out, b] of the current block, True = prune

    def start(self, w: torch.Tensor, perm: torch.Tensor | None) -> None:
        if perm is not None and self.nm is not None:
            raise ImpruneError("N:M groups need the natural column order; drop act-order for N:M")

    def block(self, w1: torch.Tensor, d: torch.Tensor, start: int) -> None:
        self.mask = (self.choose(w1.square() / d.square(), start) if self.choose is not None
                     else torch.zeros_like(w1, dtype=torch.bool))

    def pruned(self, w1: torch.Tensor, j: int, d: torch.Tensor) -> torch.Tensor:
        """Which weights of column j go [out] (N:M: decided from the current weights at each group start)."""
        if self.nm is not None and j % self.nm[1] == 0:
            n_keep, m = self.nm
            sal = w1[:, j:j + m].square() / d[j:j + m].square()  # [out, m]
            drop = torch.argsort(sal, dim=1, stable=True)[:, : m - n_keep]
            self.mask[:, j:j + m].scatter_(1, drop, True)
        return self.mask[:, j]

    def column(self, w1: torch.Tensor, j: int, start: int, d: torch.Tensor) -> torch.Tensor:
        col = w1[:, j]
        return torch.where(self.pruned(w1, j, d), torch.zeros_like(col), col)


@torch.no_grad()
def sparsegpt(weight: torch.Tensor, xtx: torch.Tensor, n_tokens: int, choose: Chooser | None = None,
              nm: tuple[int, int] | None = None, blocksize: int = 128, damp: float = 0.01) -> torch.Tensor:
    """Pruned and updated copy of ``weight`` [out, in] (float32) from X^T X [in, in] summed over ``n_tokens``.

    Unstructured: ``choose(saliency, start)`` picks the mask of each block (the caller fixes the counts).
    N:M: in every group of M consecutive input columns of each row the M - N lowest-saliency weights go.
    """
    return compensate(weight, xtx, n_tokens, MaskProjection(choose, nm), blocksize, damp)
