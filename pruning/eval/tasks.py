"""Accuracy on multiple-choice items: the eight built-in probes (``importance.data.tasks``) and any item list.

Per item, each choice (the answer and its distractors) is scored by its summed log-likelihood given the
prompt, log p(choice tokens | prompt tokens), tokens encoded without special tokens like the scoring data
(prompt and choice tokenized apart, so the choice's tokens are the ones the task loss counts). Two
accuracies, as lm-evaluation-harness defines them for multiple choice:

- ``acc``: the answer has the highest summed log-likelihood;
- ``acc_norm``: the highest log-likelihood per character of the choice (lm-eval's length normalisation).

A tie at the top counts as 1 / (number of tied choices) when the answer is among them: the expected score of
breaking the tie at random, so a model that cannot tell the choices apart scores the chance level, not 0 or 1.
``chance`` = mean over items of 1 / number of choices; ``stderr`` = sqrt(p (1 - p) / n); ``answer_nll`` = the
answers' summed NLL over their summed token count (the probes' task loss). Items with a single choice (no
distractor) are skipped and counted.

``loglikelihoods`` is the one scoring loop; ``pruning.eval.harness`` serves lm-eval's requests through it.
Inputs that end the same way are run once: all one-token choices of a prompt share the prompt's forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from importance.data.tasks import TASKS, TaskItem, generate
from importance.errors import ImpruneError
from importance.models.load import input_device

PROBES_ALIASES = ("probes", "tasks:all", "all")


@dataclass(frozen=True)
class TaskAccuracy:
    """Accuracy of one task; ``n`` items scored (``skipped`` had no distractor)."""

    task: str
    acc: float
    acc_norm: float
    chance: float
    n: int
    stderr: float
    stderr_norm: float
    skipped: int = 0
    source: str = "probe"
    answer_nll: float = float("nan")  # mean NLL per answer token (the task loss) over the scored items

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stderr(p: float, n: int) -> float:
    return math.sqrt(max(p * (1.0 - p), 0.0) / n) if n else float("nan")


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _start_token(tokenizer: Any) -> int:
    """The token an empty context starts from (lm-eval's choice too: BOS, else EOS)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if tid is not None:
            return int(tid)
    return 0


def max_length(model: Any) -> int:
    cfg = model.config
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048)


@torch.no_grad()
def token_logliks(model: Any, requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 16,
                  start_token: int = 0, progress: bool = False) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): (sum of log p(continuation | context), whether every
    continuation token is the greedy argmax). The input keeps the last ``max_length`` tokens."""
    limit = max_length(model)
    device = input_device(model)
    # one model input per distinct (context + continuation[:-1]); each request reads its last len(cont) rows
    inputs: dict[tuple[int, ...], list[int]] = {}
    plan: list[tuple[int, list[int]]] = []
    for ctx, cont in requests:
        if not cont:
            raise ValueError("a continuation needs at least one token")
        whole = [*(ctx if ctx else [start_token]), *cont][-(limit + 1):]
        key = tuple(whole[:-1])
        plan.append((inputs.setdefault(key, [len(inputs)])[0], list(cont)))
    order = sorted(inputs, key=len, reverse=True)
    rows: dict[int, torch.Tensor] = {}  # input index -> [T, V] log-probs of the last positions it serves
    need: dict[int, int] = {}
    for idx, cont in plan:
        need[idx] = max(need.get(idx, 0), len(cont))
    bar = tqdm(total=len(order), desc="loglik", unit="seq", disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = len(chunk[0])
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, key in enumerate(chunk):  # right padding: positions of real tokens are unchanged
            ids[i, :len(key)] = torch.tensor(key)
            attn[i, :len(key)] = 1
        out = model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out[0]  # [B, T, V]
        for i, key in enumerate(chunk):
            idx = inputs[key][0]
            k = need[idx]
            rows[idx] = F.log_softmax(logits[i, len(key) - k:len(key)].float(), dim=-1).cpu()  # [k, V]
        bar.update(len(chunk))
    bar.close()
    results = []
    for idx, cont in plan:
        lp = rows[idx][-len(cont):]  # [len(cont), V]
        target = torch.tensor(cont)
        ll = float(lp.gather(1, target[:, None]).sum())
        results.append((ll, bool((lp.argmax(-1) == target).all())))
    return results


def loglikelihoods(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], batch_size: int = 16,
                   progress: bool = False) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy) of each (context, continuation) string pair, tokenized apart."""
    reqs = [(_encode(tokenizer, c), _encode(tokenizer, x)) for c, x in pairs]
    return token_logliks(model, reqs, batch_size, _start_token(tokenizer), progress)


def score_choices(lls: Sequence[float], choices: Sequence[str]) -> tuple[float, float]:
    """(acc, acc_norm) credit of one item whose answer is ``choices[0]``; ties share the credit."""

    def credit(values: Sequence[float]) -> float:
        top = max(values)
        tied = [i for i, v in enumerate(values) if v == top]
        return 1.0 / len(tied) if 0 in tied else 0.0

    return credit(lls), credit([v / max(len(c), 1) for v, c in zip(lls, choices)])


def accuracy(model: Any, tokenizer: Any, items: Sequence[TaskItem], task: str = "items", batch_size: int = 16,
             progress: bool = False, source: str = "probe") -> TaskAccuracy:
    """Multiple-choice accuracy of ``model`` on ``items`` (answer = ``choices[0]``)."""
    used = [it for it in items if it.distractors]
    pairs = [(it.prompt, c) for it in used for c in it.choices]
    lls = [ll for ll, _ in loglikelihoods(model, tokenizer, pairs, batch_size, progress)] if pairs else []
    acc = norm = chance = nll = 0.0
    at = answer_tokens = 0
    for it in used:
        k = len(it.choices)
        a, b = score_choices(lls[at:at + k], it.choices)
        nll, answer_tokens = nll - lls[at], answer_tokens + len(_encode(tokenizer, it.answer))
        acc, norm, chance, at = acc + a, norm + b, chance + 1.0 / k, at + k
    n = len(used)
    if n == 0:
        raise ImpruneError(f"task '{task}' has no item with distractors; multiple-choice accuracy needs choices")
    acc, norm, chance = acc / n, norm / n, chance / n
    return TaskAccuracy(task, acc, norm, chance, n, stderr(acc, n), stderr(norm, n), len(items) - n, source,
                        nll / max(answer_tokens, 1))


def probe_names(spec: str) -> tuple[list[str], list[str]]:
    """Split a ``--tasks`` list into (built-in probes, other task names); 'probes' (or 'tasks:all') = all eight."""
    probes: list[str] = []
    others: list[str] = []
    for name in (s.strip() for s in spec.split(",")):
        if not name:
            continue
        if name in PROBES_ALIASES:
            probes.extend(TASKS)
        elif name.startswith("tasks:") and name[6:] in TASKS:
            probes.append(name[6:])
        elif name in TASKS:
            probes.append(name)
        else:
            others.append(name)
    if not probes and not others:
        raise ImpruneError("--tasks is empty; name tasks, e.g. --tasks probes or --tasks knowledge,math")
    return list(dict.fromkeys(probes)), list(dict.fromkeys(others))


def probe_accuracy(lm: Any, names: Sequence[str], limit: int, seed: int = 0, batch_size: int = 16,
                   progress: bool = False) -> list[TaskAccuracy]:
    """Accuracy on the first ``limit`` items of each built-in probe (``generate(name, limit, seed)``)."""
    if lm.task != "causal-lm":
        raise ImpruneError("probe accuracy compares answer log-likelihoods and needs a causal language model")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ImpruneError(f"--limit must be a positive number of items, got {limit!r}")
    return [accuracy(lm.model, lm.tokenizer, generate(n, limit, seed), n, batch_size, progress) for n in names]


def table(results: Sequence[TaskAccuracy]) -> str:
    """The printed table: one row per task, accuracy with its standard error, chance beside it."""
    lines = [f"{'task':<16} {'acc':>7} {'±':>6} {'acc_norm':>9} {'±':>6} {'chance':>7} {'n':>5}  source"]
    for r in results:
        lines.append(f"{r.task:<16} {r.acc:>7.3f} {r.stderr:>6.3f} {r.acc_norm:>9.3f} {r.stderr_norm:>6.3f} "
                     f"{r.chance:>7.3f} {r.n:>5}  {r.source}")
    if len(results) > 1:
        m = lambda f: sum(getattr(r, f) for r in results) / len(results)  # noqa: E731
        lines.append(f"{'mean':<16} {m('acc'):>7.3f} {'':>6} {m('acc_norm'):>9.3f} {'':>6} {m('chance'):>7.3f}")
    lines.append("acc: answer has the highest summed log-likelihood; acc_norm: per character (lm-eval's "
                 "definitions); ± = sqrt(p(1-p)/n)")
    return "\n".join(lines)
