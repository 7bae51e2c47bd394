"""Writing outputs so that nothing is ever lost: the one helper every command that writes a file or folder uses.

Rules (checked by ``check_target`` before any work, and again by ``publish`` before it replaces anything):

* An existing output is replaced only with ``overwrite``, and only when imprune wrote it: a folder must hold
  one of imprune's marker files (``imprune.json``, ``table.json``, ``metrics.json``, ``validation.json``,
  ``quantization.json``, ``probe.json``, each recognised by its content) or be empty; a file output replaces
  a regular file only. Never ``/``, the home folder, the current folder or one of its parents, an input of
  the command (``protect``: the ``--model`` folder, a table, a data file) or a parent of one, a symbolic
  link, a file where a folder is written or a folder where a file is.
* The nearest existing parent must be writable: a probe entry is created there and removed at once.
* ``publish(final)`` yields a new temporary sibling ``.NAME.tmp-<pid>-XXXX``; when the caller's block has
  written it completely it is swapped in: on Linux by one atomic ``renameat2(RENAME_EXCHANGE)``, elsewhere
  (or on file systems without it) by renaming the old output to ``.NAME.old-<pid>-XXXX`` and the new one in.
  Only then is the old copy deleted, so at every instant one complete output exists under ``final``.
* Any ``OSError`` while writing (a full disk, a read-only mount) removes the temporary, leaves the old output
  as it was and becomes one ``ImpruneError`` line.
* Temporaries of processes that are gone (SIGKILL, power loss) are removed by the next write of the same
  target, and a fallback swap interrupted between its two renames (``final`` missing, an ``.old`` left) is
  undone first.

Test hook: with ``IMPRUNE_TEST_PAUSE_WRITE=SECONDS`` set, ``publish`` sleeps that long after the new folder is
complete and just before it replaces an existing folder, so a test can signal the process at that moment.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from importance.errors import ImpruneError

Kind = Literal["dir", "file"]
PAUSE_ENV = "IMPRUNE_TEST_PAUSE_WRITE"


def _pause(seconds: float) -> None:
    """The fault tests' pause before a swap, in short sleeps. While it lasts, SIGINT only sets a flag and the loop
    itself raises KeyboardInterrupt: raised by the default handler, it could land in a finaliser that the garbage
    collector runs during the sleeps, where Python prints it as ignored and the pause goes on."""
    hit: list[int] = []
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda *_: hit.append(1)) if main else None
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not hit:
            time.sleep(0.05)
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    if hit:
        raise KeyboardInterrupt


def _json(path: Path) -> dict[str, Any] | None:
    try:
        if path.stat().st_size > 64 * 2**20:
            return None
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _imprune_schema(doc: dict[str, Any], key: str = "schema") -> bool:
    return str(doc.get(key, "")).startswith("imprune.")


# marker file -> what its content must show for the folder to count as imprune's
MARKERS: dict[str, Any] = {
    "imprune.json": lambda d: True,  # a pruned / quantized model's record
    "table.json": lambda d: "scorers" in d and "layers" in d,  # an importance table
    "metrics.json": _imprune_schema,  # a finished `imprune run` folder
    "validation.json": _imprune_schema,
    "quantization.json": lambda d: _imprune_schema(d, "format"),
    "probe.json": _imprune_schema,  # `imprune probe` (older probe folders: heads.png beside table folders)
}


def is_imprune_output(folder: str | Path) -> bool:
    """True when ``folder`` holds one of imprune's marker files (see ``MARKERS``)."""
    folder = Path(folder)
    for name, test in MARKERS.items():
        path = folder / name
        if path.is_file() and not path.is_symlink() and (doc := _json(path)) is not None and test(doc):
            return True
    # a probe folder written before probe.json existed: heads.png and table folders, nothing else
    entries = list(folder.iterdir()) if folder.is_dir() else []
    return (folder / "heads.png").is_file() and len(entries) > 1 and all(
        p.name == "heads.png" or (p.is_dir() and is_imprune_output(p)) for p in entries)


# ----------------------------------------------------------------------------------------- messages

def _cache_base() -> Path:
    return Path(os.environ.get("IMPRUNE_CACHE") or Path.home() / ".cache" / "imprune").expanduser().absolute()


def _hint(final: Path, flag: str) -> str:
    with contextlib.suppress(ValueError):
        final.absolute().relative_to(_cache_base())
        return "free space or set IMPRUNE_CACHE to a folder on another disk"
    return f"free space or choose another {flag}"


def write_error(err: BaseException, final: Path, flag: str = "--out") -> ImpruneError:
    """One line for an error met while writing ``final`` (a full disk, a read-only mount, ...)."""
    code = getattr(err, "errno", None)
    text = str(err)
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "os error 28" in text \
            or "StorageFull" in text:
        return ImpruneError(f"no space left on device while writing {final}; {_hint(final, flag)}")
    if code == errno.EROFS:
        return ImpruneError(f"cannot write {final}: read-only file system; choose another {flag}")
    if code in (errno.EACCES, errno.EPERM):
        where = getattr(err, "filename", None) or final
        return ImpruneError(f"cannot write {final}: permission denied on '{where}'; choose another {flag}")
    reason = getattr(err, "strerror", None) or (text.splitlines()[0][:160] if text else type(err).__name__)
    return ImpruneError(f"could not write {final} ({reason}); nothing was replaced; choose another {flag}")


# ----------------------------------------------------------------------------------------- checks

def _path_of(spec: str | Path | None) -> Path | None:
    """The local path an input spec names (``file:`` data specs too), or None (hub ids, random:, builtin:)."""
    if spec is None:
        return None
    text = str(spec)
    text = text[len("file:"):] if text.startswith("file:") else text
    path = Path(text).expanduser()
    return path.resolve() if text and os.path.lexists(path) else None


def _refuse(final: Path, kind: Kind, protect: Mapping[str, Any], flag: str) -> None:
    """Raise when the existing ``final`` is something ``--overwrite`` must not replace."""
    shown = str(final)
    if final.is_symlink():
        raise ImpruneError(f"'{shown}' is a symbolic link; imprune replaces only what it wrote: remove the link "
                           f"or choose another {flag}")
    real = final.resolve()
    cwd = Path.cwd().resolve()
    if real == Path(real.anchor):
        raise ImpruneError(f"'{shown}' is the root folder; choose a new folder for {flag}")
    if real == Path.home().resolve():
        raise ImpruneError(f"'{shown}' is your home folder; choose a new folder for {flag}")
    if real == cwd or real in cwd.parents:
        what = "the current folder" if real == cwd else "a parent of the current folder"
        raise ImpruneError(f"'{shown}' is {what}; --overwrite never replaces it: choose a new folder for {flag}")
    for name, spec in protect.items():
        src = _path_of(spec)
        if src is not None and (real == src or real in src.parents):
            what = f"the {name} input" if real == src else f"a parent of the {name} input '{spec}'"
            raise ImpruneError(f"'{shown}' is {what}; --overwrite never replaces an input: choose another {flag}")
    if kind == "dir":
        if not real.is_dir():
            raise ImpruneError(f"'{shown}' is a file, not a folder imprune wrote; remove it yourself or choose "
                               f"another {flag}")
        if any(real.iterdir()) and not is_imprune_output(real):
            raise ImpruneError(f"'{shown}' is not an imprune output (no {', '.join(MARKERS)}); --overwrite "
                               f"replaces only folders imprune wrote: choose another {flag} or remove it yourself")
    elif real.is_dir():
        raise ImpruneError(f"'{shown}' is a folder; {flag} names a file here: choose another path")
    elif not real.is_file():
        raise ImpruneError(f"'{shown}' is not a regular file; choose another {flag}")


def _try_create(folder: Path, name: str) -> None:
    """Create and remove one temporary entry in ``folder`` (raises OSError when it cannot be written)."""
    os.rmdir(tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=folder))


def check_writable(final: str | Path, flag: str = "--out") -> None:
    """Raise one line unless a new entry can be created where ``final`` will be written."""
    final = Path(final)
    parent = final.absolute().parent
    while not parent.exists() and parent != parent.parent:
        if parent.is_symlink():  # a dangling link
            break
        parent = parent.parent
    if not parent.is_dir():
        raise ImpruneError(f"cannot write {final}: '{parent}' is not a folder; choose another {flag}")
    try:
        _try_create(parent, final.name)
    except OSError as err:
        raise write_error(err, final, flag) from None


def check_target(path: str | Path, overwrite: bool, *, kind: Kind = "dir",
                 protect: Mapping[str, Any] | None = None, flag: str = "--out") -> Path:
    """All checks on an output before any work: exists without ``overwrite``, may not be replaced, not writable.

    Also cleans this target's stale temporaries first (and restores an output an interrupted swap left aside).
    """
    out = Path(path).expanduser()
    clean_stale(out)
    if os.path.lexists(out):
        if not overwrite:
            raise ImpruneError(f"output '{out}' already exists; choose another path or pass --overwrite")
        _refuse(out, kind, protect or {}, flag)
    check_writable(out, flag)
    return out


# ----------------------------------------------------------------------------------------- stale temporaries

def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return True  # cannot tell: keep it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):  # a killed child not yet reaped is a zombie: gone
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def clean_stale(final: str | Path) -> list[Path]:
    """Remove ``.NAME.tmp-<pid>-*`` / ``.NAME.old-<pid>-*`` of processes that are gone; when ``final`` is
    missing and such an ``.old`` exists (a swap killed between its renames), rename it back first."""
    final = Path(final)
    parent = final.parent
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(tmp|old)-(\d+)-[^/]+$")
    try:
        entries = [(m.group(1), Path(e.path)) for e in os.scandir(parent) if (m := pattern.match(e.name))
                   and not _alive(int(m.group(2)))]
    except OSError:
        return []
    olds = sorted((p for k, p in entries if k == "old"), key=lambda p: p.lstat().st_mtime, reverse=True)
    if olds and not os.path.lexists(final):
        with contextlib.suppress(OSError):
            os.rename(olds[0], final)
            olds = olds[1:]
    removed = []
    for kind, path in entries:
        if kind == "tmp" or path in olds:
            _remove(path)
            removed.append(path)
    return removed


# ----------------------------------------------------------------------------------------- the swap

AT_FDCWD = -100
RENAME_EXCHANGE = 2
_renameat2: Any = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two existing paths (Linux renameat2); False when the system cannot."""
    global _renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (AttributeError, OSError):
            _renameat2 = False
    if not _renameat2:
        return False
    if _renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def swap_in(new: Path, final: Path) -> None:
    """Put the complete ``new`` at ``final``; an existing ``final`` is deleted only after ``new`` took its place."""
    if not os.path.lexists(final):
        os.rename(new, final)
        return
    if not new.is_dir() or not final.is_dir():
        os.replace(new, final)  # a file: one atomic rename
        return
    if _exchange(new, final):
        _remove(new)  # holds the old output now
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-{os.getpid()}-", dir=final.parent))
    try:
        os.replace(final, old)  # onto the empty folder reserving the unique name
    except OSError:
        os.rmdir(old)
        os.rename(final, old)
    try:
        os.replace(new, final)
    except BaseException:
        os.replace(old, final)
        raise
    _remove(old)


class _Appeared(Exception):
    """``final`` was created by someone else while ``publish`` wrote it (without ``overwrite``)."""


@contextlib.contextmanager
def publish(final: str | Path, *, kind: Kind = "dir", overwrite: bool = False,
            protect: Mapping[str, Any] | None = None, create: bool = True, check: bool = True,
            keep_existing: bool = False, flag: str = "--out") -> Iterator[Path]:
    """Yield a new temporary sibling of ``final``; when the block succeeds, swap it in (see module docstring).

    ``create=False`` yields a name that does not exist yet, for writers that create the output themselves.
    ``check=False`` skips the refusal rules (replacing any regular file, as ``atomic_file`` always did).
    ``keep_existing`` (caches): when ``final`` exists by the time the block is done (another process wrote
    it), the new copy is discarded and the existing one kept.
    An ``OSError`` inside the block becomes one ``ImpruneError`` line; the old output stays as it was.
    """
    final = Path(final).expanduser()
    clean_stale(final)
    if os.path.lexists(final) and not keep_existing:
        if not overwrite:
            raise ImpruneError(f"output '{final}' already exists; choose another path or pass --overwrite")
        if check:
            _refuse(final, kind, protect or {}, flag)
    prefix = f".{final.name}.tmp-{os.getpid()}-"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if kind == "dir":
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
            if not create:
                os.rmdir(tmp)
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=final.parent)
            os.close(fd)
            tmp = Path(name)
            if not create:
                tmp.unlink()
    except OSError as err:
        raise write_error(err, final, flag) from None
    try:
        yield tmp
        if not os.path.lexists(tmp):
            raise ImpruneError(f"nothing was written for {final}")
        os.chmod(tmp, 0o755 if tmp.is_dir() else 0o644)  # mkdtemp / mkstemp make them private
        if os.path.lexists(final):
            if keep_existing:
                _remove(tmp)
                return
            if not overwrite:  # appeared while we wrote: someone else's now
                raise _Appeared(final)
            if os.environ.get(PAUSE_ENV) and final.is_dir():
                _pause(float(os.environ[PAUSE_ENV]))
        swap_in(tmp, final)
    except ImpruneError:
        _remove(tmp)
        raise
    except _Appeared as err:
        _remove(tmp)
        raise ImpruneError(f"output '{final}' appeared while imprune was writing it; nothing was replaced; "
                           f"choose another {flag} or pass --overwrite") from err
    except OSError as err:
        _remove(tmp)
        raise write_error(err, final, flag) from None
    except BaseException as err:
        _remove(tmp)
        if isinstance(err, Exception) and ("No space left" in str(err) or "os error 28" in str(err)):
            raise write_error(err, final, flag) from None  # e.g. safetensors' own I/O error
        raise
