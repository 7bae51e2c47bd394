"""One heal of a pruned model, as `imprune heal` and the run's heal stage both do it.

``prepare`` checks the pair (``lineage.check_pair``: the teacher layer of every student layer) and draws the
training windows; ``HealJob.run`` heals the student in place (``train.heal``); ``HealJob.save`` writes the
healed folder with the pruning record plus the heal (``lineage.healed_record``) and the dense model's
lineage, so a healed folder reloads, compares and draws like the pruned one it came from. The callers only
differ in what surrounds it: the CLI measures perplexity around the heal and keeps its checkpoint beside
``--out``, the run keeps it among its stages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from importance.arch.canonical import model_map
from importance.data.sources import Windows, load_data
from importance.models.load import LoadedModel
from pruning.heal.config import HealConfig
from pruning.heal.lineage import check_pair, healed_record
from pruning.heal.train import HealResult, heal


@dataclass(frozen=True)
class HealJob:
    """A checked student / teacher pair with its training windows."""

    student: LoadedModel
    teacher: LoadedModel | None
    record: Mapping[str, Any] | None  # the pruned folder's imprune.json
    origin: list[int]  # teacher layer of every student layer
    train: Windows
    cfg: HealConfig

    def run(self, checkpoint: Path | None = None) -> HealResult:
        """Heal the student in place (merged, plain weights afterwards)."""
        return heal(self.student, self.teacher, self.train, self.cfg, self.origin, checkpoint)

    def save(self, result: HealResult, out: str | Path, teacher: str | None = None,
             perplexity: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
        """Write the healed student to ``out`` (atomically, ``pruning.io.save_model``)."""
        from pruning.io import save_model

        heal_rec = {**result.record(), "data": dict(self.train.meta), **({"teacher": teacher} if teacher else {})}
        return save_model(self.student, out, healed_record(self.record, self.origin, heal_rec, perplexity),
                          overwrite=overwrite, source=(self.record or {}).get("source_model"))


def prepare(student: LoadedModel, teacher: LoadedModel | None, record: Mapping[str, Any] | None, data: str,
            cfg: HealConfig, seq_len: int, seed: int) -> HealJob:
    """Check the pair and draw ``cfg.tokens`` training tokens of ``data`` (one-line errors, nothing trained)."""
    n_layers = model_map(student.model).n_layers
    origin = check_pair(student, teacher, n_layers, record) if teacher is not None else list(range(n_layers))
    limit = getattr(student.model.config, "max_position_embeddings", None)
    train = load_data(data, student.tokenizer, seq_len=seq_len, tokens=cfg.tokens, seed=seed, max_positions=limit)
    return HealJob(student, teacher, record, origin, train, cfg)
