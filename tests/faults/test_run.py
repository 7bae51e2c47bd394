"""Faults of ``imprune run`` and of structured targets (issue 15).

Stale stages: a run reuses a stage only while its inputs hold the same content (a changed text file redoes
what the calibration feeds, changed weights redo everything, even at the same size and mtime). Every
shipped recipe runs. A recipe the model cannot take fails with one line before any stage writes. A
structured ``--sparsity`` beyond what whole units allow is refused with the largest reachable value, before
any data is read; a value at that cap works and reaches it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import sample_words

from importance.models.load import load_model
from pruning.run.recipes import load_recipe, shipped_recipes

from .conftest import assert_one_line_error, snapshot

TINY = ["--tokens", "64", "--eval-tokens", "64", "--seq-len", "32", "--batch-size", "2", "--task-limit", "2", "--quiet"]
STAGES = ["eval_before", "accuracy_before", "scores_before", "prune", "eval_after", "accuracy_after", "scores_after"]


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _rewrite_keeping_stat(path: Path, data: bytes) -> None:
    """New content of the same size, with the old mtime put back: only a content hash can tell."""
    st = path.stat()
    assert len(data) == st.st_size
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_changed_inputs_redo_what_depends_on_them_and_only_that(cli, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import pruning.run.report

    monkeypatch.setattr(pruning.run.report, "write_run_outputs", lambda out: None)  # figures: not the point here
    model = tmp_path / "model"
    lm = load_model("random:llama:layers=2")
    lm.model.save_pretrained(model)
    lm.tokenizer.save_pretrained(model)
    calib, evaluation = tmp_path / "calib.txt", tmp_path / "eval.txt"
    calib.write_text(sample_words(400, seed=1))
    evaluation.write_text(sample_words(400, seed=2))
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"steps": [{"method": "unstructured", "sparsity": 0.3, "criterion": "magnitude"}]}))
    out = tmp_path / "run"
    argv = ["run", "--model", model, "--data", f"file:{calib}", "--eval-data", f"file:{evaluation}",
            "--recipe", recipe, "--out", out, *TINY]

    assert cli(argv).rc == 0 and _metrics(out)["reused"] == []
    first = _metrics(out)
    assert cli(argv).rc == 0 and _metrics(out)["reused"] == STAGES  # unchanged: everything reused

    text = calib.read_bytes()  # same size, same mtime, other words: the calibration stages redo
    _rewrite_keeping_stat(calib, text[len(text) // 2:] + text[: len(text) // 2])
    assert cli(argv).rc == 0 and _metrics(out)["reused"] == ["eval_before", "accuracy_before"]
    assert _metrics(out)["inputs"]["data"] != first["inputs"]["data"]

    weights = model / "model.safetensors"  # finite new weights of the same size and mtime: everything redoes
    changed = load_model(str(model))
    with torch.no_grad():
        for p in changed.model.parameters():
            p.mul_(0.5)
    changed.model.save_pretrained(tmp_path / "scaled")
    _rewrite_keeping_stat(weights, (tmp_path / "scaled" / "model.safetensors").read_bytes())
    assert cli(argv).rc == 0 and _metrics(out)["reused"] == []
    after = _metrics(out)
    assert after["perplexity"]["before"]["ppl"] != first["perplexity"]["before"]["ppl"]  # recomputed for real
    assert cli(argv).rc == 0 and _metrics(out)["reused"] == STAGES


def test_a_large_weight_file_is_fingerprinted_by_its_header_and_samples(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Above FULL_HASH_BYTES a file is hashed by size, mtime, its safetensors header and sampled chunks."""
    from safetensors.torch import save_file

    import importance.store.fingerprint as F

    monkeypatch.setattr(F, "FULL_HASH_BYTES", 1 << 20)
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(1024, 1024)}, str(path))  # 4 MiB: sampled
    first = F.file_fingerprint(path)
    assert "sampled_sha256" in first and "sha256" not in first
    data = path.read_bytes()
    _rewrite_keeping_stat(path, data.replace(b'"a"', b'"b"', 1))  # a renamed tensor: the header differs
    assert F.file_fingerprint(path) != first
    _rewrite_keeping_stat(path, data[:-4] + b"\x01\x02\x03\x04")  # the last chunk is always sampled
    assert F.file_fingerprint(path) != first
    _rewrite_keeping_stat(path, data)
    assert F.file_fingerprint(path) == first


def test_a_missing_data_file_is_one_line_before_any_stage(cli, tmp_path: Path, text_file: Path) -> None:
    out = tmp_path / "run"
    res = cli(["run", "--model", "random:llama", "--data", f"file:{text_file}", "--eval-data",
               f"file:{tmp_path / 'gone.txt'}", "--recipe", "wanda50", "--out", out, *TINY])
    assert_one_line_error(res, "run", "--eval-data")
    assert not out.exists()


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_runs(name: str, cli, tmp_path: Path, text_file: Path) -> None:
    out = tmp_path / "run"
    recipe = load_recipe(name)
    spec: str | Path = name
    if recipe.steps[-1].method == "heal":  # the shipped file, with a heal budget a test can afford
        spec = tmp_path / f"{name}.yaml"
        text = Path(recipe.source).read_text()
        assert "tokens: 65536" in text
        spec.write_text(text.replace("tokens: 65536", "tokens: 256"))
    res = cli(["run", "--model", "random:llama:layers=4", "--data", f"file:{text_file}", "--eval-data",
               f"file:{text_file}", "--recipe", spec, "--out", out, *TINY])
    assert res.rc == 0, res.err[-2000:]
    m = _metrics(out)
    assert m["recipe"]["name"] == name
    assert m["nonzero_params"]["after"] < m["nonzero_params"]["before"]  # every recipe removes something
    record = json.loads((out / "model" / "imprune.json").read_text())
    assert len(record["steps"]) == len([s for s in m["recipe"]["steps"] if s["method"] != "heal"])
    if m["recipe"]["steps"][-1]["method"] == "heal":  # the healed model is "after"; the pruned one stays too
        assert set(m["perplexity"]) == {"before", "pruned", "after"} and (out / "healed" / "imprune.json").is_file()


@pytest.mark.parametrize("steps, expect", [
    ([{"method": "heads", "sparsity": 0.9}], "the most is 0.500"),
    ([{"method": "unstructured", "sparsity": 0.3, "criterion": "magnitude"},
      {"method": "heads", "sparsity": 0.9, "gqa": "per-group"}], "step 2 (heads): --sparsity 0.9"),
    ([{"method": "width", "sparsity": 0.95}], "the most is 0.828"),
    ([{"method": "layers", "sparsity": 0.9}], "removes all 2 layers"),
    ([{"method": "layers", "sparsity": 0.5, "criterion": "wanda"}], "unknown --criterion 'wanda'"),
    ([{"method": "nm", "nm": "2:4", "sparsity": 0.3}], "does not match 2:4"),
    ([{"method": "nm", "nm": "2:4", "components": "attn.x"}], "not prunable linears"),
    ([{"method": "heads", "sparsity": 0.2, "heads": 3}], "would break the KV grouping"),
])
def test_a_recipe_the_model_cannot_take_fails_before_any_stage(steps: list, expect: str, cli, tmp_path: Path,
                                                                text_file: Path) -> None:
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"name": "bad", "steps": steps}))
    before = snapshot(tmp_path)
    res = cli(["run", "--model", "random:llama", "--data", f"file:{text_file}", "--eval-data", f"file:{text_file}",
               "--recipe", recipe, "--out", tmp_path / "run", *TINY])
    line = assert_one_line_error(res, "run", expect)
    assert "recipe bad, step" in line
    assert snapshot(tmp_path) == before  # no run folder, no stage marker, no temporary


@pytest.mark.parametrize("raw, expect", [
    ({"method": "nm"}, "'sparsity' is missing"),
    ({"method": "nm", "nm": 124}, "'nm' must be quoted"),
    ({"method": "nm", "nm": "4:2"}, "needs 0 < N < M"),
    ({"method": "heads"}, "'sparsity' is missing"),
])
def test_recipe_sparsity_and_nm_are_checked_when_read(raw: dict, expect: str) -> None:
    from importance.errors import ImpruneError
    from pruning.run.recipes import parse_recipe

    with pytest.raises(ImpruneError, match=expect):
        parse_recipe({"steps": [raw]})


def test_nm_takes_its_sparsity_from_the_pattern_in_prune_and_recipes(cli, tmp_path: Path, text_file: Path) -> None:
    from pruning.run.recipes import load_recipe

    assert load_recipe("nm24").steps[0].sparsity == 0.5
    out = tmp_path / "out"
    res = cli(["prune", "--model", "random:llama", "--method", "nm", "--nm", "2:4", "--criterion", "magnitude",
               "--no-eval", "--data", f"file:{text_file}", "--tokens", "64", "--seq-len", "32", "--quiet",
               "--out", out])
    assert res.rc == 0, res.err
    assert json.loads((out / "imprune.json").read_text())["sparsity_target"] == 0.5
    res = cli(["prune", "--model", "random:llama", "--method", "heads", "--no-eval", "--quiet",
               "--out", tmp_path / "o2"])
    assert_one_line_error(res, "prune", "--sparsity is missing")
    assert not (tmp_path / "o2").exists()


CAPS = [(["--method", "heads"], 0.5), (["--method", "heads", "--gqa", "per-group"], 1 / 3),
        (["--method", "width"], (6144 + 127 * 192) / 36864), (["--method", "channels"], 127 / 128),
        (["--method", "layers", "--criterion", "block_influence"], 0.5)]


@pytest.mark.parametrize("flags, most", CAPS)
def test_a_structured_target_beyond_whole_units_is_refused_before_any_work(
        flags: list[str], most: float, cli, tmp_path: Path, text_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pruning.cli.prune as cp

    def no_data(*a, **k):
        raise AssertionError("data was read before the target was checked")

    monkeypatch.setattr(cp, "load_data", no_data)
    target = 0.999 if flags[1] == "channels" else 0.99
    before = snapshot(tmp_path)
    res = cli(["prune", "--model", "random:llama", *flags, "--sparsity", target, "--data", f"file:{text_file}",
               "--eval-data", f"file:{text_file}", "--out", tmp_path / "out", "--quiet"])
    line = assert_one_line_error(res, "prune", f"the most is {most:.3f}")
    assert f"--sparsity {target}" in line and f"--method {flags[1]}" in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("flags, most", CAPS)
def test_a_structured_target_at_the_cap_works_and_reaches_it(flags: list[str], most: float, cli, tmp_path: Path,
                                                             text_file: Path) -> None:
    target = f"{int(most * 1000) / 1000:g}"  # what the refusal tells the user to pass
    crit = [] if "--criterion" in flags else ["--criterion", "magnitude"]
    out = tmp_path / "out"
    res = cli(["prune", "--model", "random:llama", *flags, *crit, "--sparsity", target, "--no-eval", "--data",
               f"file:{text_file}", "--tokens", "64", "--seq-len", "32", "--quiet", "--out", out])
    assert res.rc == 0, res.err[-2000:]
    achieved = json.loads((out / "imprune.json").read_text())["structured"]["achieved"]
    assert achieved == pytest.approx(most, abs=1e-3)


def test_uniform_width_fills_its_budget_when_channels_alone_cannot(cli, tmp_path: Path, text_file: Path) -> None:
    """0.8 of the width needs a KV group per layer: channels alone stop at 0.661 (the old silent result)."""
    out = tmp_path / "out"
    res = cli(["prune", "--model", "random:llama", "--method", "width", "--sparsity", "0.8", "--criterion",
               "magnitude", "--no-eval", "--data", f"file:{text_file}", "--quiet", "--out", out])
    assert res.rc == 0, res.err[-2000:]
    achieved = json.loads((out / "imprune.json").read_text())["structured"]["achieved"]
    assert achieved == pytest.approx(0.8, abs=192 / 36864)  # within one channel of every layer
