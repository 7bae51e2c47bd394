"""Outputs are never lost: what ``--overwrite`` refuses, read-only and full disks, interrupted saves.

Every command writes through ``importance.store.outputs`` (``check_target`` before any work, ``publish`` to swap a
complete temporary in). These tests run the CLI as a user would and compare the file system before / after.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from importance.errors import ImpruneError
from importance.models.load import load_model
from importance.store import outputs as O
from importance.table import ImportanceTable
from pruning.cli.core import main

from .conftest import REPO, assert_one_line_error, snapshot

TINY = ["--seq-len", "32", "--tokens", "64", "--quiet"]
MODEL = ["--model", "random:llama"]


def _prune_argv(text: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", *MODEL, "--method", "unstructured", "--sparsity", "0.5", "--data", f"file:{text}", *TINY,
            "--no-eval", "--out", str(out), *extra]


def _score_argv(text: Path, out: Path, *extra: str) -> list[str]:
    return ["score", *MODEL, "--data", f"file:{text}", "--scorers", "magnitude,taylor", *TINY, "--out", str(out),
            *extra]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, text_file: Path) -> dict[str, Path]:
    """A pruned model folder and an importance table, written once (copy them before changing them)."""
    root = tmp_path_factory.mktemp("built")
    assert main(_prune_argv(text_file, root / "model")) == 0
    assert main(_score_argv(text_file, root / "table")) == 0
    return {"model": root / "model", "table": root / "table"}


# ----------------------------------------------------------------------------------------- refusals

def test_prune_out_dot_overwrite_in_a_user_folder_touches_nothing(cli_proc, sentinel: Path, text_file: Path):
    before = snapshot(sentinel)
    res = cli_proc(_prune_argv(text_file, Path(".")) + ["--overwrite"], cwd=sentinel)
    assert_one_line_error(res, "prune", "'.' is the current folder; --overwrite never replaces it")
    assert snapshot(sentinel) == before


@pytest.mark.parametrize("command", ["prune", "quantize"])
@pytest.mark.parametrize("case", ["cwd", "cwd-parent", "model", "model-parent", "scores", "user-folder", "file",
                                  "symlink", "root", "home"])
def test_overwrite_refuses_what_imprune_did_not_write(cli, monkeypatch, tmp_path: Path, sentinel: Path,
                                                      built: dict[str, Path], text_file: Path, command: str,
                                                      case: str):
    model = tmp_path / "models" / "pruned"
    shutil.copytree(built["model"], model)
    monkeypatch.chdir(sentinel)
    (tmp_path / "link").symlink_to(built["table"], target_is_directory=True)
    out, expect = {
        "cwd": (".", "is the current folder"), "cwd-parent": ("..", "is a parent of the current folder"),
        "model": (model, "is the --model input"), "model-parent": (model.parent, "a parent of the --model input"),
        "scores": (built["table"], "is the --scores input"),
        "user-folder": (sentinel / "nested", "is not an imprune output"),
        "file": (sentinel / "notes.txt", "is a file, not a folder imprune wrote"),
        "symlink": (tmp_path / "link", "is a symbolic link"), "root": ("/", "is the root folder"),
        "home": (Path.home(), "is your home folder"),
    }[case]
    watched = {p: snapshot(p) for p in (tmp_path, built["table"])}
    if command == "prune":
        argv = ["prune", "--model", str(model), "--method", "unstructured", "--sparsity", "0.5",
                "--scores", str(built["table"]), "--no-eval", "--out", str(out), "--overwrite"]
    else:
        argv = ["quantize", "--model", str(model), "--scores", str(built["table"]), "--budget", "8", "--choices",
                "8", "--no-eval", "--out", str(out), "--overwrite"]
    if case == "home" and Path.home().resolve() in {sentinel.resolve(), *sentinel.resolve().parents}:
        pytest.skip("the home folder holds the test folder (the current-folder rule answers first)")
    assert_one_line_error(cli(argv), command, expect)
    assert {p: snapshot(p) for p in watched} == watched


@pytest.mark.parametrize("command, argv, expect", [
    ("report", ["report", "RUN", "--out", "DIR", "--overwrite"], "is a folder; --out names a file here"),
    ("heatmap", ["heatmap", "RUN", "--out", "DIR", "--overwrite"], "is a folder; --out names a file here"),
    ("eval", ["eval", "--model", "no-such-model", "--out", "DIR", "--overwrite"], "is a folder"),
])
def test_file_outputs_replace_only_a_regular_file(cli, tmp_path: Path, built, command, argv, expect):
    target = tmp_path / ("x.png" if command == "heatmap" else "x.html")
    (target / "inner").mkdir(parents=True)
    (target / "inner" / "keep.txt").write_text("keep")
    argv = [str(built["table"]) if a == "RUN" else str(target) if a == "DIR" else a for a in argv]
    before = snapshot(tmp_path)
    assert_one_line_error(cli(argv), command, expect)
    assert snapshot(tmp_path) == before


def test_eval_refuses_to_overwrite_its_data_file(cli, tmp_path: Path, text_file: Path):
    data = tmp_path / "data.txt"
    shutil.copy(text_file, data)
    before = snapshot(tmp_path)
    res = cli(["eval", "--model", "no-such-model", "--data", f"file:{data}", "--out", str(data), "--overwrite"])
    assert_one_line_error(res, "eval", "is the --data input")
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------- fixed sibling names

def test_validate_leaves_an_unrelated_x_new_alone(cli, tmp_path: Path, built, text_file: Path):
    out = tmp_path / "X"
    (tmp_path / "X.new").mkdir()
    (tmp_path / "X.new" / "mine.txt").write_text("not imprune's")
    (tmp_path / "X.old").write_text("also mine")
    table = tmp_path / "table"
    shutil.copytree(built["table"], table)
    argv = ["validate", *MODEL, "--scores", str(table), "--granularity", "layer", "--eval-data",
            f"file:{text_file}", "--eval-tokens", "64", "--eval-seq-len", "32", "--quiet", "--out", str(out)]
    mine = {"X.new": snapshot(tmp_path / "X.new"), "X.old": (tmp_path / "X.old").read_text()}
    assert cli(argv).rc == 0
    first = json.loads((out / "validation.json").read_text())
    assert cli([*argv, "--overwrite", "--seed", "1"]).rc == 0
    assert json.loads((out / "validation.json").read_text())["schema"] == first["schema"]
    assert ImportanceTable.load(out / "ablation").scorers == ["ablation"]
    assert {"X.new": snapshot(tmp_path / "X.new"), "X.old": (tmp_path / "X.old").read_text()} == mine
    assert _temporaries(tmp_path) == []


def test_table_overwrite_with_a_user_out_old_present(cli, tmp_path: Path, text_file: Path):
    out = tmp_path / "T"
    old = tmp_path / "T.old"
    old.mkdir()
    (old / "precious.txt").write_text("user data")
    assert cli(_score_argv(text_file, out)).rc == 0
    assert ImportanceTable.load(out).meta["seed"] == 0
    res = cli(_score_argv(text_file, out, "--seed", "3", "--overwrite"))
    assert res.rc == 0, res.err
    assert ImportanceTable.load(out).meta["seed"] == 3
    assert (old / "precious.txt").read_text() == "user data" and sorted(p.name for p in old.iterdir()) == \
        ["precious.txt"]
    assert _temporaries(tmp_path) == []


# ----------------------------------------------------------------------------------------- read-only, disk full

def _read_only(folder: Path, name: str) -> None:
    raise OSError(errno.EROFS, "Read-only file system", str(folder))


@pytest.mark.parametrize("command, argv", [
    ("score", ["score", "--model", "no-such-model", "--out", "OUT/t"]),
    ("prune", ["prune", "--model", "no-such-model", "--method", "unstructured", "--sparsity", "0.5", "--out", "OUT/m"]),
    ("quantize", ["quantize", "--model", "no-such-model", "--budget", "8", "--out", "OUT/q"]),
    ("validate", ["validate", "--model", "no-such-model", "--scores", "OUT/s"]),
    ("probe", ["probe", "--model", "no-such-model", "--out", "OUT/p"]),
    ("eval", ["eval", "--model", "no-such-model", "--out", "OUT/e.json"]),
    ("heatmap", ["heatmap", "no-such-table", "--out", "OUT/h.png"]),
    ("report", ["report", "no-such-run", "--out", "OUT/r.html"]),
])
def test_read_only_output_is_one_line_before_any_work(cli, monkeypatch, tmp_path: Path, command, argv):
    monkeypatch.setattr(O, "_try_create", _read_only)
    res = cli([str(tmp_path) + a[3:] if a.startswith("OUT") else a for a in argv])
    assert_one_line_error(res, command, "read-only file system; choose another")  # not the model / table error
    assert list(tmp_path.iterdir()) == []


def test_read_only_existing_output_with_overwrite(cli, monkeypatch, tmp_path: Path, built):
    out = tmp_path / "table"
    shutil.copytree(built["table"], out)
    before = snapshot(tmp_path)
    monkeypatch.setattr(O, "_try_create", _read_only)
    res = cli(["score", "--model", "no-such-model", "--out", str(out), "--overwrite"])
    assert_one_line_error(res, "score", f"cannot write {out}: read-only file system")
    assert snapshot(tmp_path) == before


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("what", ["table", "model"])
def test_disk_full_during_an_overwrite_keeps_the_old_output(cli, monkeypatch, tmp_path: Path, built,
                                                             text_file: Path, what: str):
    out = tmp_path / what
    shutil.copytree(built[what], out)
    before = snapshot(tmp_path)
    if what == "table":
        monkeypatch.setattr("importance.table.save_file", _disk_full)
        res, command = cli(_score_argv(text_file, out, "--overwrite")), "score"
    else:
        monkeypatch.setattr("pruning.io.write_json", _disk_full)
        res, command = cli(_prune_argv(text_file, out, "--overwrite")), "prune"
    line = assert_one_line_error(res, command, f"no space left on device while writing {out}")
    assert line.endswith("free space or choose another --out")
    assert snapshot(tmp_path) == before  # old output intact, no temporary left


# ----------------------------------------------------------------------------------------- interrupted saves

def _start(argv: list[str], pause: float, logs: Path) -> subprocess.Popen:
    """The CLI in a child process, its output in files under ``logs`` (no pipe that a grandchild could keep open),
    with faulthandler on, so a child that hangs can be made to print every thread's stack (SIGABRT)."""
    env = {**os.environ, O.PAUSE_ENV: str(pause), "PYTHONPATH": str(REPO), "PYTHONFAULTHANDLER": "1"}
    # SIGINT back to its default in the child: a test run started in the background of a non-interactive shell
    # inherits it ignored, and Python installs its KeyboardInterrupt handler only over the default
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "pruning", *map(str, argv)], env=env, stdout=out, stderr=err,
                                text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _stderr(logs: Path) -> str:
    return (logs / "stderr").read_text()


def _finish(proc: subprocess.Popen, logs: Path, timeout: float) -> str:
    """Wait for the child; one that does not end in time is aborted and the test fails with its thread stacks."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's traceback to stderr
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        pytest.fail(f"the child did not end within {timeout} s of the signal; its stderr:\n{_stderr(logs)[-6000:]}")
    return _stderr(logs)


def _wait_for_complete_temporary(parent: Path, name: str, proc: subprocess.Popen, marker: str, logs: Path) -> Path:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        for p in parent.glob(f".{name}.tmp-{proc.pid}-*"):
            if (p / marker).is_file():
                return p
        if proc.poll() is not None:
            pytest.fail(f"the child ended before its save (rc {proc.returncode}): {_stderr(logs)[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no temporary output appeared")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_a_kill_during_the_save_of_an_overwrite_keeps_one_complete_output(cli, tmp_path: Path, built,
                                                                            text_file: Path, sig):
    out, logs = tmp_path / "model", tmp_path / "logs"
    shutil.copytree(built["model"], out)
    logs.mkdir()
    before = snapshot(out)
    proc = _start(_prune_argv(text_file, out, "--overwrite", "--sparsity", "0.25"), pause=120, logs=logs)
    try:
        tmp = _wait_for_complete_temporary(tmp_path, "model", proc, "README.md", logs)  # save_model's last file
        proc.send_signal(sig)
        err = _finish(proc, logs, timeout=60)
    finally:
        proc.kill()
    assert snapshot(out) == before  # the old output, whole
    assert load_model(str(out)).model is not None
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and err.strip().splitlines() == ["imprune: interrupted"]
        assert _temporaries(tmp_path) == []
    else:
        assert proc.returncode == -signal.SIGKILL and _temporaries(tmp_path) == [tmp.name]
        res = cli(_prune_argv(text_file, out, "--overwrite", "--sparsity", "0.25"))  # the next run cleans it
        assert res.rc == 0, res.err
        assert _temporaries(tmp_path) == []
        assert json.loads((out / "imprune.json").read_text())["sparsity_target"] == 0.25


# ----------------------------------------------------------------------------------------- the helper itself

def _write(tmp: Path, text: str) -> None:
    (tmp / "imprune.json").write_text(json.dumps({"v": text}))


def _value(folder: Path) -> str:
    return json.loads((folder / "imprune.json").read_text())["v"]


@pytest.mark.parametrize("exchange", [True, False])
def test_publish_replaces_only_after_the_new_folder_is_complete(monkeypatch, tmp_path: Path, exchange: bool):
    calls = []
    real = O._exchange
    monkeypatch.setattr(O, "_exchange", lambda a, b: calls.append((a, b)) or (real(a, b) if exchange else False))
    out = tmp_path / "OUT"
    with O.publish(out) as tmp:
        _write(tmp, "one")
    assert calls == []  # nothing to exchange with yet
    (tmp_path / "OUT.old").write_text("user")  # fixed sibling names are the user's
    (tmp_path / "OUT.new").mkdir()
    with O.publish(out, overwrite=True) as tmp:
        assert _value(out) == "one"  # the old one stays while the new one is written
        _write(tmp, "two")
    assert _value(out) == "two" and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OUT", "OUT.new", "OUT.old"]
    with pytest.raises(ImpruneError, match="already exists"), O.publish(out) as tmp:
        pass
    with pytest.raises(ZeroDivisionError), O.publish(out, overwrite=True) as tmp:
        _write(tmp, "three")
        1 / 0  # noqa: B018
    assert _value(out) == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["OUT", "OUT.new", "OUT.old"]


def test_publish_turns_a_full_disk_into_one_line(tmp_path: Path):
    out = tmp_path / "OUT"
    with O.publish(out) as tmp:
        _write(tmp, "one")
    for err in (OSError(errno.ENOSPC, "No space left on device"),
                RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                             "\"No space left on device\" })")):
        with pytest.raises(ImpruneError, match=f"no space left on device while writing {out}; free space"), \
                O.publish(out, overwrite=True) as tmp:
            _write(tmp, "two")
            raise err
        assert _value(out) == "one" and [p.name for p in tmp_path.iterdir()] == ["OUT"]


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path: Path):
    out = tmp_path / "OUT"
    with O.publish(out) as tmp:
        _write(tmp, "current")
    dead, alive = _dead_pid(), os.getppid()
    for name in (f".OUT.tmp-{dead}-abc", f".OUT.old-{dead}-def", f".OUT.tmp-{alive}-ghi", f".OTHER.tmp-{dead}-x"):
        (tmp_path / name).mkdir()
        _write(tmp_path / name, name)
    (tmp_path / f".OUT.tmp-{dead}-file").write_text("half a json")
    with O.publish(out, overwrite=True) as tmp:
        _write(tmp, "new")
    assert _value(out) == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["OUT", f".OUT.tmp-{alive}-ghi",
                                                                 f".OTHER.tmp-{dead}-x"])


def test_an_interrupted_fallback_swap_is_undone(tmp_path: Path):
    out = tmp_path / "OUT"
    dead = _dead_pid()
    old, new = tmp_path / f".OUT.old-{dead}-aaaa", tmp_path / f".OUT.tmp-{dead}-bbbb"
    for folder, value in ((old, "old"), (new, "new")):
        folder.mkdir()
        _write(folder, value)
    # killed between `rename OUT -> .OUT.old-*` and `rename .OUT.tmp-* -> OUT`: OUT is missing
    with pytest.raises(ImpruneError, match="already exists"):
        O.check_target(out, overwrite=False)
    assert _value(out) == "old" and [p.name for p in tmp_path.iterdir()] == ["OUT"]


def test_swap_in_exchange_and_fallback_keep_one_complete_folder(monkeypatch, tmp_path: Path):
    final = tmp_path / "F"
    final.mkdir()
    (final / "a").write_text("old")
    new = tmp_path / "N"
    new.mkdir()
    (new / "b").write_text("new")
    assert O._exchange(new, final) is True  # this file system supports RENAME_EXCHANGE
    assert (final / "b").is_file() and (new / "a").is_file()
    seen = []
    real_replace = os.replace

    def replace(a, b):
        seen.append((Path(a).name, Path(b).name, final.is_dir()))
        return real_replace(a, b)

    monkeypatch.setattr(O, "_exchange", lambda a, b: False)
    monkeypatch.setattr(O.os, "replace", replace)
    O.swap_in(new, final)
    assert (final / "a").read_text() == "old" and not new.exists()
    assert [s[0] for s in seen] == ["F", "N"] and seen[0][1].startswith(".F.old-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["F"]


@pytest.mark.parametrize("files, ours", [
    ({"imprune.json": "{}"}, True), ({"table.json": '{"scorers": [], "layers": 2}'}, True),
    ({"metrics.json": '{"schema": "imprune.metrics/1"}'}, True),
    ({"probe.json": '{"schema": "imprune.probe/1"}'}, True),
    ({"quantization.json": '{"format": "imprune.quanto/1"}'}, True),
    ({"heads.png": "png", "math/table.json": '{"scorers": [], "layers": 2}'}, True),  # a probe folder of old
    ({"table.json": '{"rows": 3}'}, False), ({"metrics.json": '{"loss": 1}'}, False),  # the user's own JSON
    ({"imprune.json": "not json"}, False), ({"heads.png": "png", "notes.txt": "mine"}, False), ({"a.txt": ""}, False),
])
def test_what_counts_as_an_imprune_output(tmp_path: Path, files: dict[str, str], ours: bool):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert O.is_imprune_output(tmp_path) is ours


def test_probe_marks_its_folder_and_overwrite_replaces_it(cli, tmp_path: Path):
    out = tmp_path / "probe"
    argv = ["probe", *MODEL, "--tasks", "math", "--samples", "4", "--scorers", "taylor", "--quiet", "--out", str(out)]
    assert cli(argv).rc == 0
    assert json.loads((out / "probe.json").read_text())["schema"] == "imprune.probe/1"
    (out / "probe.json").unlink()  # a probe folder from before the marker: still recognised
    res = cli([*argv, "--seed", "2", "--overwrite"])
    assert res.rc == 0, res.err
    assert json.loads((out / "probe.json").read_text())["seed"] == 2 and _temporaries(tmp_path) == []


def test_a_cache_folder_written_by_another_process_first_is_kept(tmp_path: Path):
    from importance.store.cache import atomic_dir

    final = tmp_path / "cache" / "model"
    with atomic_dir(final) as tmp:
        _write(tmp, "mine")
        final.mkdir()  # another process finished first
        _write(final, "theirs")
    assert _value(final) == "theirs" and _temporaries(final.parent) == []
    with pytest.raises(ImpruneError, match="appeared while imprune was writing it"), O.publish(tmp_path / "o") as tmp:
        (tmp_path / "o").mkdir()
    assert _temporaries(tmp_path) == []
