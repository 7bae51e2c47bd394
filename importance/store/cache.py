"""Where imprune keeps what it derives once: converted models, unpacked corpora.

The root is ``$IMPRUNE_CACHE`` when set, else ``~/.cache/imprune``. Everything below it is written
through ``atomic_dir`` so an interrupted conversion never leaves a folder that looks finished. Both helpers
are thin wrappers of ``importance.store.outputs.publish``, the one writer of every output.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from importance.store.outputs import publish


def cache_root() -> Path:
    """The cache root folder (created on first use)."""
    root = Path(os.environ.get("IMPRUNE_CACHE") or Path.home() / ".cache" / "imprune").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success rename it to ``final``, on error remove it.

    For caches (``importance.store.outputs.publish`` does the work): when ``final`` exists by the time the folder
    is complete (another process finished first), the new copy is discarded. The rename is atomic on one
    file system, so readers either see the complete folder or none; a full disk is one ``ImpruneError``.
    """
    with publish(final, kind="dir", keep_existing=True) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_file(final: Path, mode: str = "w") -> Iterator[Path]:
    """Yield a temporary sibling path for ``final``; rename it into place only on success (an existing file
    is replaced in one atomic rename; a full disk is one ``ImpruneError`` and leaves the old file)."""
    with publish(final, kind="file", overwrite=True, check=False) as tmp:
        yield tmp
