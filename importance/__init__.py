"""imprune's scoring half: which parts of a transformer matter.

``load_model`` -> ``model_map`` (the canonical component view) -> ``load_data`` -> ``score`` (one hooked
pass, every scorer) -> ``ImportanceTable`` -> ``heatmap``. Imports are lazy so ``import importance``
stays light (no torch/transformers until something is used).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_model": "importance.models.load", "LoadedModel": "importance.models.load",
    "model_map": "importance.arch.canonical", "register_arch": "importance.arch.canonical",
    "ArchSpec": "importance.arch.canonical",
    "load_data": "importance.data.sources", "Windows": "importance.data.sources",
    "score": "importance.scoring", "Statistics": "importance.engine.collect",
    "ImportanceTable": "importance.table", "SCORERS": "importance.scorers", "ImpruneError": "importance.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'importance' has no attribute {name!r}")
