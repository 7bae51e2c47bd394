"""Where the trainable capacity goes: LoRA ranks per layer, uniform or where pruning hurt most.

The damage of a pruned layer is measured against the teacher, locally: student block j (the teacher's block
``origin[j]``) is fed the teacher's own residual stream at its input and must produce what the teacher has
just before its next kept block (``origin[j + 1]``, or after its last block), so a block that sits before
removed layers is asked to stand in for them too. ``layer_errors`` returns, per student layer,
``||student(h_in) - h_target||^2 / ||h_target - h_in||^2`` over real tokens: 0 for an untouched layer, 1 for a
layer that does nothing of what it should.

``allocate_ranks`` shares a parameter budget (what rank r on every linear costs) across layers: a share
``floor`` as the uniform placement spreads it, the rest in proportion to that error, each layer capped at
``cap`` x r, the remainder spread by largest remainder; each layer's cost per rank is its linears' ``in + out``,
so the total never exceeds the budget. A floor keeps capacity everywhere: the plain next-token part of the
loss (``--loss kd+lm``) gains from every layer, not only from the damaged ones (measured in the README).

``gradient_spectra`` + ``allocate_by_spectrum`` place ranks per module (layer x component) instead: the
singular values of each weight's heal-loss gradient (masked to the kept weights) say how much a rank-r
update there can lower the loss to first order; ranks go greedily to the largest ``sigma^2`` per parameter,
under the same budget, above a uniform floor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from importance.arch.canonical import model_map
from importance.data.sources import Windows
from importance.engine.blockwise import BlockInput, capture_block_inputs, forward_block
from importance.errors import ImpruneError


@torch.no_grad()
def layer_errors(student: torch.nn.Module, teacher: torch.nn.Module, windows: Windows, origin: list[int],
                 batch_size: int = 4) -> list[float]:
    """Relative local output error of every student layer against the teacher (module docstring)."""
    tm, sm = model_map(teacher), model_map(student)
    if len(origin) != sm.n_layers or any(not 0 <= o < tm.n_layers for o in origin) or origin != sorted(set(origin)):
        raise ImpruneError("the student's layers_kept does not line up its layers with the teacher's")
    was = teacher.training, student.training
    teacher.eval()
    student.eval()
    try:
        stream = capture_block_inputs(teacher, tm, windows, batch_size)
        boundary = [[item.hidden for item in stream]]  # boundary[l]: the input of teacher block l, per batch
        for block in tm.blocks:
            outs = forward_block(block.module, stream)
            for item, y in zip(stream, outs, strict=True):
                item.hidden = y
            boundary.append(outs)
        student_in = capture_block_inputs(student, sm, windows, batch_size)  # the student's own mask / positions
        errors = []
        for j, block in enumerate(sm.blocks):
            source, target = boundary[origin[j]], boundary[origin[j + 1] if j + 1 < len(origin) else tm.n_layers]
            fed = [BlockInput(h, s.args, s.kwargs, s.mask) for h, s in zip(source, student_in, strict=True)]
            outs = forward_block(block.module, fed)
            num = den = 0.0
            for y, t, h, s in zip(outs, target, source, student_in, strict=True):
                m = s.mask.unsqueeze(-1).to(y.dtype)  # [B, T, 1]
                num += float((((y - t) ** 2) * m).sum())
                den += float((((t - h) ** 2) * m).sum())
            errors.append(num / den if den > 0 else 0.0)
    finally:
        teacher.train(was[0])
        student.train(was[1])
    return errors


def allocate_ranks(costs: list[int], errors: list[float], rank: int, budget: int | None = None,
                   cap: float = 4.0, floor: float = 0.0) -> list[int]:
    """Rank per layer: ``budget`` parameters (default ``rank x sum(costs)``), the share ``floor`` spread as the
    uniform placement would (in proportion to each layer's cost) and the rest in proportion to ``errors``."""
    if len(costs) != len(errors) or not costs:
        raise ImpruneError("one error and one cost per layer are needed to place ranks")
    if not 0.0 <= floor <= 1.0:
        raise ImpruneError(f"the uniform share of the placement must be in [0, 1], got {floor}")
    total = budget if budget is not None else rank * sum(costs)
    top = max(1, math.ceil(cap * rank))
    err = [max(e, 0.0) for e in errors]
    if sum(err) <= 0:
        err = [float(c) for c in costs]
    weights = [floor * c / sum(costs) + (1.0 - floor) * e / sum(err) for c, e in zip(costs, err)]  # parameter shares
    ranks = [0] * len(costs)
    free = set(range(len(costs)))
    left = total
    while free and left > 0:  # proportional shares; a layer at the cap drops out and the rest is re-shared
        share = sum(weights[i] for i in free)
        if share <= 0:
            break
        want = {i: left * weights[i] / share / costs[i] for i in free}  # fractional rank
        capped = [i for i in free if ranks[i] + want[i] >= top]
        if not capped:
            for i in free:
                ranks[i] += int(want[i])
            left = total - sum(r * c for r, c in zip(ranks, costs))
            rest = sorted(free, key=lambda i: (want[i] - int(want[i])), reverse=True)
            for i in rest:  # largest remainders first, while the budget allows another rank
                if costs[i] <= left and ranks[i] < top:
                    ranks[i] += 1
                    left -= costs[i]
            break
        for i in capped:
            ranks[i] = top
            free.discard(i)
        left = total - sum(r * c for r, c in zip(ranks, costs))
    return ranks


def gradient_spectra(student: torch.nn.Module, targets: list, windows: Windows, loss_of: Callable,
                     batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Singular values (descending) of the heal loss's gradient with respect to every target weight, summed
    over ``windows``, restricted to its kept weights (``Target.mask``): the update a masked LoRA of rank r can
    make along the loss's steepest directions gains, to first order, ``sqrt(sum of the top r sigma^2)`` per
    unit of Frobenius norm. ``loss_of(batch)``: the heal loss of a batch (a scalar with gradient)."""
    flags = {id(p): p.requires_grad for p in student.parameters()}
    was = student.training
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    weights = [t.module.weight for t in targets]
    for w in weights:
        w.requires_grad_(True)
        w.grad = None
    try:
        device = weights[0].device
        for batch in windows.batches(batch_size):
            loss_of(batch.to(device)).backward()
        spectra = {}
        for t, w in zip(targets, weights, strict=True):
            g = w.grad.detach().float() if w.grad is not None else torch.zeros_like(w, dtype=torch.float32)
            g = g.T if t.transposed else g  # [out, in]
            if t.mask is not None:
                g = g * t.mask.to(g.device, g.dtype)
            spectra[t.path] = torch.linalg.svdvals(g).cpu()  # [min(out, in)]
    finally:
        for w in weights:
            w.grad = None
        for p in student.parameters():
            p.requires_grad_(flags[id(p)])
        student.train(was)
    return spectra


def allocate_by_spectrum(costs: dict[str, int], spectra: dict[str, torch.Tensor], rank: int, budget: int,
                         cap: float = 4.0, floor: float = 0.5) -> dict[str, int]:
    """Rank per module under ``budget`` parameters: ``round(floor x rank)`` everywhere, then the rest one rank
    at a time to the module whose next singular direction gains most per parameter (``sigma^2 / cost``),
    each module capped at ``cap x rank`` and at its full rank. Per module the values fall, so greedy takes
    prefixes: the plan that, to first order, lets the budget's update lower the loss most."""
    if set(costs) != set(spectra) or not costs:
        raise ImpruneError("one cost and one gradient spectrum per module are needed to place ranks")
    if not 0.0 <= floor <= 1.0:
        raise ImpruneError(f"the uniform share of the placement must be in [0, 1], got {floor}")
    top = max(1, math.ceil(cap * rank))
    base = int(round(floor * rank))
    ranks = {p: min(base, len(spectra[p])) for p in costs}
    left = budget - sum(ranks[p] * costs[p] for p in costs)
    if left < 0:
        raise ImpruneError(f"a budget of {budget:,} cannot give every module the floor's rank {base}")
    items = sorted((-(float(s) ** 2) / costs[p], p, i) for p in costs for i, s in enumerate(spectra[p].tolist())
                   if ranks[p] <= i < min(top, len(spectra[p])))  # best gain per parameter first; ties by index
    for _, p, i in items:
        if i == ranks[p] and costs[p] <= left:
            ranks[p] += 1
            left -= costs[p]
    return ranks
