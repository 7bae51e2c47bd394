"""The one second-order core: calibration Hessian, damping, inverse Cholesky and the blocked column loop.

For inputs X [n, in] and a weight W [out, in], both SparseGPT (pruning) and GPTQ (quantization) look for a
constrained W' minimising ||X W^T - X W'^T||^2, whose Hessian per output row is H = 2 X^T X / n [in, in].
The columns are visited in order; each column j gets its new value q_j from a *projection* (zero it by a mask,
round it to a grid, or both), and its error (w_j - q_j) / U_jj is pushed onto the not-yet-visited columns
through row j of U, the upper Cholesky factor of H^-1 (H^-1 = U^T U: the successive inverses over the
remaining columns are its rows, so one factorisation serves every column; optimal brain surgeon).

Lazy blocks: within a block of ``blocksize`` columns every column's error goes to the columns on its right
inside the block at once; the accumulated block error reaches all later columns in one matrix product. Blocks
start on multiples of the projection's ``align`` (N:M groups, quantization groups), so a group is always
inside one block and sees the current (already updated) weights when the loop reaches its first column.

Damping adds ``damp`` x mean(diag H) to the diagonal (x10 per retry if H is not positive definite); inputs
that never fire (diag 0) are dropped (their weights set to 0). ``act_order`` visits the columns by descending
diag H (the most active inputs first, when the most columns are left to absorb their error) and undoes the
permutation at the end; the projection is told the permutation (``start``).

The structured relatives on the same Hessian and damping: ``solve_kept_columns`` re-fits the kept input columns
once others are removed (width reconstruction), ``obs_select`` chooses which column groups to remove so that
re-fit loses least (greedy structured OBS), ``solve_affine`` fits a damped affine map from summed [x 1]^T [x 1]
and [x 1]^T y (the linear stand-ins of removed blocks).
"""

from __future__ import annotations

from typing import Protocol

import torch

from importance.errors import ImpruneError


class Projection(Protocol):
    """Where each visited column lands. ``w1`` is the current block [out, b] (updated in place by the core),
    ``d`` the block's diagonal of U [b], ``start`` the block's first column in visiting order."""

    align: int  # blocks start on multiples of this

    def start(self, w: torch.Tensor, perm: torch.Tensor | None) -> None:
        """Once before the loop: the damped, dead-zeroed weight [out, in] in visiting order; perm[k] = the
        original index of the k-th visited column (None = natural order)."""

    def block(self, w1: torch.Tensor, d: torch.Tensor, start: int) -> None:
        """At the start of every block."""

    def column(self, w1: torch.Tensor, j: int, start: int, d: torch.Tensor) -> torch.Tensor:
        """The new value [out] of column j of the block (visiting index start + j)."""


def layer_hessian(xtx: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """H = 2 X^T X / n (float64 [in, in]) with dead inputs' diagonal set to 1, and the dead mask [in]."""
    h = 2.0 * xtx.double() / max(n_tokens, 1)  # [in, in]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    return h, dead


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


def output_error(delta: torch.Tensor, xtx: torch.Tensor) -> float:
    """||X delta^T||^2 = sum_i delta_i^T (X^T X) delta_i for a weight change ``delta`` [out, in]."""
    d = delta.double()
    return float(((d @ xtx.double()) * d).sum())


@torch.no_grad()
def compensate(weight: torch.Tensor, xtx: torch.Tensor, n_tokens: int, projection: Projection,
               blocksize: int = 128, damp: float = 0.01, act_order: bool = False) -> torch.Tensor:
    """The projected and error-compensated copy of ``weight`` [out, in] (float32), from X^T X [in, in] summed
    over ``n_tokens`` (see the module docstring)."""
    w = weight.detach().float().clone()  # [out, in]
    cols = w.shape[1]
    if xtx.shape != (cols, cols):
        raise ImpruneError(f"the Hessian {tuple(xtx.shape)} does not match the layer's {cols} inputs")
    h, dead = layer_hessian(xtx, n_tokens)
    w[:, dead] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)  # [in]
        w, h = w[:, perm], h[perm][:, perm]
    u = inverse_cholesky(h, damp).float()  # [in, in] upper
    align = max(int(projection.align), 1)
    if blocksize % align:
        blocksize = max(align, blocksize - blocksize % align)
    projection.start(w, perm)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()  # [out, b]
        u1 = u[i1:i2, i1:i2]  # [b, b]
        d = torch.diagonal(u1)  # [b]
        err = torch.zeros_like(w1)
        projection.block(w1, d, i1)
        for j in range(i2 - i1):
            col = w1[:, j]
            q = projection.column(w1, j, i1, d)
            e = (col - q) / d[j]  # [out]
            w1[:, j:].addr_(e, u1[j, j:], alpha=-1.0)  # in place, no [out, b] temporary
            w1[:, j] = q
            err[:, j] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err @ u[i1:i2, i2:]
    if perm is not None:
        w = w[:, torch.argsort(perm)]
    return w


@torch.no_grad()
def solve_kept_columns(weight: torch.Tensor, xtx: torch.Tensor, n_tokens: int, keep: torch.Tensor,
                       damp: float = 0.01) -> torch.Tensor:
    """The structured OBS update: new values [out, k] of the kept input columns ``keep`` [k] of ``weight``
    [out, in] once the other columns are removed, W_K' = W Hd[:, K] Hd[K, K]^-1 with Hd = H + lam I.

    Undamped this is the least-squares fit argmin ||X W^T - X_K W_K'^T||^2 of the full layer's output; the
    damping lam = ``damp`` x mean(diag H[K, K]) makes it the ridge fit pulled towards the dense W_K (for which
    the fitted output error is never above leaving W_K as it is). x10 per retry if not positive definite."""
    w = weight.detach().double()  # [out, in]
    if xtx.shape != (w.shape[1], w.shape[1]):
        raise ImpruneError(f"the Hessian {tuple(xtx.shape)} does not match the layer's {w.shape[1]} inputs")
    h, _dead = layer_hessian(xtx, n_tokens)  # [in, in]; dead inputs: diag 1, no coupling
    keep = keep.to(torch.long)
    hk = h[keep][:, keep]  # [k, k]
    mean_diag = float(torch.diagonal(hk).mean()) if keep.numel() else 0.0
    if mean_diag <= 0 or not torch.isfinite(hk).all():
        raise ImpruneError("the calibration inputs of a layer are all zero or not finite; use more calibration data")
    wk = w[:, keep]  # [out, k]
    eye = torch.eye(hk.shape[0], dtype=hk.dtype)
    for attempt in range(6):
        lam = damp * mean_diag * (10.0 ** attempt)
        l_factor, info = torch.linalg.cholesky_ex(hk + lam * eye)
        if int(info) == 0:
            rhs = h[keep] @ w.T + lam * wk.T  # [k, out] = Hd[K, :] W^T
            return torch.cholesky_solve(rhs, l_factor).T.float()  # [out, k]
    raise ImpruneError("the calibration Hessian of a layer is not positive definite even with damping; "
                       "raise --damp or use more calibration tokens")


@torch.no_grad()
def obs_select(weight: torch.Tensor, xtx: torch.Tensor, n_tokens: int, groups: torch.Tensor, count: int,
               buckets: torch.Tensor | None = None, damp: float = 0.01) -> tuple[list[int], float]:
    """The structured OBS choice: which ``count`` of the column ``groups`` [G, s] (s input columns of
    ``weight`` [out, in] each) to remove so that re-solving the kept columns recovers the output best.

    Removing column set S and re-fitting the rest costs tr(W_S (Hinv_SS)^-1 W_S^T) (Hinv = Hd^-1, Hd the
    damped H of ``layer_hessian`` + ``inverse_cholesky``: lam = damp x mean diag H over all inputs), which is
    min over W' (W'_S = 0) of ||X (W - W')^T||^2 + lam' ||W - W'||^2 in H's units (lam' = lam n / 2). Greedy,
    one group at a time (ZipLM): take the cheapest group, then remove it from the problem,
    W <- W - W_S (Hinv_SS)^-1 Hinv_S:,  Hinv <- Hinv - Hinv_:S (Hinv_SS)^-1 Hinv_S:,
    so that each next cost is the increase given what is already gone. ``buckets`` [G] with ``count`` PER
    bucket: every bucket loses exactly ``count`` groups (query heads per KV group). Returns the chosen group
    indices in the order taken and their summed cost in output-error units (||X dW^T||^2 + lam' ||dW||^2)."""
    w = weight.detach().double().clone()  # [out, in]
    if xtx.shape != (w.shape[1], w.shape[1]):
        raise ImpruneError(f"the Hessian {tuple(xtx.shape)} does not match the layer's {w.shape[1]} inputs")
    groups = groups.to(torch.long).reshape(groups.shape[0], -1)  # [G, s]
    raw = torch.zeros(groups.shape[0], dtype=torch.long) if buckets is None else buckets.to(torch.long)
    _ids, bucket = torch.unique(raw, return_inverse=True)  # [G] in 0 .. B-1
    sizes = torch.bincount(bucket)  # [B]
    if count < 0 or bool((sizes < count).any()):
        raise ImpruneError(f"cannot remove {count} column groups where there are only {int(sizes.min())}")
    quota = torch.full_like(sizes, count)  # [B] groups each bucket still loses
    h, dead = layer_hessian(xtx, n_tokens)  # [in, in]
    w[:, dead] = 0.0  # an input that never fires costs nothing to remove
    u = inverse_cholesky(h, damp)  # [in, in] upper, Hinv = U^T U
    hinv = u.T @ u  # [in, in]
    left = torch.ones(groups.shape[0], dtype=torch.bool)
    chosen: list[int] = []
    total = 0.0
    for _ in range(count * len(quota)):
        open_ = left & (quota[bucket] > 0)
        cand = torch.nonzero(open_).flatten()  # [c]
        idx = groups[cand]  # [c, s]
        if idx.shape[1] == 1:  # single columns: ||W_:j||^2 / Hinv_jj
            cost = w[:, idx[:, 0]].square().sum(0) / torch.diagonal(hinv)[idx[:, 0]]  # [c]
        else:
            hs = hinv[idx[:, :, None], idx[:, None, :]]  # [c, s, s]
            lf, info = torch.linalg.cholesky_ex(hs)  # Hinv_SS stays positive definite for every S left
            cost = torch.linalg.solve_triangular(lf, w[:, idx].permute(1, 2, 0), upper=False).square().sum((1, 2))
            cost[info != 0] = float("inf")  # (only by round-off: such a group goes last)
        best = int(torch.argmin(cost))
        g = int(cand[best])
        s = groups[g]  # [s]
        upd = torch.linalg.solve(hinv[s][:, s], hinv[s])  # [s, in] = Hinv_SS^-1 Hinv_S:
        w.addmm_(w[:, s], upd, alpha=-1.0)  # in place (w[:, s] indexes a copy)
        hinv.addmm_(hinv[:, s], upd, alpha=-1.0)
        w[:, s] = 0.0
        left[g] = False
        quota[bucket[g]] -= 1
        chosen.append(g)
        total += float(cost[best])
    return chosen, total * max(n_tokens, 1) / 2.0


def solve_affine(xtx: torch.Tensor, xty: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """The damped least-squares affine map (W [m, d], b [m]) from the sums over n tokens of a fit's inputs
    x [d] and targets y [m] with a 1 appended to x: ``xtx`` = sum [x 1]^T [x 1] [d+1, d+1], ``xty`` = sum [x 1]^T y
    [d+1, m]:

        argmin_{W, b} sum ||x W^T + b - y||^2 + lam ||W||^2,   lam = damp x mean(diag sum x^T x)

    (the intercept is not damped, so this is ridge on the centred data; x10 per retry if not positive definite)."""
    a, rhs = xtx.double().clone(), xty.double()
    d = a.shape[0] - 1
    mean_diag = float(torch.diagonal(a)[:d].mean()) if d else 0.0
    if a.shape != (d + 1, d + 1) or rhs.shape[0] != d + 1:
        raise ImpruneError(f"the sums {tuple(a.shape)} / {tuple(rhs.shape)} do not describe one affine fit")
    if mean_diag <= 0 or not torch.isfinite(a).all() or float(a[d, d]) < 1:
        raise ImpruneError("the calibration inputs of a layer are all zero or not finite; use more calibration data")
    ridge = torch.zeros(d + 1, dtype=a.dtype)
    ridge[:d] = 1.0
    for attempt in range(6):
        lam = damp * mean_diag * (10.0 ** attempt)
        l_factor, info = torch.linalg.cholesky_ex(a + torch.diag(lam * ridge))
        if int(info) == 0:
            sol = torch.cholesky_solve(rhs, l_factor)  # [d+1, m]
            return sol[:d].T.float().contiguous(), sol[d].float()
    raise ImpruneError("the calibration inputs of a layer are degenerate even with damping; raise --damp or use more "
                       "calibration tokens")
