"""Student and teacher belong together: the checks before a heal, and the record a healed folder keeps.

``check_pair`` refuses, in one line each, a student that is not a causal LM, a quantized student, a teacher
of another model (``importance.models.identity.check_same_model`` with ``derived``: the student may be the
teacher after pruning), a teacher whose tokenizer or vocabulary differs; it returns the teacher layer of
every student layer (the pruning record's ``layers_kept``, or the identity when no layer was removed).
``healed_record`` is the pruned folder's record with the heal added, so heatmaps, reports and reloads of
the healed folder see the same sparsity map, layer lineage and shapes as the pruned one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from importance.errors import ImpruneError
from importance.models.identity import check_same_model, lineage, model_facts
from importance.models.load import LoadedModel

_VOLATILE = ("source_model", "versions", "reload", "layer_shapes", "perplexity", "heal")


def _vocab_digest(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(repr(vocab).encode()).hexdigest()


def check_record(spec: str, record: Mapping[str, Any] | None, where: str = "--model") -> None:
    """Before loading: a quantized folder is refused (its weights are a grid, not something to fine-tune)."""
    if isinstance(record, Mapping) and (record.get("bits") or record.get("quantization")):
        raise ImpruneError(f"{where} {spec} is quantized; heal the pruned model first, then quantize it")


def check_student(student: LoadedModel, record: Mapping[str, Any] | None, where: str = "--model") -> None:
    check_record(student.spec, record, where)
    if student.task != "causal-lm":
        raise ImpruneError(f"{where} {student.spec} is a {student.task} model; `imprune heal` distills next-token "
                           "predictions: pass a causal language model")


def check_pair(student: LoadedModel, teacher: LoadedModel, n_student_layers: int,
               record: Mapping[str, Any] | None = None) -> list[int]:
    """The teacher layer of each student layer, after every compatibility check (module docstring);
    ``record``: the student's pruning record when the student is in memory, not loaded from its folder."""
    fix = "pass as --teacher the model that --model was pruned from"
    s_facts = replace(model_facts(student), where=f"--model {student.spec}")
    if isinstance(record, Mapping):
        source, kept_layers, pruned = lineage(record)
        s_facts = replace(s_facts, source=source, layers_kept=kept_layers, pruned=pruned)
    t_facts = replace(model_facts(teacher), where=f"--teacher {teacher.spec}")
    kept = check_same_model(t_facts, s_facts, fix, derived=True)
    s_vocab = student.model.get_output_embeddings().weight.shape[0]
    t_vocab = teacher.model.get_output_embeddings().weight.shape[0]
    if s_vocab != t_vocab or _vocab_digest(student.tokenizer) != _vocab_digest(teacher.tokenizer):
        raise ImpruneError(f"--teacher {teacher.spec} has another vocabulary or tokenizer than --model "
                           f"{student.spec} ({t_vocab:,} vs {s_vocab:,} output tokens); distillation compares "
                           f"next-token distributions token by token: {fix}")
    if kept is not None:
        return list(kept)
    if n_student_layers != t_facts.layers:
        raise ImpruneError(f"--model {student.spec} has {n_student_layers} layers and --teacher {t_facts.layers}, "
                           "and its imprune.json has no layers_kept that lines them up; " + fix)
    return list(range(n_student_layers))


def healed_record(pruned: Mapping[str, Any] | None, origin: list[int], heal: dict[str, Any],
                  perplexity: dict[str, Any] | None = None) -> dict[str, Any]:
    """imprune.json of a healed folder: the pruning record (what was removed, shapes) plus ``heal``."""
    base = {k: v for k, v in (pruned or {}).items() if k not in _VOLATILE}
    return {**base, "method": "heal", "pruned_by": (pruned or {}).get("method"), "layers_kept": origin,
            "shapes_changed": bool(base.get("shapes_changed")), "heal": heal,
            **({"perplexity": perplexity} if perplexity else {})}
