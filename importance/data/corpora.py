"""Built-in offline text corpus: Jane Austen's six novels, from Debian's ``r-cran-janeaustenr`` package.

The package ships each novel as an R character vector (one element per printed line) in the lazy-load
database ``usr/lib/R/site-library/janeaustenr/data/Rdata.rdx`` / ``.rdb``; ``importance.data.rdata`` reads it
without R. The ``.deb`` is fetched once with ``apt-get download`` (no root needed while the apt package
lists exist) or taken from ``$IMPRUNE_AUSTEN_DEB``, unpacked with ``dpkg-deb -x`` under
``cache_root()/austen/deb``, and each novel is cached as UTF-8 text in ``cache_root()/austen/texts`` so
later calls only read a file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

from importance.errors import ImpruneError
from importance.store.cache import atomic_dir, atomic_file, cache_root

DEB_PACKAGE = "r-cran-janeaustenr"
DEB_ENV = "IMPRUNE_AUSTEN_DEB"
_DATA = Path("usr/lib/R/site-library/janeaustenr")

# The R object names, in publication order.
AUSTEN_OBJECTS: tuple[str, ...] = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma",
                                   "northangerabbey", "persuasion")
# Every accepted novel name -> its R object name: the six object names first (publication order), then
# short and full-title aliases.
AUSTEN_NOVELS: dict[str, str] = {
    **{name: name for name in AUSTEN_OBJECTS},
    "sense": "sensesensibility", "sense_and_sensibility": "sensesensibility",
    "pride": "prideprejudice", "pride_and_prejudice": "prideprejudice",
    "mansfield": "mansfieldpark", "mansfield_park": "mansfieldpark",
    "northanger": "northangerabbey", "northanger_abbey": "northangerabbey",
}
AUSTEN_TRAIN: tuple[str, ...] = AUSTEN_OBJECTS[:-1]  # every novel but the held-out one
AUSTEN_EVAL = "persuasion"

_NO_LISTS = ("Unable to locate package", "has no installation candidate", "Can't select candidate")


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired as err:
        raise ImpruneError(f"`{' '.join(cmd)}` took over 10 minutes; set {DEB_ENV}=/path/to/"
                           f"{DEB_PACKAGE}_*.deb to skip the download") from err


def _last_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E:")]
    return (errors or lines or [f"exit code {proc.returncode}"])[-1]


def _download_deb(folder: Path) -> Path:
    """``apt-get download`` the package into ``folder`` (running ``apt-get update`` once if needed)."""
    apt = shutil.which("apt-get")
    if apt is None:
        raise ImpruneError(f"apt-get not found, so the Austen corpus cannot be fetched; download "
                           f"{DEB_PACKAGE}_*.deb from packages.debian.org and set {DEB_ENV}=/path/to/it")
    proc = _run([apt, "download", DEB_PACKAGE], cwd=folder)
    if proc.returncode != 0 and any(s in proc.stderr for s in _NO_LISTS):  # empty package lists
        update = _run([apt, "update"])
        if update.returncode != 0:
            raise ImpruneError(f"apt-get knows no package {DEB_PACKAGE} and `apt-get update` failed "
                               f"({_last_line(update)}); run `sudo apt-get update`, or set "
                               f"{DEB_ENV}=/path/to/{DEB_PACKAGE}_*.deb")
        proc = _run([apt, "download", DEB_PACKAGE], cwd=folder)
    debs = sorted(folder.glob(f"{DEB_PACKAGE}_*.deb"))
    if proc.returncode != 0 or not debs:
        raise ImpruneError(f"`apt-get download {DEB_PACKAGE}` failed ({_last_line(proc)}); fix apt or set "
                           f"{DEB_ENV}=/path/to/{DEB_PACKAGE}_*.deb")
    return debs[-1]


def austen_package_dir() -> Path:
    """The unpacked ``janeaustenr`` R package folder (fetched and unpacked on first use, then cached)."""
    root = cache_root() / "austen" / "deb"
    pkg = root / _DATA
    if (pkg / "data" / "Rdata.rdb").is_file():
        return pkg
    dpkg = shutil.which("dpkg-deb")
    if dpkg is None:
        raise ImpruneError("dpkg-deb not found; install dpkg (`sudo apt-get install dpkg`) to unpack the "
                           f"Austen corpus from {DEB_PACKAGE}")
    if root.exists() and not (pkg / "data" / "Rdata.rdb").is_file():  # not left by atomic_dir: by hand?
        raise ImpruneError(f"{root} exists but holds no janeaustenr data; delete it and try again")
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix=".dl-", dir=root.parent) as download, atomic_dir(root) as tmp:
            given = os.environ.get(DEB_ENV)
            if given and not Path(given).expanduser().is_file():
                raise ImpruneError(f"{DEB_ENV}={given} is not a file; point it at a {DEB_PACKAGE}_*.deb")
            deb = Path(given).expanduser() if given else _download_deb(Path(download))
            proc = _run([dpkg, "-x", str(deb), str(tmp)])
            if proc.returncode != 0:
                raise ImpruneError(f"`dpkg-deb -x {deb}` failed ({_last_line(proc)}); is it a .deb?")
            if not (tmp / _DATA / "data" / "Rdata.rdb").is_file():
                raise ImpruneError(f"{deb} has no {_DATA}/data/Rdata.rdb; is it the {DEB_PACKAGE} package?")
    except OSError:
        if not (pkg / "data" / "Rdata.rdb").is_file():  # else another process unpacked it first
            raise
    return pkg


def _canonical(novel: str) -> str:
    name = AUSTEN_NOVELS.get(novel.strip().lower().replace("-", "_").replace(" ", "_"))
    if name is None:
        raise ImpruneError(f"unknown Austen novel {novel!r}; use one of {', '.join(AUSTEN_NOVELS)}")
    return name


def _extract_texts(folder: Path) -> None:
    """Parse the R data once and write every novel to ``folder/NAME.txt``."""
    from importance.data.rdata import read_lazyload

    data = austen_package_dir() / "data"
    objects = read_lazyload(data / "Rdata.rdx", data / "Rdata.rdb")
    for name in AUSTEN_OBJECTS:
        lines = objects.get(name)
        if not isinstance(lines, list) or not all(isinstance(ln, str | None) for ln in lines):
            raise ImpruneError(f"{data} has no character vector {name!r}; delete {cache_root() / 'austen'} "
                               "and try again")
        with atomic_file(folder / f"{name}.txt") as tmp:
            tmp.write_text("\n".join(ln or "" for ln in lines), encoding="utf-8", newline="")
            tmp.chmod(0o644)  # mkstemp makes it private; the cache may be shared


def austen_text(novel: str) -> str:
    """A novel (any ``AUSTEN_NOVELS`` key) as text: its lines joined with newlines, NA lines empty."""
    path = cache_root() / "austen" / "texts" / f"{_canonical(novel)}.txt"
    if not path.is_file():
        _extract_texts(path.parent)
    with open(path, encoding="utf-8", newline="") as fh:
        return fh.read()


def austen_texts(names: Iterable[str] = AUSTEN_OBJECTS) -> dict[str, str]:
    """Name (as given) -> text, for several novels; all six by default."""
    names = [names] if isinstance(names, str) else list(names)
    return {name: austen_text(name) for name in names}
