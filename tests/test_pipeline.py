"""``imprune run`` on a tiny random model: the whole pipeline, stage reuse, invalid recipes, interruption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from importance.data.tasks import TASKS
from importance.errors import ImpruneError
from importance.models.load import load_model
from pruning.cli.core import main
from pruning.run.pipeline import Pipeline, RunConfig
from pruning.run.recipes import load_recipe, parse_recipe, shipped_recipes

RECIPE = {"name": "t", "steps": [{"method": "layers", "sparsity": 0.34, "criterion": "block_influence"},
                                 {"method": "channels", "sparsity": 0.25, "criterion": "taylor"}]}


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "t.txt"
    g = torch.Generator().manual_seed(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "far", "away", "and", "birds", "sang"]
    path.write_text(" ".join(words[int(i)] for i in torch.randint(len(words), (3000,), generator=g)))
    return path


def _cfg(text: Path, **kw) -> RunConfig:
    return RunConfig(**{"model": "random:llama:layers=3", "data": f"file:{text}", "tokens": 512, "seq_len": 64,
                        "eval_data": f"file:{text}", "eval_tokens": 512, "task_limit": 3, **kw})


def _run(text: Path, out: Path, recipe: dict = RECIPE, **kw):
    return Pipeline(_cfg(text, **kw), parse_recipe(recipe), out, progress=False, log=lambda s: None).run()


def test_a_full_run_writes_every_artifact_and_a_model_that_reloads(text: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    m = _run(text, out).metrics
    for part in ("metrics.json", "scores_before/table.json", "scores_after/table.json", "model/imprune.json"):
        assert (out / part).is_file(), part
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(m))
    record = json.loads((out / "model/imprune.json").read_text())
    kept = record["layers_kept"]
    assert len(kept) == 2 and len(record["steps"]) == 2  # round(0.34 * 3) = 1 of 3 layers goes
    removed = ({0, 1, 2} - set(kept)).pop()
    assert set(record["sparsity"][str(removed)].values()) == {1.0}
    reloaded = load_model(str(out / "model"))
    assert reloaded.model.config.num_hidden_layers == 2
    n = sum(p.numel() for p in reloaded.model.parameters())  # parameters() lists a tied tensor once
    assert m["params"]["after"] == n < m["params"]["before"]
    # the measured sparsity of a kept layer's MLP matches the channels the second step removed
    for i, layer in enumerate(kept):
        rows = reloaded.model.model.layers[i].mlp.up_proj.weight.shape[0]
        assert rows < 128
        assert record["sparsity"][str(layer)]["mlp.up"] == pytest.approx(1 - rows / 128, abs=1e-6)
        assert record["sparsity"][str(layer)]["attn.q"] == 0.0
    assert m["perplexity"]["before"]["ppl"] > 1 and m["perplexity"]["after"]["ppl"] > 1


def test_a_rerun_reuses_stages_and_a_new_recipe_redoes_only_what_follows(text: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _run(text, out)
    assert first.reused == []
    again = _run(text, out)
    assert again.reused == ["eval_before", "accuracy_before", "scores_before", "prune", "eval_after",
                            "accuracy_after", "scores_after"]
    assert again.metrics["perplexity"] == first.metrics["perplexity"]
    other = {"steps": [{"method": "layers", "sparsity": 0.6}]}
    third = _run(text, out, recipe=other)
    assert third.reused == ["eval_before", "accuracy_before", "scores_before"]
    assert json.loads((out / "model/imprune.json").read_text())["recipe"]["steps"][0]["sparsity"] == 0.6
    fourth = _run(text, out, recipe=other, eval_tokens=256)  # new evaluation: dense eval and eval after only
    assert fourth.reused == ["accuracy_before", "scores_before", "prune", "accuracy_after", "scores_after"]
    fifth = _run(text, out, recipe=other, eval_tokens=256, task_limit=2)  # new item count: accuracy stages only
    assert fifth.reused == ["eval_before", "scores_before", "prune", "eval_after", "scores_after"]


def test_an_interrupted_stage_leaves_nothing_that_looks_finished(text: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    real = Pipeline._score
    calls = []

    def flaky(self, lm, path):  # the second scoring (after pruning) dies half-way through writing
        calls.append(path)
        if len(calls) == 2:
            path.mkdir()
            (path / "table.json").write_text("{")
            raise KeyboardInterrupt
        return real(self, lm, path)

    monkeypatch.setattr(Pipeline, "_score", flaky)
    with pytest.raises(KeyboardInterrupt):
        _run(text, out)
    assert not (out / "scores_after").exists() and not (out / "stages/scores_after.json").exists()
    assert not list(out.glob(".scores_after*"))  # no temporary folder left either
    assert (out / "stages/prune.json").is_file()
    monkeypatch.setattr(Pipeline, "_score", real)
    assert _run(text, out).reused == ["eval_before", "accuracy_before", "scores_before", "prune", "eval_after",
                                      "accuracy_after"]


@pytest.mark.parametrize("recipe,match", [
    ({"steps": [{"method": "layers", "sparsity": 0.5, "critrion": "taylor"}]}, "unknown key 'critrion'"),
    ({"steps": [{"method": "shrink", "sparsity": 0.5}]}, "unknown method 'shrink'"),
    ({"steps": [{"method": "layers", "sparsity": 1.5}]}, "'sparsity' must be a number in"),
    ({"steps": []}, "non-empty list"),
    ({"step": [{"method": "layers"}]}, "unknown key 'step'"),
    ({"steps": [{"method": "heads", "sparsity": 0.5, "heads": "four"}]}, "'heads' must be a int"),
    ({"steps": [{"method": "heads", "sparsity": 0.5, "gqa": "all"}]}, "choose one of"),
])
def test_invalid_recipes_name_the_wrong_key(recipe: dict, match: str) -> None:
    with pytest.raises(ImpruneError, match=match):
        parse_recipe(recipe)


def test_invalid_recipe_file_exits_2_and_writes_nothing(text: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - method: layers\n    sparsity: 0.5\n    speed: fast\n")
    code = main(["run", "--model", "random:llama", "--data", f"file:{text}", "--recipe", str(bad),
                 "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unknown key 'speed'" in err[0]
    assert not (tmp_path / "run").exists()
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ImpruneError, match="does not parse"):
        load_recipe(broken)


def test_every_shipped_recipe_validates() -> None:
    shipped = shipped_recipes()
    assert {"demo", "wanda50", "nm24", "width20", "layers25"} <= set(shipped)
    for name in shipped:
        assert load_recipe(name).steps


def test_a_first_step_by_a_scorer_the_run_table_lacks_scores_it_itself(text: Path, tmp_path: Path) -> None:
    """The run's table holds the one-pass scorers; a recipe that removes layers by the measured ``removal``
    gets it scored on the calibration windows, and removes the layer whose bypass costs least there."""
    from importance.validate.ablation import measure_ablation

    recipe = {"name": "r", "steps": [{"method": "layers", "sparsity": 0.34, "criterion": "removal"}]}
    out = tmp_path / "run"
    pipe = Pipeline(_cfg(text), parse_recipe(recipe), out, progress=False, log=lambda s: None)
    pipe.run()
    step = json.loads((out / "model/imprune.json").read_text())["steps"][0]["structured"]
    lm = load_model("random:llama:layers=3")
    calib = pipe.windows("calib", lm)
    first = calib.subset(slice(0, max(1, 2048 // calib.seq_len)))
    cost = measure_ablation(lm.model, first, lm.task, ("layer",), progress=False).values["layer"]
    assert step["criterion"] == "removal"
    assert step["layers_removed"] == [int(cost.argmin())]
    assert step["layer_scores"] == pytest.approx(cost.tolist(), rel=1e-4, abs=1e-6)


def test_probe_accuracy_before_and_after(text: Path, tmp_path: Path) -> None:
    from pruning.cli.run import summary
    from pruning.eval.tasks import probe_accuracy

    m = _run(text, tmp_path / "run", task_limit=4).metrics
    acc = m["accuracy"]
    assert acc["items_per_task"] == 4 and list(acc["before"]) == list(TASKS) == list(acc["after"])
    dense = probe_accuracy(load_model("random:llama:layers=3"), list(TASKS), 4)  # the same numbers, measured here
    assert acc["before"] == {r.task: r.to_dict() for r in dense}
    pruned = probe_accuracy(load_model(str(tmp_path / "run" / "model")), list(TASKS), 4)
    assert acc["after"] == {r.task: r.to_dict() for r in pruned}
    text_out = summary(m, tmp_path / "run")
    assert "  accuracy  " in text_out and "chance" in text_out
    off = _run(text, tmp_path / "off", task_limit=0)
    assert off.metrics["accuracy"] is None and not (tmp_path / "off" / "stages" / "accuracy_before.json").exists()
    assert "  accuracy  " not in summary(off.metrics, tmp_path / "off")
