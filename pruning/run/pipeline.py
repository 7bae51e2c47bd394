"""``imprune run``: evaluate, score, prune by a recipe, evaluate and score again, draw, report.

Run directory (what ``pruning.run.report`` reads)::

    RUN_DIR/metrics.json        perplexity and probe accuracy before/after, parameters, weight bytes, timings, settings
    RUN_DIR/scores_before/      ImportanceTable of the dense model
    RUN_DIR/scores_after/       ImportanceTable of the pruned model (same data)
    RUN_DIR/model/              the pruned model (+ imprune.json with the recipe and the sparsity map)
    RUN_DIR/healed/             the healed model, when the recipe ends with a ``heal`` step (``pruning.heal``);
                                "after" (perplexity, accuracy, scores) is then this model, "pruned" the one above
    RUN_DIR/figures/            heatmaps before / after / delta, the sparsity map
    RUN_DIR/report.html         one self-contained page
    RUN_DIR/stages/NAME.json    one marker per finished stage: the key of its settings, its seconds

A stage is reused when its marker holds the key of the same settings (upstream keys included, so a new
recipe redoes pruning and everything after it but not the dense evaluation). The settings hold fingerprints
of the inputs (``importance.store.fingerprint``: the model's files, the data's content), so a changed text file or
changed weights redo what depends on them, and only that. Unless pruning is reused, every recipe step is
checked against the loaded model (``pruning.methods.checks``) before the first stage runs. A stage removes its marker
before it starts and writes it only after its output was renamed into place, so an interrupted stage
never looks finished.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from importance.arch.canonical import model_map
from importance.data.sources import Windows, load_data
from importance.data.tasks import TASKS
from importance.errors import ImpruneError
from importance.models.load import LoadedModel, load_model
from importance.scorers import SCORERS
from importance.scoring import DEFAULT_SCORERS, score
from importance.store.fingerprint import data_fingerprint, model_fingerprint
from importance.store.meta import versions, write_json
from importance.table import ImportanceTable
from pruning.eval.perplexity import perplexity
from pruning.methods.checks import check_step
from pruning.methods.registry import METHODS, PruneContext
from pruning.run.recipes import HEAL, Recipe, Step, heal_namespace

_TABLE_CRITERIA = {"taylor", "fisher"}  # criteria that read an importance table (the rest use calibration)


@dataclass(frozen=True)
class RunConfig:
    """Settings of one run; everything that changes a result is part of some stage key."""

    model: str = "builtin:smollm2-135m"
    data: str = "austen:train"
    tokens: int = 8192
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 4
    scorers: tuple[str, ...] = DEFAULT_SCORERS
    eval_data: str = "austen:eval"
    eval_tokens: int = 16384
    tasks: tuple[str, ...] = tuple(TASKS)  # built-in probes whose accuracy is measured before / after
    task_limit: int = 16  # items per probe (0: no accuracy stages)
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    allow_pickle: bool = False  # a pickle-only model folder, read with weights_only=True (no effect on results)


@dataclass
class RunResult:
    out: Path
    metrics: dict[str, Any]
    reused: list[str] = field(default_factory=list)


def _key(settings: Any) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _publish(final: Path, write: Callable[[Path], None], is_dir: bool) -> None:
    """``write`` a new path (a unique temporary sibling), then swap it into ``final``; the old copy goes only
    after (``importance.store.outputs.publish``: atomic exchange, stale temporaries cleaned, OSError -> one line)."""
    from importance.store.outputs import publish

    with publish(final, kind="dir" if is_dir else "file", overwrite=True, create=False) as tmp:
        write(tmp)


class Pipeline:
    """One run: stages in order, each reused when its settings key matches what is on disk."""

    def __init__(self, cfg: RunConfig, recipe: Recipe, out: Path, progress: bool = True,
                 log: Callable[[str], None] = print) -> None:
        self.cfg, self.recipe, self.out, self.progress, self.log = cfg, recipe, Path(out), progress, log
        self.timings: dict[str, float] = {}
        self.reused: list[str] = []
        self._dense: LoadedModel | None = None
        self._pruned: LoadedModel | None = None
        self._healed: LoadedModel | None = None
        self.prune_steps = tuple(s for s in recipe.steps if s.method != HEAL)
        self.heal_step = next((s for s in recipe.steps if s.method == HEAL), None)
        self._windows: dict[str, Windows] = {}
        self._fingerprints: dict[str, str] = {}

    # ---------------------------------------------------------------------------------------------- stages

    def _stage(self, name: str, settings: dict[str, Any], output: Path, write: Callable[[Path], None],
               is_dir: bool) -> str:
        key = _key(settings)
        marker = self.out / "stages" / f"{name}.json"
        if self._done(name, key, output):
            self.reused.append(name)
            self.log(f"  {name}: reused (settings unchanged)")
            return key
        marker.unlink(missing_ok=True)
        self.log(f"  {name} ...")
        start = time.perf_counter()
        _publish(output, write, is_dir)
        self.timings[name] = round(time.perf_counter() - start, 2)
        write_json(marker, {"key": key, "settings": settings, "seconds": self.timings[name]})
        return key

    def _done(self, name: str, key: str, output: Path) -> bool:
        """Whether stage ``name`` finished with settings ``key`` and its output is still there."""
        marker = self.out / "stages" / f"{name}.json"
        try:
            return marker.is_file() and output.exists() and json.loads(marker.read_text()).get("key") == key
        except (OSError, ValueError, AttributeError):  # an unreadable or foreign marker: not finished
            return False

    def fingerprints(self) -> dict[str, str]:
        """What the inputs hold (``importance.store.fingerprint``): a changed file or weights change the stage keys."""
        if not self._fingerprints:
            c = self.cfg
            self._fingerprints = {"model": model_fingerprint(c.model), "data": data_fingerprint(c.data, "--data")}
            self._fingerprints["eval_data"] = self._fingerprints["data"] if c.eval_data == c.data else \
                data_fingerprint(c.eval_data, "--eval-data")
        return self._fingerprints

    def validate(self) -> None:
        """Every recipe step checked against the dense model (``pruning.methods.checks``) before the first stage."""
        mm = model_map(self.dense().model)
        for i, step in enumerate(self.recipe.steps, 1):
            try:
                if step.method != HEAL:  # a heal step's settings were checked by heal_config
                    check_step(mm, step.method, self._namespace(step))
            except ImpruneError as err:
                raise ImpruneError(f"recipe {self.recipe.name}, step {i} ({step.method}): {err}") from None

    def heal_config(self) -> Any:
        from pruning.heal.config import heal_config

        assert self.heal_step is not None
        try:
            return heal_config(heal_namespace(self.heal_step), self.cfg.seq_len, self.cfg.seed, self.progress)
        except ImpruneError as err:
            raise ImpruneError(f"recipe {self.recipe.name}, step {len(self.recipe.steps)} (heal): {err}") from None

    def run(self) -> RunResult:
        c, out = self.cfg, self.out
        fp = self.fingerprints()
        model_s = {"model": c.model, "model_fingerprint": fp["model"], "dtype": c.dtype,
                   "trust_remote_code": c.trust_remote_code}
        eval_s = {"data": c.eval_data, "data_fingerprint": fp["eval_data"], "tokens": c.eval_tokens,
                  "seq_len": c.seq_len}
        calib_s = {"data": c.data, "data_fingerprint": fp["data"], "tokens": c.tokens, "seq_len": c.seq_len,
                   "seed": c.seed}
        score_s = {**calib_s, "scorers": list(c.scorers), "batch_size": c.batch_size}
        recipe_s = {**self.recipe.to_dict(), "steps": [s.to_dict() for s in self.prune_steps]}  # heal: its own key
        prune_s = {**model_s, **calib_s, "batch_size": c.batch_size, "recipe": recipe_s,
                   "scores": _key({**model_s, **score_s})}
        heal_s = {"prune": _key(prune_s), **calib_s, "heal": self.heal_config().key_settings()} \
            if self.heal_step else None
        if not self._done("prune", _key(prune_s), out / "model") or \
                (heal_s and not self._done("heal", _key(heal_s), out / "healed")):
            self.validate()  # a recipe this model cannot take fails before any stage runs or writes
        self.log(f"[1/6] dense evaluation on {c.eval_data}")
        k_eval = self._stage("eval_before", {**model_s, **eval_s}, out / "stages" / "eval_before.out.json",
                             lambda p: self._evaluate(self.dense(), p), False)
        acc_s = {**model_s, "tasks": list(c.tasks), "task_limit": c.task_limit, "seed": c.seed}
        k_acc = self._stage("accuracy_before", acc_s, out / "stages" / "accuracy_before.out.json",
                            lambda p: self._accuracy(self.dense(), p), False) if c.task_limit and c.tasks else None
        self.log(f"[2/6] scoring the dense model on {c.data} ({', '.join(c.scorers)})")
        self._stage("scores_before", {**model_s, **score_s}, out / "scores_before",
                    lambda p: self._score(self.dense(), p), True)
        self.log(f"[3/6] pruning: recipe {self.recipe.name} ({len(self.prune_steps)} step(s))")
        k_prune = self._stage("prune", prune_s, out / "model", self._prune, True)
        if heal_s is not None:
            self.log("[3/6] evaluating the pruned model, then healing it")
            self._stage("eval_pruned", {"prune": k_prune, "eval": k_eval}, out / "stages" / "eval_pruned.out.json",
                        lambda p: self._evaluate(self.pruned(), p), False)
            if k_acc is not None:
                self._stage("accuracy_pruned", {"prune": k_prune, "accuracy": k_acc},
                            out / "stages" / "accuracy_pruned.out.json", lambda p: self._accuracy(self.pruned(), p),
                            False)
            k_prune = self._stage("heal", heal_s, out / "healed", self._heal, True)  # "after" is the healed model
        self.log("[4/6] evaluating the " + ("healed" if heal_s else "pruned") + " model")
        self._stage("eval_after", {"prune": k_prune, "eval": k_eval}, out / "stages" / "eval_after.out.json",
                    lambda p: self._evaluate(self.final(), p), False)
        if k_acc is not None:
            self._stage("accuracy_after", {"prune": k_prune, "accuracy": k_acc},
                        out / "stages" / "accuracy_after.out.json", lambda p: self._accuracy(self.final(), p), False)
        self.log("[5/6] scoring the pruned model on the same data")
        self._stage("scores_after", {"prune": k_prune, **score_s}, out / "scores_after",
                    lambda p: self._score(self.final(), p), True)
        self.log("[6/6] figures, metrics and report")
        metrics = self._metrics()
        write_json(out / "metrics.json", metrics)
        from pruning.run.report import write_run_outputs

        write_run_outputs(out)
        return RunResult(out, metrics, self.reused)

    # --------------------------------------------------------------------------------------------- models

    def dense(self) -> LoadedModel:
        if self._dense is None:
            c = self.cfg
            self._dense = load_model(c.model, dtype=c.dtype, device=c.device, trust_remote_code=c.trust_remote_code,
                                     allow_pickle=c.allow_pickle)
            if self._dense.task != "causal-lm" and self._dense.task != "masked-lm":
                raise ImpruneError(f"{c.model} is an encoder without a language-model head: `imprune run` needs a "
                                   "loss to evaluate; use a causal or masked language model")
        return self._dense

    def pruned(self) -> LoadedModel:
        if self._pruned is None:  # pruning was reused: reload what it wrote (this also proves it reloads)
            c = self.cfg
            self._pruned = load_model(str(self.out / "model"), dtype=c.dtype, device=c.device)
        return self._pruned

    def final(self) -> LoadedModel:
        """What "after" measures: the healed model when the recipe heals, else the pruned one."""
        if self.heal_step is None:
            return self.pruned()
        if self._healed is None:  # healing was reused: reload what it wrote
            c = self.cfg
            self._healed = load_model(str(self.out / "healed"), dtype=c.dtype, device=c.device)
        return self._healed

    def windows(self, which: str, lm: LoadedModel) -> Windows:
        if which not in self._windows:
            c = self.cfg
            limit = getattr(lm.model.config, "max_position_embeddings", None)
            if which == "eval":
                self._windows[which] = load_data(c.eval_data, lm.tokenizer, seq_len=c.seq_len, tokens=c.eval_tokens,
                                                 sampling="sequential", max_positions=limit,
                                                 flags=("--eval-tokens", "--seq-len"))
            else:
                self._windows[which] = load_data(c.data, lm.tokenizer, seq_len=c.seq_len, tokens=c.tokens,
                                                 seed=c.seed, max_positions=limit)
        return self._windows[which]

    # ------------------------------------------------------------------------------------------ stage bodies

    def _evaluate(self, lm: LoadedModel, path: Path) -> None:
        ppl = perplexity(lm.model, self.windows("eval", lm), lm.task, batch_size=8, progress=self.progress)
        write_json(path, {**ppl.to_dict(), **_size(lm)})

    def _accuracy(self, lm: LoadedModel, path: Path) -> None:
        from pruning.eval.tasks import probe_accuracy

        if lm.task != "causal-lm":  # a masked LM has no answer continuation to score: not measured
            write_json(path, {})
            return
        rows = probe_accuracy(lm, list(self.cfg.tasks), self.cfg.task_limit, self.cfg.seed, batch_size=16,
                              progress=self.progress)
        write_json(path, {r.task: r.to_dict() for r in rows})

    def _score(self, lm: LoadedModel, path: Path) -> None:
        table = score(lm, self.windows("calib", lm), list(self.cfg.scorers), seed=self.cfg.seed,
                      batch_size=self.cfg.batch_size, progress=self.progress)
        table.save(path)

    def _prune(self, path: Path) -> None:
        from importance.models.identity import check_table
        from pruning.io import save_model

        lm = self.dense()
        self._dense = None  # pruned in place: the dense copy is gone
        mm = model_map(lm.model)
        before = {(c.layer, c.name): c.numel for c in mm.components() if c.kind != "norm"}
        origin = list(range(mm.n_layers))  # current layer index -> original index
        table: ImportanceTable | None = ImportanceTable.load(self.out / "scores_before")
        check_table(table, lm)
        steps = []
        for i, step in enumerate(self.prune_steps, 1):
            if i > 1:
                table = self._table_for(step, lm)
            elif table is not None and (crit := dict(step.options).get("criterion")) in SCORERS \
                    and crit not in table.scorers:
                table = None  # a scorer the run's table does not hold (removal): the method scores it itself
            args = self._namespace(step)
            start = time.perf_counter()
            result = METHODS[step.method].fn(PruneContext(lm, args, table, lambda: self.windows("calib", lm)))
            kept = result.record.get("structured", {}).get("layers_kept")
            if kept is not None:
                origin = [origin[k] for k in kept]
            steps.append({**step.to_dict(), **result.record, "seconds": round(time.perf_counter() - start, 2),
                          "sparsity": {str(k): v for k, v in result.sparsity.items()}})
        self._pruned = lm
        sparsity = measured_sparsity(before, model_map(lm.model), origin)
        shapes_changed = any(s.get("shapes_changed") or s.get("structured") for s in steps)
        record = {"method": "recipe", "recipe": self.recipe.to_dict(), "steps": steps, "layers_kept": origin,
                  "sparsity": {str(k): v for k, v in sparsity.items()}, "shapes_changed": shapes_changed,
                  "calibration": dict(self.windows("calib", lm).meta)}
        save_model(lm, path, record)

    def _heal(self, path: Path) -> None:
        """Heal the pruned model in place against a fresh copy of the dense one (``pruning.heal``); the
        checkpoint under stages/heal.ckpt lets an interrupted run resume where it stopped."""
        import shutil

        from importance.models.identity import read_record
        from pruning.heal.job import prepare
        from pruning.heal.lineage import check_student

        c, cfg = self.cfg, self.heal_config()
        student = self.pruned()
        self._pruned = None  # healed in place: the pruned copy is on disk only
        record = read_record(self.out / "model")
        check_student(student, record)
        job = prepare(student, self.dense(), record, c.data, cfg, c.seq_len, c.seed)
        ckpt = self.out / "stages" / "heal.ckpt"
        result = job.run(ckpt)
        self._dense = None  # the teacher's memory back before scoring
        self._healed = student
        job.save(result, path)
        shutil.rmtree(ckpt, ignore_errors=True)

    def _namespace(self, step: Step) -> Any:
        """The flags a step's method reads: its own, and the prune command's shared ones from the run."""
        c = self.cfg
        return step.namespace(batch_size=c.batch_size, quiet=not self.progress, data=c.data, tokens=c.tokens,
                              seq_len=c.seq_len, seed=c.seed)

    def _table_for(self, step: Step, lm: LoadedModel) -> ImportanceTable | None:
        """A later step that ranks by a table gets one scored on the model as the earlier steps left it."""
        opts = dict(step.options)
        crit = opts.get("criterion") or ("fisher" if step.method in ("heads", "channels", "width") else None)
        if crit not in _TABLE_CRITERIA and opts.get("allocation") != "importance":
            return None
        names = sorted({n for n in (crit, opts.get("alloc_scorer")) if n in DEFAULT_SCORERS} or {"fisher"})
        return score(lm, self.windows("calib", lm), names, batch_size=self.cfg.batch_size, progress=self.progress)

    # ------------------------------------------------------------------------------------------------ metrics

    def _metrics(self) -> dict[str, Any]:
        read = lambda name: json.loads((self.out / "stages" / f"{name}.out.json").read_text())  # noqa: E731
        before, after = read("eval_before"), read("eval_after")
        pruned = read("eval_pruned") if self.heal_step is not None else None
        heal = None
        if self.heal_step is not None:
            from importance.models.identity import read_record

            h = (read_record(self.out / "healed") or {}).get("heal", {})
            heal = {k: h.get(k) for k in ("steps", "tokens", "seconds", "trainable", "kind", "ranks", "curve",
                                          "layer_errors", "resumed_from", "settings")}
        accuracy = None
        if self.cfg.task_limit and self.cfg.tasks:
            accuracy = {"before": read("accuracy_before"), "after": read("accuracy_after"),
                        **({"pruned": read("accuracy_pruned")} if self.heal_step is not None else {}),
                        "items_per_task": self.cfg.task_limit,
                        "metric": "multiple choice over the probes' distractors: acc = highest summed "
                                  "log-likelihood, acc_norm = per character; chance = mean 1 / choices"}
        size = ("params", "nonzero", "weight_bytes")
        timings = {}
        for marker in sorted((self.out / "stages").glob("*.json")):
            if not marker.name.endswith(".out.json"):
                timings[marker.stem] = json.loads(marker.read_text()).get("seconds")
        return {"schema": "imprune.metrics/1", "model": self.cfg.model, "recipe": self.recipe.to_dict(),
                "perplexity": {"before": {k: v for k, v in before.items() if k not in size},
                               **({"pruned": {k: v for k, v in pruned.items() if k not in size}} if pruned else {}),
                               "after": {k: v for k, v in after.items() if k not in size}},
                "heal": heal,
                "accuracy": accuracy,
                "params": {"before": before["params"], "after": after["params"]},
                "nonzero_params": {"before": before["nonzero"], "after": after["nonzero"]},
                "memory": {"weight_bytes_before": before["weight_bytes"], "weight_bytes_after": after["weight_bytes"]},
                "timings": timings, "computed_now": dict(self.timings), "reused": list(self.reused),
                "settings": asdict(self.cfg), "inputs": self.fingerprints(), "versions": versions()}


def _size(lm: LoadedModel) -> dict[str, int]:
    """Parameter count, non-zeros and bytes of the model's distinct tensors (tied weights once)."""
    seen, params, nonzero, nbytes = set(), 0, 0, 0
    for p in lm.model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        params += p.numel()
        nonzero += int(p.count_nonzero())
        nbytes += p.numel() * p.element_size()
    return {"params": params, "nonzero": nonzero, "weight_bytes": nbytes}


def measured_sparsity(before: dict[tuple[int, str], int], after: Any, origin: list[int]) -> dict[int, dict]:
    """Fraction of each original layer x component's weights that are gone (removed or zero) in ``after``."""
    left = {}
    for c in after.components():
        if (origin[c.layer], c.name) in before:
            left[(origin[c.layer], c.name)] = int(c.weight.count_nonzero())
    out: dict[int, dict[str, float]] = {}
    for (layer, name), n in before.items():
        out.setdefault(layer, {})[name] = round(1.0 - left.get((layer, name), 0) / n, 6) if n else 0.0
    return out
