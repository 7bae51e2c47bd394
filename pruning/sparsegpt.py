"""SparseGPT: prune one linear layer and update its remaining weights from the calibration Hessian.

The layer-wise problem: for inputs X [n, in] and weight W [out, in], find a masked W' minimising
||X W^T - X W'^T||^2. Its Hessian (per output row) is H = 2 X^T X / n [in, in]. Removing weight j of a row
and letting the not-yet-processed weights j' > j of that row absorb the error (optimal brain surgeon
restricted to the columns to the right) changes them by -(w_j / [H^-1]_jj) [H^-1]_{j, j'}, where H^-1 is the
inverse over the remaining columns; these successive inverses are the rows of the upper Cholesky factor U
of H^-1 (H^-1 = U^T U), so one factorisation serves every column.

Columns are processed in blocks of ``blocksize``: within a block every pruned column's error is pushed
onto the columns to its right inside the block at once; the accumulated block error is pushed onto all
later columns in one matrix product (lazy batch update). The mask of a block is chosen from the current
(already updated) weights by the OBS saliency w^2 / [U]_jj^2 at the start of the block (unstructured), or
every M columns (N:M). H is damped by ``damp`` x mean(diag H); inputs that never fire (diag 0) are dropped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from importance.errors import ImpruneError

# choose(saliency [out, cols], index of the first column) -> bool mask [out, cols], True = prune
Chooser = Callable[[torch.Tensor, int], torch.Tensor]


def inverse_cholesky(h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) I)^-1, float64, retrying with more damping if needed."""
    h = h.double().clone()
    mean_diag = float(torch.diagonal(h).mean())
    if mean_diag <= 0 or not torch.isfinite(h).all():
        raise ImpruneError("the calibration inputs of a layer are all zero or not finite; use more calibration data")
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for attempt in range(6):
        lam = damp * mean_diag * (10.0 ** attempt)
        l_factor, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(l_factor)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return u
    raise ImpruneError("the calibration Hessian of a layer is not positive definite even with damping; "
                       "raise --damp or use more calibration tokens")


@torch.no_grad()
def sparsegpt(weight: torch.Tensor, xtx: torch.Tensor, n_tokens: int, choose: Chooser | None = None,
              nm: tuple[int, int] | None = None, blocksize: int = 128, damp: float = 0.01) -> torch.Tensor:
    """Pruned and updated copy of ``weight`` [out, in] (float32) from X^T X [in, in] summed over ``n_tokens``.

    Unstructured: ``choose(saliency, start)`` picks the mask of each block (the caller fixes the counts).
    N:M: in every group of M consecutive input columns of each row the M - N lowest-saliency weights go.
    """
    if (choose is None) == (nm is None):
        raise ImpruneError("sparsegpt needs exactly one of an unstructured chooser or an N:M pattern")
    w = weight.detach().float().clone()  # [out, in]
    cols = w.shape[1]
    if xtx.shape != (cols, cols):
        raise ImpruneError(f"the Hessian {tuple(xtx.shape)} does not match the layer's {cols} inputs")
    h = 2.0 * xtx.double() / max(n_tokens, 1)  # [in, in]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u = inverse_cholesky(h, damp).float()  # [in, in] upper
    if nm is not None:
        n_keep, m = nm
        if blocksize % m:
            blocksize = max(m, blocksize - blocksize % m)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()  # [out, b]
        u1 = u[i1:i2, i1:i2]  # [b, b]
        d = torch.diagonal(u1)  # [b]
        err = torch.zeros_like(w1)
        mask = choose(w1.square() / d.square(), i1) if choose is not None else torch.zeros_like(w1, dtype=torch.bool)
        for j in range(i2 - i1):
            if nm is not None and j % m == 0:
                sal = w1[:, j:j + m].square() / d[j:j + m].square()  # [out, m]
                drop = torch.argsort(sal, dim=1, stable=True)[:, : m - n_keep]
                mask[:, j:j + m].scatter_(1, drop, True)
            col = w1[:, j]
            q = torch.where(mask[:, j], torch.zeros_like(col), col)
            e = (col - q) / d[j]  # [out]
            w1[:, j:] -= e[:, None] * u1[j, j:][None, :]
            w1[:, j] = q
            err[:, j] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return w
