"""Artifacts that meet (issue 15): tables, plans and run folders of another model, damaged artifacts, and
``score --processes`` counts the machine or the data cannot take.

Every refusal is the bad-input contract: exit 2, one stderr line ``imprune CMD: error: ...`` without a traceback
that names the artifacts or the flag, and nothing written (the work folder and the shared artifacts exactly as
they were). The artifacts are made once per module from tiny random models: the dense table ``A``
(``random:llama:layers=3``), the model ``P`` that ``imprune prune --method layers`` made from it with the table
``B`` of ``P``, and tables of other models: ``Q`` (qwen3) and ``S`` (the same llama architecture, another seed).
The legitimate pairings (a pruned model's table beside its dense one, a plan beside its source's table, a run
folder) must keep passing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from importance.data.sources import load_data
from importance.engine import distributed
from importance.models.load import load_model
from importance.scoring import score
from pruning.cli.core import main

from .conftest import Result, assert_one_line_error, snapshot

DENSE = "random:llama:layers=3"
SCORERS = ["taylor", "magnitude", "residual_fisher"]


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory, text_file: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("artifacts")
    paths = {"text": text_file}
    for name, spec in (("A", DENSE), ("Q", "random:qwen3:layers=2"), ("S", "random:llama:layers=3,seed=5")):
        lm = load_model(spec)
        windows = load_data(f"file:{text_file}", lm.tokenizer, seq_len=32, tokens=128)
        paths[name] = score(lm, windows, SCORERS, progress=False).save(root / name)
    paths["P"] = root / "P"
    assert main(["prune", "--model", DENSE, "--method", "layers", "--sparsity", "0.34", "--scores", str(paths["A"]),
                 "--data", f"file:{text_file}", "--tokens", "64", "--seq-len", "32", "--no-eval", "--quiet",
                 "--out", str(paths["P"])]) == 0
    lm = load_model(str(paths["P"]))  # the pruned model's table records P as its source folder
    windows = load_data(f"file:{text_file}", lm.tokenizer, seq_len=32, tokens=128)
    paths["B"] = score(lm, windows, SCORERS, progress=False).save(root / "B")
    run = root / "RUN"  # a run folder as `imprune run` leaves it: dense and pruned tables, the pruned model's record
    shutil.copytree(paths["A"], run / "scores_before")
    shutil.copytree(paths["B"], run / "scores_after")
    (run / "model").mkdir()
    shutil.copy(paths["P"] / "imprune.json", run / "model" / "imprune.json")
    paths["RUN"] = run
    return paths


@pytest.fixture
def work(tmp_path: Path, art: dict[str, Path], sentinel: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder commands run in (their outputs go there), with the user's sentinel files in it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refused(cli: Callable[..., Result], argv: list, command: str, art: dict[str, Path], work: Path,
            *expect: str) -> str:
    """Run ``argv``; assert the one-line refusal containing each of ``expect`` and that nothing changed."""
    before = snapshot(work), snapshot(art["A"].parent)
    line = assert_one_line_error(cli(argv), command)
    for text in expect:
        assert text in line, (text, line)
    assert (snapshot(work), snapshot(art["A"].parent)) == before
    return line


# ------------------------------------------------------------------------------------------------ another model

CROSS = {  # name: (argv with placeholders, command, texts the line must hold)
    "delta of another model type": (["heatmap", "{A}", "{Q}", "--kind", "delta", "--out", "d.png"], "heatmap",
                                    ["'{A}'", "'{Q}'", "another model", "llama vs qwen3"]),
    "delta of another seed": (["heatmap", "{A}", "{S}", "--kind", "delta", "--out", "d.png"], "heatmap",
                              ["'{A}'", "'{S}'", "layers=3,seed=0 vs random:llama:layers=3,seed=5"]),
    "delta of pruned before dense": (["heatmap", "{B}", "{A}", "--kind", "delta", "--out", "d.png"], "heatmap",
                                     ["'{A}'", "'{B}'", "2 vs 3 layers", "not a pruned copy"]),
    "report --compare another model": (["report", "{A}", "--compare", "{Q}", "--out", "r.html"], "report",
                                       ["'{A}'", "--compare '{Q}'", "another model"]),
    "report of a run with another model's scores_after": (["report", "{RUN2}", "--out", "r.html"], "report",
                                                          ["scores_after", "scores_before", "llama vs qwen3"]),
    "plan beside another model's table": (["heatmap", "{Q}", "--kind", "sparsity", "--plan", "{P}", "--out",
                                           "s.png"], "heatmap", ["plan '{P}/imprune.json'", "'{Q}'",
                                                                 "llama vs qwen3"]),
    "plan beside the pruned model's own table": (["heatmap", "{B}", "--kind", "sparsity", "--plan", "{P}",
                                                  "--out", "s.png"], "heatmap",
                                                 ["covers 3 layers, the table 2", "dense model's scores"]),
    "plan beside another seed's table": (["heatmap", "{S}", "--kind", "sparsity", "--plan", "{P}", "--out",
                                          "s.png"], "heatmap", ["layers=3,seed=0 vs random:llama:layers=3,seed=5"]),
    "prune with another model's table": (["prune", "--model", DENSE, "--method", "unstructured", "--sparsity",
                                          "0.5", "--scores", "{Q}", "--no-eval", "--out", "pruned"], "prune",
                                         ["--scores {Q}", f"--model {DENSE}", "another model"]),
    "quantize with another model's table": (["quantize", "--model", "random:llama", "--budget", "5", "--scores",
                                             "{A}", "--no-eval", "--out", "quant"], "quantize",
                                            ["--scores {A}", "--model random:llama", "seed=0 vs random:llama:layers"]),
    "validate another model's table": (["validate", "--model", DENSE, "--scores", "{S}", "--out", "v",
                                        "--eval-data", "file:{text}", "--eval-tokens", "64", "--eval-seq-len", "32",
                                        "--quiet"], "validate", ["--scores {S}", "seed"]),
}


def _fill(items: list, paths: dict[str, Path]) -> list[str]:
    return [str(x).format(**{k: str(v) for k, v in paths.items()}) for x in items]


@pytest.mark.parametrize("case", list(CROSS))
def test_artifacts_of_another_model_are_refused(case: str, cli, art, work: Path) -> None:
    argv, command, expect = CROSS[case]
    paths = dict(art)
    if "{RUN2}" in argv:  # a run folder whose after table is of another model
        paths["RUN2"] = work / "RUN2"
        shutil.copytree(art["RUN"], paths["RUN2"])
        shutil.rmtree(paths["RUN2"] / "scores_after")
        shutil.copytree(art["Q"], paths["RUN2"] / "scores_after")
    refused(cli, _fill(argv, paths), command, art, work, *_fill(expect, paths))


@pytest.mark.parametrize("argv", [
    ["heatmap", "{A}", "{B}", "--kind", "delta", "--out", "d.png"],  # pruned (one layer fewer) against its dense
    ["heatmap", "{A}", "{A}", "--kind", "delta", "--out", "d.png"],
    ["report", "{A}", "--compare", "{B}", "--out", "d.html"],
    ["report", "{RUN}", "--out", "d.html"],
    ["heatmap", "{A}", "--kind", "sparsity", "--plan", "{P}", "--out", "d.png"],
], ids=["delta pruned", "delta same", "compare pruned", "run folder", "plan beside its source"])
def test_a_pruned_model_and_its_dense_source_still_meet(argv: list, cli, art, work: Path) -> None:
    res = cli(_fill(argv, art))
    assert res.rc == 0, res.err
    assert (work / argv[-1]).stat().st_size > 1000


def test_a_plan_is_checked_against_the_model_it_names(cli, art, work: Path) -> None:
    """A bits plan of the 2-layer random:llama fits the 3-layer table's rows but names another model; one that
    leaves a layer out (``quantize --keep``) of the table's own model is drawn."""
    plan = work.parent / f"{work.name}-plan.json"
    bits = {"0": {"attn.q": 4.0}, "1": {"attn.q": 8.0}}
    plan.write_text(json.dumps({"source_model": {"spec": "random:llama", "model_type": "llama"}, "bits": bits}))
    refused(cli, ["heatmap", art["A"], "--kind", "bits", "--plan", plan, "--out", "b.png"], "heatmap", art, work,
            f"plan '{plan}'", "random:llama:seed=0 vs random:llama:layers=3,seed=0")
    plan.write_text(json.dumps({"source_model": {"spec": DENSE, "model_type": "llama"}, "bits": {"1": bits["1"]}}))
    assert cli(["heatmap", art["A"], "--kind", "bits", "--plan", plan, "--out", "b.png"]).rc == 0


# ------------------------------------------------------------------------------------------------ damaged artifacts

def _truncate(folder: Path) -> None:
    p = folder / "table.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


DAMAGE: dict[str, tuple[Callable[[Path], object], str]] = {  # name: (damage the table folder, text of the line)
    "truncated table.safetensors": (_truncate, "table.safetensors' is damaged"),
    "random bytes as table.safetensors": (lambda f: (f / "table.safetensors").write_bytes(os.urandom(600)),
                                          "table.safetensors' is damaged"),
    "garbage table.json": (lambda f: (f / "table.json").write_text("{scorers: oops"), "table.json' is not valid JSON"),
    "binary table.json": (lambda f: (f / "table.json").write_bytes(b"\xff\xfe\x00garbage"),
                          "table.json' is not valid JSON"),
    "table.json not an object": (lambda f: (f / "table.json").write_text("[1, 2]"), "should hold a JSON object"),
    "table.json without layers": (lambda f: (f / "table.json").write_text(json.dumps(
        {k: v for k, v in json.loads((f / "table.json").read_text()).items() if k != "layers"})), "'layers'"),
    "missing table.safetensors": (lambda f: (f / "table.safetensors").unlink(), "table.safetensors is missing"),
    "missing table.json": (lambda f: (f / "table.json").unlink(), "table.json is missing"),
}
USES = {  # how a command meets the table T (every one reads it before loading any model)
    "heatmap": ["heatmap", "{T}", "--out", "h.png"],
    "report": ["report", "{A}", "--compare", "{T}", "--out", "r.html"],
    "prune": ["prune", "--model", DENSE, "--method", "unstructured", "--sparsity", "0.5", "--scores", "{T}",
              "--no-eval", "--out", "pruned"],
    "validate": ["validate", "--model", DENSE, "--scores", "{T}", "--out", "v", "--quiet"],
}


@pytest.mark.parametrize("use", list(USES))
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_table_names_the_file_and_the_fix(damage: str, use: str, cli, art, work: Path) -> None:
    table = work / "T"
    shutil.copytree(art["A"], table)
    DAMAGE[damage][0](table)
    line = refused(cli, _fill(USES[use], {**art, "T": table}), use, art, work, DAMAGE[damage][1], "imprune score")
    assert str(table) in line


@pytest.mark.parametrize(("content", "expect"), [
    (b"{not json", "is not valid JSON"), (b"\xff\xfe\x00\x80 garbage", "is not JSON text"),
    (b"[1, 2]", "should hold a JSON object"), (b'{"sparsity": {"0": {"attn.q": "half"}}}', "'sparsity' is not a map"),
    (b'{"sparsity": {"first": {"attn.q": 0.5}}}', "'sparsity' is not a map"),
    (b'{"bits": [4, 8]}', "'bits' is not a map"),
], ids=["garbage", "binary", "list", "string value", "layer name", "bits list"])
def test_a_damaged_plan_names_the_file(content: bytes, expect: str, cli, art, work: Path) -> None:
    plan = work / "plan" / "imprune.json"
    plan.parent.mkdir()
    plan.write_bytes(content)
    for argv in (["heatmap", "--kind", "sparsity", "--plan", plan.parent, "--out", "s.png"],
                 ["heatmap", art["A"], "--kind", "sparsity", "--plan", plan, "--out", "s.png"]):
        refused(cli, argv, "heatmap", art, work, f"plan '{plan}'", expect, "imprune prune")


@pytest.mark.parametrize(("where", "content", "expect"), [
    ("metrics.json", b"{broken", "metrics.json' is not valid JSON"),
    ("metrics.json", b"\x89PNG\r\n\x1a\n\xff\x00", "metrics.json' is not JSON text"),
    ("metrics.json", b"[]", "metrics.json' should hold a JSON object"),
    ("model/imprune.json", b"{broken", "imprune.json' is not valid JSON"),
    ("model/imprune.json", b'{"sparsity": {"0": [0.5]}}', "'sparsity' is not a map"),
    ("scores_after/table.json", None, "table.json is missing"),
    ("scores_before/table.safetensors", b"\x00" * 16, "table.safetensors' is damaged"),
    ("scores_before/validation/validation.json", b"nope", "validation.json' is not valid JSON"),
], ids=["metrics garbage", "metrics binary", "metrics list", "record garbage", "record map", "after incomplete",
        "before damaged", "validation garbage"])
def test_a_damaged_run_folder_names_the_file_and_the_fix(where: str, content: bytes | None, expect: str, cli, art,
                                                         work: Path) -> None:
    run = work / "run"
    shutil.copytree(art["RUN"], run)
    target = run / where
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink() if content is None else target.write_bytes(content)
    line = refused(cli, ["report", run, "--out", "r.html"], "report", art, work, expect)
    assert any(fix in line for fix in ("imprune run", "imprune score", "imprune validate")), line


# ------------------------------------------------------------------------------------------------ --processes

@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every refusal happens before a worker is started: starting one fails the test."""
    started: list = []

    def launch(*args: object, **kwargs: object) -> None:
        started.append(args)
        raise AssertionError(f"a process was launched: {args}")

    monkeypatch.setattr(subprocess, "run", launch)
    monkeypatch.setattr(subprocess, "Popen", launch)
    monkeypatch.setattr(distributed, "usable_cpus", lambda: 8)
    return started


SCORE = ["score", "--model", "random:llama", "--scorers", "taylor", "--seq-len", "32", "--quiet", "--out", "t"]


@pytest.mark.parametrize(("extra", "patch", "expect"), [
    (["--processes", "99", "--data", "file:{text}", "--tokens", "4096"], {"usable_cpus": lambda: 2},
     ["--processes 99 is more than the 2 CPU core", "use --processes 2 or fewer"]),
    (["--processes", "6", "--data", "file:{text}", "--tokens", "64"], {},  # one batch, from the flags alone
     ["only 1 calibration batch", "use --processes 1 or fewer", "--batch-size"]),
    (["--processes", "2", "--data", "file:{short}"], {},  # the data is shorter than --tokens: counted exactly
     ["only 1 calibration batch", "2 windows of 32 tokens", "use --processes 1 or fewer"]),
    (["--processes", "3", "--data", "file:{text}", "--tokens", "512", "--batch-size", "2", "--scorers", "removal",
      "--removal-tokens", "64"], {}, ["only 1 removal batch", "--removal-tokens 64", "use --processes 1 or fewer"]),
    (["--processes", "4", "--data", "file:{text}", "--tokens", "512"], {"available_memory": lambda: 700 << 20},
     ["needs about", "of memory", "use --processes 1 or fewer"]),
], ids=["cores", "batches from flags", "batches of short data", "removal batches", "memory"])
def test_a_processes_count_that_cannot_run_is_refused_before_launching(extra: list, patch: dict, expect: list,
                                                                      cli, art, work: Path, no_launch: list,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for name, fn in patch.items():
        monkeypatch.setattr(distributed, name, fn)
    short = work.parent / f"{work.name}-short.txt"
    short.write_text(" ".join(f"w{i}" for i in range(20)))  # two windows of 32 byte tokens
    refused(cli, [*SCORE, *_fill(extra, {**art, "short": short})], "score", art, work, *expect)
    assert not no_launch


def test_more_processes_than_gpus_is_refused(cli, art, work: Path, no_launch: list,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    refused(cli, [*SCORE, "--processes", "2", "--data", f"file:{art['text']}", "--tokens", "512"], "score", art,
            work, "one GPU each but 1 are visible", "use --processes 1 or fewer")


def test_the_memory_estimate_follows_the_model_size() -> None:
    assert distributed.worker_memory(2 << 30) > distributed.worker_memory(1 << 30) > 1 << 30
    distributed.check_processes(1, {"batches": (0, "more")}, 1 << 50)  # one process is never refused


# ------------------------------------------------------------------------------------------------ sweep

SWEEP = {  # bad input found by the sweep of every command: (argv, command, texts)
    "quantize --batch-size 0": (["quantize", "--model", "random:llama", "--budget", "5", "--random-seed", "1",
                                 "--eval-data", "file:{text}", "--seq-len", "32", "--eval-tokens", "64",
                                 "--batch-size", "0", "--out", "q", "--quiet"], "quantize", ["--batch-size"]),
    "probe --scorer not scored": (["probe", "--model", "random:llama", "--tasks", "math", "--samples", "2",
                                   "--scorers", "taylor", "--scorer", "fisher", "--out", "p", "--quiet"], "probe",
                                  ["--scorer fisher", "--scorers taylor"]),
    "validate --scores a file": (["validate", "--model", DENSE, "--scores", "{text}", "--out", "v", "--quiet"],
                                 "validate", ["--scores '{text}' is a file"]),
    "delta without the scorer in the second table": (["heatmap", "{A}", "{MG}", "--kind", "delta", "--out", "d.png"],
                                                     "heatmap", ["'{MG}' has no taylor", "--scorer magnitude"]),
    "heatmap of a missing table": (["heatmap", "{A}-missing", "--out", "h.png"], "heatmap",
                                   ["'{A}-missing' does not exist", "imprune score"]),
    "heatmap of a file": (["heatmap", "{text}", "--out", "h.png"], "heatmap", ["is a file, not an importance table"]),
    "report --compare a file": (["report", "{A}", "--compare", "{text}", "--out", "r.html"], "report",
                                ["'{text}' is a file"]),
}


@pytest.mark.parametrize("case", list(SWEEP))
def test_sweep_cases_are_one_line(case: str, cli, art, work: Path) -> None:
    argv, command, expect = SWEEP[case]
    paths = dict(art)
    if "{MG}" in argv:  # a table of the dense model holding another scorer only
        lm = load_model(DENSE)
        windows = load_data(f"file:{art['text']}", lm.tokenizer, seq_len=32, tokens=64)
        paths["MG"] = score(lm, windows, ["magnitude"], progress=False).save(work.parent / f"{work.name}-mg")
    refused(cli, _fill(argv, paths), command, art, work, *_fill(expect, paths))
