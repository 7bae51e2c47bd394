"""A recipe that ends with ``method: heal``: parsed and checked, run as stages, reported dense -> pruned -> healed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from importance.errors import ImpruneError
from pruning.run.recipes import heal_namespace, load_recipe, parse_recipe

PRUNE = {"method": "unstructured", "sparsity": 0.5, "criterion": "magnitude"}


def test_a_heal_step_takes_the_heal_flags_under_their_own_names() -> None:
    r = parse_recipe({"steps": [PRUNE, {"method": "heal", "tokens": 4096, "heal-method": "full", "lr": 1e-4}]})
    ns = heal_namespace(r.steps[1])
    assert (ns.heal_tokens, ns.heal_method, ns.lr, ns.placement) == (4096, "full", 1e-4, "uniform")


@pytest.mark.parametrize("steps,expect", [
    ([{"method": "heal"}], "once, last, after at least one pruning step"),
    ([{"method": "heal"}, PRUNE], "once, last"),
    ([PRUNE, {"method": "heal", "sparsity": 0.1}], "drop 'sparsity'"),
    ([PRUNE, {"method": "heal", "rnak": 4}], "unknown key 'rnak' for method heal"),
    ([PRUNE, {"method": "heal", "loss": "mse"}], "choose one of kd, lm, kd+lm"),
])
def test_bad_heal_steps_are_one_line(steps: list, expect: str) -> None:
    with pytest.raises(ImpruneError, match=expect.replace("+", r"\+")):
        parse_recipe({"steps": steps})


def test_the_shipped_heal_recipes_parse() -> None:
    for name in ("width20-heal", "layers25-heal"):
        r = load_recipe(name)
        assert r.steps[-1].method == "heal" and r.steps[0].method in ("width", "layers")


def test_run_heals_after_pruning_and_reports_all_three(tmp_path: Path) -> None:
    from pruning.cli.core import main

    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"name": "t", "steps": [PRUNE, {"method": "heal", "tokens": 256, "save-every": 1}]}))
    out = tmp_path / "run"
    argv = ["run", "--model", "random:llama", "--recipe", str(recipe), "--tokens", "256", "--seq-len", "32",
            "--eval-tokens", "128", "--task-limit", "0", "--scorers", "fisher", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["perplexity"]) == ["before", "pruned", "after"]
    assert m["heal"]["steps"] == 2 and len(m["heal"]["curve"]) == 2 and m["heal"]["kind"] == "masked-lora"
    healed = json.loads((out / "healed" / "imprune.json").read_text())
    pruned = json.loads((out / "model" / "imprune.json").read_text())
    assert healed["sparsity"] == pruned["sparsity"] and healed["pruned_by"] == "recipe"
    assert m["nonzero_params"]["after"] == json.loads((out / "stages" / "eval_pruned.out.json").read_text())["nonzero"]
    assert (out / "figures" / "heal.png").is_file() and "Healing" in (out / "report.html").read_text()
    assert not (out / "stages" / "heal.ckpt").exists()
    # a new learning rate redoes the heal and what follows it, not the pruning
    recipe.write_text(json.dumps({"name": "t", "steps": [PRUNE, {"method": "heal", "tokens": 256, "lr": 3e-3}]}))
    assert main(argv) == 0
    m2 = json.loads((out / "metrics.json").read_text())
    assert {"prune", "eval_pruned", "eval_before", "scores_before"} <= set(m2["reused"])
    assert "heal" not in m2["reused"] and "eval_after" not in m2["reused"]
