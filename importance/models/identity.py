"""Do two artifacts describe the same model? The one check used wherever a table, a model and a plan meet.

``ModelFacts`` is what an artifact says about the model it describes: the spec, the architecture (model type,
layer count, head counts, component names and shapes) and its lineage (the dense model it was pruned or
quantized from and the original index of each kept layer, from the pruned folder's ``imprune.json``). Facts come
from a table's ``table.json`` (``table_facts``), a loaded model (``model_facts``) or a plan (``check_plan``).

``check_same_model(a, b)`` raises one ``ImpruneError`` naming both artifacts when they disagree:

* the model types differ, or both specs name a self-describing model (``random:<type>`` with its seed,
  ``builtin:<name>``) and they name different ones (the root of a pruned model's lineage is what counts);
* otherwise the architectures must be equal, field by field where both artifacts record it;
* with ``derived=True`` (before / after pictures) ``b`` may instead be ``a``'s model after pruning: its
  lineage says it was made from a source model, it has no more layers than ``a`` (each kept layer maps to an
  original one), no more heads, only components ``a`` has and no dimension larger than ``a``'s. This is exactly
  what ``imprune prune`` / ``imprune run`` produce, so a pruned model's table passes beside its dense one,
  and a table of another model fails.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from importance.errors import ImpruneError
from importance.table import ImportanceTable


@dataclass(frozen=True)
class ModelFacts:
    """What one artifact records about its model (None: not recorded)."""

    where: str  # how a message names the artifact: "table 'A'", "--model X"
    spec: str | None = None
    model_type: str | None = None
    layers: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    components: tuple[str, ...] | None = None
    shapes: dict[str, tuple[int, ...]] | None = None
    source: dict[str, Any] | None = None  # describe() of the model this one was pruned / quantized from
    layers_kept: tuple[int, ...] | None = None  # original index of each layer, when its lineage records it
    pruned: bool = False  # a lineage record (imprune.json) says this model was made from another one

    def summary(self) -> str:
        parts = [p for p in (self.model_type, f"{self.layers} layers" if self.layers is not None else None,
                             f"{self.heads} heads" if self.heads is not None else None) if p]
        return f"{self.spec or '?'}: {', '.join(parts) or 'no architecture recorded'}"


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _shapes(value: Any) -> dict[str, tuple[int, ...]] | None:
    if not isinstance(value, Mapping):
        return None
    out = {}
    for k, v in value.items():
        if not isinstance(v, (list, tuple)) or not all(_int(d) is not None for d in v):
            return None
        out[str(k)] = tuple(int(d) for d in v)
    return out


def read_json_object(path: Path, fix: str, label: str = "") -> dict[str, Any]:
    """The JSON object in ``path``; not JSON text, invalid JSON, unreadable or not an object is one
    ``ImpruneError`` naming the file (``label`` before it, e.g. 'plan ') and ``fix``."""
    where = f"{label}'{path}'"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ImpruneError(f"{where} is not valid JSON ({err.msg}, line {err.lineno}); {fix}") from None
    except UnicodeDecodeError:
        raise ImpruneError(f"{where} is not JSON text (undecodable bytes); {fix}") from None
    except OSError as err:
        raise ImpruneError(f"{where} cannot be read ({err.strerror}); {fix}") from None
    if not isinstance(data, dict):
        raise ImpruneError(f"{where} should hold a JSON object; {fix}")
    return data


def read_record(folder: str | Path | None) -> dict[str, Any] | None:
    """A model folder's ``imprune.json`` (what pruning or quantization wrote), or None when there is none or it
    cannot be read (then nothing is claimed about the lineage)."""
    if not isinstance(folder, (str, Path)) or not str(folder):
        return None
    path = Path(folder).expanduser() / "imprune.json"
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def record_layers_kept(record: Mapping[str, Any] | None) -> tuple[int, ...] | None:
    """The original index of each layer a pruning record kept (``imprune run``: top level; ``imprune prune
    --method layers``: under ``structured``), or None."""
    if not isinstance(record, Mapping):
        return None
    kept = record.get("layers_kept")
    structured = record.get("structured")
    if kept is None and isinstance(structured, Mapping):
        kept = structured.get("layers_kept")
    if not isinstance(kept, list) or not all(_int(k) is not None for k in kept):
        return None
    return tuple(int(k) for k in kept)


def table_facts(table: Any, where: str, record: Mapping[str, Any] | None = None) -> ModelFacts:
    """Facts from an ``ImportanceTable``'s metadata. ``record`` is the lineage of the table's model (a run
    folder's ``model/imprune.json``); without it, the imprune.json of the folder the model was loaded from is
    read when it is still there."""
    meta = table.meta
    model = meta.get("model") if isinstance(meta.get("model"), Mapping) else {}
    spec = model.get("spec") if isinstance(model, Mapping) else None
    if spec is None and isinstance(meta.get("model"), str):
        spec = meta["model"]
    if record is None:
        record = read_record(model.get("source") if isinstance(model, Mapping) else None)
    comps = meta.get("components")
    return ModelFacts(
        where, str(spec) if spec is not None else None,
        str(meta.get("model_type") or model.get("model_type") or "") or None,
        _int(meta.get("layers")), _int(meta.get("heads")), _int(meta.get("kv_heads")), _int(meta.get("head_dim")),
        tuple(str(c) for c in comps) if isinstance(comps, list) else None, _shapes(meta.get("shapes")),
        *lineage(record))


def lineage(record: Mapping[str, Any] | None) -> tuple[dict[str, Any] | None, tuple[int, ...] | None, bool]:
    """(source model, layers_kept, pruned) as a pruning record states them: the lineage fields of ``ModelFacts``."""
    if not isinstance(record, Mapping):
        return None, None, False
    source = record.get("source_model")
    return (dict(source) if isinstance(source, Mapping) else None), record_layers_kept(record), True


def model_facts(lm: Any, mm: Any | None = None) -> ModelFacts:
    """Facts from a loaded model (``importance.models.load.LoadedModel``)."""
    from importance.arch.canonical import model_map

    mm = mm if mm is not None else model_map(lm.model)
    b0 = mm.blocks[0]
    record = read_record(lm.source) if lm.source and Path(str(lm.source)).is_dir() else None
    return ModelFacts(f"--model {lm.spec}", lm.spec, str(mm.model_type), mm.n_layers, b0.n_heads, b0.n_kv_heads,
                      b0.head_dim, tuple(mm.component_names()),
                      {f"{c.layer}|{c.name}": tuple(c.shape) for c in mm.components()}, *lineage(record))


def identity(spec: Any) -> str | None:
    """A canonical name for specs that name one model by themselves (``builtin:NAME``, ``random:TYPE`` with its
    seed; the other random overrides show in the shapes); None for folders and hub ids, which can hold copies."""
    if not isinstance(spec, str):
        return None
    spec = spec.strip()
    if spec.startswith("builtin:"):
        return spec
    if spec.startswith("random:"):
        from importance.models import tiny as models

        try:
            model_type, overrides = models.parse_random_spec(spec)
        except ImpruneError:
            return None
        defaults = {**models.TINY, **models.TINY_EXTRA.get(model_type, {}),
                    "seed": 0}
        short = {v: k for k, v in models.OVERRIDE_KEYS.items()}
        given = {short.get(k, k): v for k, v in overrides.items() if k != "seed" and v != defaults.get(k)}
        given["seed"] = overrides.get("seed", 0)
        return f"random:{model_type}:" + ",".join(f"{k}={v}" for k, v in sorted(given.items()))
    return None


def _root(f: ModelFacts) -> str | None:
    return identity(f.source.get("spec")) if f.source is not None else identity(f.spec)


def _differences(a: ModelFacts, b: ModelFacts) -> str | None:
    """The first architecture field the two record differently, or None when they agree."""
    for name in ("layers", "heads", "kv_heads", "head_dim"):
        x, y = getattr(a, name), getattr(b, name)
        if x is not None and y is not None and x != y:
            return f"{x} vs {y} {name.replace('_', ' ')}"
    if a.components is not None and b.components is not None and set(a.components) != set(b.components):
        return "different components"
    if a.shapes is not None and b.shapes is not None and a.shapes != b.shapes:
        key = next((k for k in sorted(set(a.shapes) | set(b.shapes)) if a.shapes.get(k) != b.shapes.get(k)), "?")
        return f"{key.replace('|', ' ')} is {_dims(a.shapes.get(key))} vs {_dims(b.shapes.get(key))}"
    return None


def _dims(shape: tuple[int, ...] | None) -> str:
    return "absent" if shape is None else "x".join(map(str, shape))


def _not_derived(a: ModelFacts, b: ModelFacts) -> str | None:
    """Why ``b`` cannot be ``a``'s model after pruning, or None when it can."""
    if not b.pruned:
        return "no imprune.json beside its model names a source model"
    for name in ("layers", "heads", "kv_heads", "head_dim"):
        x, y = getattr(a, name), getattr(b, name)
        if x is not None and y is not None and y > x:
            return f"it has more {name.replace('_', ' ')}"
    if a.layers is not None and b.layers is not None and b.layers < a.layers:
        kept = b.layers_kept
        if kept is None or len(kept) != b.layers or any(not 0 <= k < a.layers for k in kept):
            return "its imprune.json has no layers_kept that lines up its layers"
    if a.components is not None and b.components is not None and not set(b.components) <= set(a.components):
        return f"it has component {sorted(set(b.components) - set(a.components))[0]}, which the first lacks"
    if a.shapes is not None and b.shapes is not None:
        widest: dict[str, tuple[int, ...]] = {}
        for key, shape in a.shapes.items():
            name = key.split("|")[-1]
            old = widest.get(name)
            widest[name] = shape if old is None or len(old) != len(shape) else tuple(map(max, old, shape))
        for key, shape in b.shapes.items():
            top = widest.get(key.split("|")[-1])
            if top is None or len(top) != len(shape) or any(s > t for s, t in zip(shape, top)):
                return f"its {key.replace('|', ' ')} is {_dims(shape)}, wider than the first's {_dims(top)}"
    return None


def check_same_model(a: ModelFacts, b: ModelFacts, fix: str, derived: bool = False) -> tuple[int, ...] | None:
    """Raise one ``ImpruneError`` naming both artifacts (and ``fix``) unless they describe the same model, or,
    with ``derived``, ``b`` is ``a``'s model after pruning (module docstring). Returns ``b``'s layers_kept
    (the original layer of each of its rows) when its lineage records one that fits, else None."""

    def fail(reason: str) -> ImpruneError:
        return ImpruneError(f"{b.where} ({b.summary()}) is of another model than {a.where} ({a.summary()}): "
                            f"{reason}; {fix}")

    if a.model_type and b.model_type and a.model_type != b.model_type:
        raise fail(f"model type {a.model_type} vs {b.model_type}")
    ra, rb = _root(a), _root(b)
    if ra is not None and rb is not None and ra != rb:
        raise fail(f"{ra} vs {rb}")
    diff = _differences(a, b)
    if diff is not None:
        if not derived:
            raise fail(diff)
        why = _not_derived(a, b)
        if why is not None:
            raise fail(f"{diff}, and it is not a pruned copy ({why})")
    kept = b.layers_kept
    if kept is not None and (b.layers is None or len(kept) != b.layers or
                             (a.layers is not None and any(not 0 <= k < a.layers for k in kept))):
        return None
    return kept


def check_plan_map(record: Any, where: str, fix: str) -> None:
    """A plan's 'sparsity' / 'bits' map, when it has one, is {layer index: {component: number}}."""
    if not isinstance(record, Mapping):
        raise ImpruneError(f"{where} should hold a JSON object; {fix}")
    for kind in ("sparsity", "bits"):
        values = record.get(kind)
        if values is None:
            continue
        ok = isinstance(values, Mapping) and all(
            str(k).isdigit() and isinstance(row, Mapping) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in row.values())
            for k, row in values.items())
        if not ok:
            raise ImpruneError(f"{where}: '{kind}' is not a map of layer index -> component -> number; {fix}")


def check_plan(record: Mapping[str, Any], where: str, table: ModelFacts, fix: str) -> None:
    """A plan (imprune.json with a 'sparsity' or 'bits' map over its source model's layers x components) drawn
    beside or against ``table``: same model type and identity as its ``source_model``, and every layer and
    component of the map in the table (a map may leave out layers: ``quantize --keep``)."""
    source = record.get("source_model") if isinstance(record.get("source_model"), Mapping) else None
    plan = ModelFacts(where, str(source.get("spec")) if source and source.get("spec") is not None else None,
                      str(source.get("model_type")) if source and source.get("model_type") else None)

    def fail(reason: str) -> ImpruneError:
        return ImpruneError(f"{where} (of {plan.spec or 'an unrecorded model'}) does not fit {table.where} "
                            f"({table.summary()}): {reason}; {fix}")

    if plan.model_type and table.model_type and plan.model_type != table.model_type:
        raise fail(f"model type {plan.model_type} vs {table.model_type}")
    ra, rb = identity(plan.spec), identity(table.spec)
    if ra is not None and rb is not None and ra != rb:
        raise fail(f"{ra} vs {rb}")
    for kind in ("sparsity", "bits"):
        values = record.get(kind)
        if not isinstance(values, Mapping) or not values:
            continue
        layers = {int(k) for k in values if str(k).isdigit()}
        comps = {c for row in values.values() if isinstance(row, Mapping) for c in row}
        if table.layers is not None and layers and max(layers) >= table.layers:
            raise fail(f"its {kind} map covers {max(layers) + 1} layers, the table {table.layers}")
        if table.components is not None and not comps <= set(table.components):
            raise fail(f"component {sorted(comps - set(table.components))[0]} is not in the table")
        return


def check_table(table: ImportanceTable, lm: Any, where: str = "the importance table", fix: str | None = None,
                mm: Any = None) -> None:
    """The table must come from this model (same architecture and identity); ``fix`` is the advice of the line."""
    check_same_model(model_facts(lm, mm), table_facts(table, where),
                     fix or f"score --model {lm.spec} with `imprune score --out DIR` and pass that --scores")
