"""Provenance recorded with every artifact: library versions and a JSON writer that never half-writes."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from importance.store.cache import atomic_file


def versions() -> dict[str, str]:
    """Versions of imprune and the libraries whose numerics matter."""
    out = {"python": platform.python_version()}
    for dist in ("imprune", "torch", "transformers", "accelerate", "numpy", "datasets", "optimum-quanto"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def write_json(path: Path | str, data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON atomically (temporary file, then rename)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")
    return path


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        return {k: getattr(obj, k) for k in obj.__dataclass_fields__}
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")
