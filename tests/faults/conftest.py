"""Fixtures of the fault-injection suite: run the CLI as a user would and check what it left on disk.

``cli(argv)`` runs ``imprune`` in-process (fast; a traceback there is a raised exception, so it fails the
test), ``cli_proc(argv)`` in a child process (for kills, signals, environment changes). ``fails(...)`` asserts
the contract for bad input: exit 2, exactly one stderr line that starts with ``imprune CMD: error:`` and has
no "Traceback", and the watched folders unchanged. ``sentinel`` is a folder of user files that no command may
touch; ``snapshot(root)`` records every path with its size and content hash so a test can compare before/after.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from pruning.cli.core import main

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # `from conftest import tiny` reaches tests/conftest.py


@dataclass(frozen=True)
class Result:
    rc: int
    out: str
    err: str


def snapshot(root: Path) -> dict[str, str]:
    """Every path below ``root`` -> 'dir' or 'size:sha256' (what a test compares before / after)."""
    state: dict[str, str] = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        state[rel] = "dir" if p.is_dir() else f"{p.stat().st_size}:{hashlib.sha256(p.read_bytes()).hexdigest()}"
    return state


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    def run(argv: list[str]) -> Result:
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        cap = capsys.readouterr()
        return Result(rc, cap.out, cap.err)

    return run


@pytest.fixture
def run(capfd: pytest.CaptureFixture[str]) -> Callable[[list], Result]:
    """``imprune argv`` in-process; stdout / stderr captured at the file descriptors; argparse exits count."""

    def call(argv: list) -> Result:
        capfd.readouterr()
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as stop:
            rc = int(stop.code or 0)
        cap = capfd.readouterr()
        return Result(rc, cap.out, cap.err)

    return call


@pytest.fixture
def cli_proc() -> Callable[..., Result]:
    def run(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 300) -> Result:
        proc = subprocess.run([sys.executable, "-m", "pruning", *map(str, argv)], cwd=cwd, capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, **(env or {})})
        return Result(proc.returncode, proc.stdout, proc.stderr)

    return run


def assert_one_line_error(res: Result, command: str, expect: str | None = None) -> str:
    """Exit 2, one stderr line naming the command, no traceback; ``expect`` must appear in it."""
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert res.rc == 2, (res.rc, res.err[-2000:])
    assert "Traceback" not in res.err, res.err[-2000:]
    assert len(lines) == 1, res.err[-2000:]
    assert lines[0].startswith(f"imprune {command}: error: "), lines[0]
    if expect is not None:
        assert expect in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    """A folder of user files (nested, one large-ish) that every command must leave exactly as it was."""
    root = tmp_path / "user_files"
    (root / "nested").mkdir(parents=True)
    (root / "notes.txt").write_text("my notes\n")
    (root / "nested" / "data.bin").write_bytes(os.urandom(4096))
    return root
