"""Masks of exact counts: the lowest-k weights of a matrix (per row or over it) and N:M patterns.

Shared by the unstructured / N:M pruners and the joint pruning of GPTQ; True in a mask means "prune".
"""

from __future__ import annotations

import torch

from importance.errors import ImpruneError


def parse_nm(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise ImpruneError(f"--nm '{text}' is not N:M; write it like 2:4 or 4:8") from None
    if not 0 < n < m:
        raise ImpruneError(f"--nm {n}:{m} is no N:M pattern: it needs 0 < N < M, e.g. 2:4")
    return n, m


def lowest_mask(scores: torch.Tensor, k: int, scope: str = "matrix") -> torch.Tensor:
    """Bool mask (True = prune) of exactly ``k`` lowest scores of ``scores`` [R, C]: over the whole matrix, or
    spread over the rows (``row``: each row loses k // R, the first k % R rows one more). Ties: lower index."""
    r, c = scores.shape
    if scope == "row":
        per_row = torch.full((r,), k // r, dtype=torch.long)
        per_row[: k % r] += 1
        order = torch.argsort(scores, dim=1, stable=True)  # [R, C]
        drop = torch.arange(c)[None, :] < per_row[:, None]  # [R, C] by rank
        return torch.zeros_like(drop).scatter_(1, order, drop)
    flat = torch.zeros(r * c, dtype=torch.bool)
    flat[torch.argsort(scores.flatten(), stable=True)[:k]] = True
    return flat.view(r, c)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask (True = prune) leaving the N highest of every M consecutive scores of each row [R, C]."""
    r, c = scores.shape
    if c % m:
        raise ImpruneError(f"a matrix with {c} inputs cannot be split into groups of {m}; pick an M dividing it")
    groups = scores.reshape(r, c // m, m)
    order = torch.argsort(groups, dim=-1, stable=True)[..., : m - n]  # [R, C/M, M-N]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True).reshape(r, c)
