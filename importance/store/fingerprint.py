"""Fingerprints of a run's inputs, so that a changed data file or changed weights redo what depends on them.

``data_fingerprint(spec)`` and ``model_fingerprint(spec)`` return a short digest (``sha256:<16 hex>``) of what
defines the input, not of the spec string alone:

  ``file:PATH`` / a path    every file's relative path, size, mtime_ns and content hash (a folder: all its
                            files, hidden ones excepted, at most ``MAX_FILES`` of them content-hashed)
  a model folder / .gguf    the same over the folder's files (weights, config, tokenizer) or the one file
  ``austen:*`` / ``tasks:*`` the text or task items the spec yields (a hash of the content itself)
  ``builtin:NAME``          the converted cache folder the builtin loads (converted first if it is not yet)
  ``random:...``            the spec and the torch / transformers versions that draw the weights
  ``hub:...`` / a hub id    the spec, and for a hub id the locally cached snapshot's files when there is one

Content hashes are sha256 over the whole file, read in 1 MiB chunks (about 0.35 s for SmolLM2's 538 MB
safetensors here). A file larger than ``FULL_HASH_BYTES`` is hashed by its size, mtime_ns, its first MiB
(for a safetensors file: the whole header, i.e. every tensor's name, dtype, shape and offsets) and
``SAMPLES`` evenly spaced 1 MiB chunks, so fingerprinting stays a few seconds on a model of many GB.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from importance.errors import ImpruneError

CHUNK = 1 << 20
FULL_HASH_BYTES = 2 << 30  # files up to 2 GiB are hashed whole
SAMPLES = 64  # chunks hashed of a larger file, besides its header
MAX_FILES = 10_000  # a folder's files beyond these count by name, size and mtime only


def _digest(obj: Any) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_fingerprint(path: Path, content: bool = True) -> dict[str, Any]:
    """Size, mtime_ns and (``content``) a sha256 of one file: whole, or header + samples when it is large."""
    st = path.stat()
    out: dict[str, Any] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if not content:
        return out
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if st.st_size <= FULL_HASH_BYTES:
            while block := f.read(CHUNK):
                h.update(block)
            out["sha256"] = h.hexdigest()
            return out
        head = f.read(8)
        h.update(head)
        if path.suffix == ".safetensors" and len(head) == 8:
            h.update(f.read(min(struct.unpack("<Q", head)[0], 100 << 20)))  # the JSON header, bounded
        else:
            h.update(f.read(CHUNK))
        for i in range(SAMPLES + 1):
            f.seek(min(st.st_size - CHUNK, i * (st.st_size - CHUNK) // SAMPLES))
            h.update(f.read(CHUNK))
    out["sampled_sha256"] = h.hexdigest()
    return out


def path_fingerprint(path: Path) -> str:
    """Digest of a file, or of every (non-hidden) file below a folder with its relative path."""
    path = Path(path)
    if path.is_file():
        return _digest({"file": path.name, **file_fingerprint(path)})
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    return _digest({"folder": [(str(p.relative_to(path)), file_fingerprint(p, content=i < MAX_FILES))
                               for i, p in enumerate(files)]})


def data_fingerprint(spec: str, flag: str = "--data") -> str:
    """Digest of what a ``--data`` spec reads (see the module docstring); a missing file is one line."""
    kind, _, rest = spec.partition(":")
    if kind in ("austen", "tasks"):
        from importance.data.sources import read_source

        source = read_source(spec)
        return _digest({"spec": spec, "content": hashlib.sha256(
            json.dumps([source.texts, source.items]).encode()).hexdigest()})
    if kind == "hub":
        return _digest({"spec": spec})
    path = Path(rest if kind == "file" else spec).expanduser()
    if not path.exists():
        if kind == "file":
            raise ImpruneError(f"data file '{path}' does not exist; check the path given to {flag}")
        return _digest({"spec": spec})  # not a path: the data loader names what is wrong with it
    return _digest({"spec": spec, "path": path_fingerprint(path)})


def model_fingerprint(spec: str) -> str:
    """Digest of what a ``--model`` spec loads (see the module docstring)."""
    spec = spec.strip()
    if spec.startswith("random:"):
        from importance.store.meta import versions

        v = versions()
        return _digest({"spec": spec, "torch": v.get("torch"), "transformers": v.get("transformers")})
    if spec.startswith("builtin:"):
        from importance.models.load import builtin_folder

        return _digest({"spec": spec, "folder": path_fingerprint(builtin_folder(spec.split(":", 1)[1]))})
    path = Path(spec).expanduser()
    if path.exists():
        return _digest({"spec": spec, "path": path_fingerprint(path)})
    try:  # a hub id: the snapshot in the local Hugging Face cache, when there is one
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(spec, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or not a hub id): the loader says what is wrong
        return _digest({"spec": spec})
    return _digest({"spec": spec, "path": path_fingerprint(folder)})
