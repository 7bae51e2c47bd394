"""Recipes for ``imprune run``: small YAML or JSON files naming the pruning steps to apply, validated.

Schema (``imprune.recipe/1``)::

    name: layers-then-wanda            # optional, defaults to the file name
    description: free text             # optional
    steps:                             # one or more, applied in order to the same model
      - method: layers                 # any method of `imprune prune` (unstructured, nm, heads, channels, ...)
        sparsity: 0.067                # fraction to remove (the method's own meaning; nm: from nm: "N:M")
        criterion: block_influence     # any flag of that method, spelled without '--' ('-' or '_')
      - method: unstructured
        sparsity: 0.3
        criterion: wanda
        allocation: importance
      - method: heal                   # optional, last: recover by distillation (``imprune heal``'s flags)
        tokens: 65536
        placement: importance

Every key is checked against the method's declared flags before any work starts; a wrong key gives one
line naming it, the step and the keys that method accepts. Shipped recipes live in ``pruning/recipes/``
and are named by their stem: ``--recipe demo`` is ``pruning/recipes/demo.yaml``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from importance.errors import ImpruneError
from pruning.methods.registry import METHODS, method_sparsity

SHIPPED = Path(__file__).parent / "recipes"
HEAL = "heal"  # the recipe step that recovers after pruning (``pruning.heal``), not a pruning method
_TOP_KEYS = {"name", "description", "steps"}
_STEP_FIXED = {"method", "sparsity"}


@dataclass(frozen=True)
class Step:
    """One pruning step: a registered method and its flag values (dest names, defaults filled in)."""

    method: str
    sparsity: float
    options: tuple[tuple[str, Any], ...]

    def namespace(self, **common: Any) -> argparse.Namespace:
        """The argparse Namespace a method function reads (its flags + the prune command's shared ones)."""
        return argparse.Namespace(method=self.method, sparsity=self.sparsity, **common, **dict(self.options))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "sparsity": self.sparsity, **dict(self.options)}


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    steps: tuple[Step, ...]
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "imprune.recipe/1", "name": self.name, "description": self.description,
                "steps": [s.to_dict() for s in self.steps]}


def shipped_recipes() -> dict[str, Path]:
    """Name -> file of every recipe that ships with the package."""
    return {p.stem: p for p in sorted(SHIPPED.glob("*.y*ml")) + sorted(SHIPPED.glob("*.json"))}


def load_recipe(spec: str | Path) -> Recipe:
    """A shipped recipe name, or a .yaml/.yml/.json file -> validated ``Recipe``."""
    path = Path(spec).expanduser()
    if not path.is_file():
        shipped = shipped_recipes()
        if str(spec) not in shipped:
            raise ImpruneError(f"recipe '{spec}' is neither a file nor a shipped recipe; use a .yaml/.json path or "
                               f"one of {', '.join(shipped)}")
        path = shipped[str(spec)]
    raw = _read(path)
    return parse_recipe(raw, name=path.stem, source=str(path))


def _read(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ImpruneError(f"recipe '{path}' is not UTF-8 text; pass a .yaml or .json recipe file") from None
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)  # safe_load: plain data only, never objects
    except Exception as err:  # noqa: BLE001 - a parse error of any library becomes one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ImpruneError(f"recipe '{path}' does not parse ({first}); fix the file (YAML or JSON)") from None


def parse_recipe(raw: Any, name: str = "recipe", source: str = "<dict>") -> Recipe:
    """Validate a recipe given as plain data (what the file holds)."""
    from pruning.methods.registry import load_methods

    load_methods()
    if not isinstance(raw, dict):
        raise ImpruneError(f"recipe {source} must be a mapping with a 'steps' list, got {type(raw).__name__}")
    extra = sorted(set(raw) - _TOP_KEYS)
    if extra:
        raise ImpruneError(f"recipe {source}: unknown key '{extra[0]}'; allowed: {', '.join(sorted(_TOP_KEYS))}")
    steps = raw.get("steps")
    if not isinstance(steps, list) or not steps:
        raise ImpruneError(f"recipe {source}: 'steps' must be a non-empty list of {{method: ..., sparsity: ...}}")
    parsed = tuple(_step(s, i, source) for i, s in enumerate(steps, 1))
    heals = [i for i, s in enumerate(parsed, 1) if s.method == HEAL]
    if heals and (heals != [len(parsed)] or len(parsed) < 2):
        raise ImpruneError(f"recipe {source}: a 'heal' step comes once, last, after at least one pruning step "
                           f"(found at step {heals[0]} of {len(parsed)})")
    return Recipe(str(raw.get("name") or name), str(raw.get("description") or ""), parsed, source)


def _step(raw: Any, i: int, source: str) -> Step:
    where = f"recipe {source}, step {i}"
    if not isinstance(raw, dict) or "method" not in raw:
        raise ImpruneError(f"{where}: a step is a mapping with at least 'method' (one of {', '.join(METHODS)})")
    method = raw["method"]
    if method not in METHODS and method != HEAL:
        raise ImpruneError(f"{where}: unknown method '{method}'; use one of {', '.join([*METHODS, HEAL])}")
    flags = _flags(method)
    options: dict[str, Any] = {dest: kwargs.get("default", False if kwargs.get("action") == "store_true" else None)
                               for dest, kwargs in flags.items()}
    for key, value in raw.items():
        if key in _STEP_FIXED:
            continue
        dest = key.replace("-", "_")
        if dest not in flags:
            fixed = {"method"} if method == HEAL else {"method", "sparsity"}
            allowed = ", ".join(sorted({*fixed, *(d.replace("_", "-") for d in flags)}))
            raise ImpruneError(f"{where}: unknown key '{key}' for method {method}; allowed: {allowed}")
        options[dest] = _coerce(flags[dest], value, f"{where}, '{key}'")
    if method == HEAL:
        if "sparsity" in raw:
            raise ImpruneError(f"{where}: a heal step removes nothing: drop 'sparsity'")
        return Step(method, 0.0, tuple(sorted(options.items())))
    sparsity = raw.get("sparsity")
    if sparsity is not None and (not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool)
                                 or not 0.0 <= float(sparsity) < 1.0):
        raise ImpruneError(f"{where}: 'sparsity' must be a number in [0, 1), got {sparsity!r}")
    if method == "nm" and isinstance(raw.get("nm"), int):
        raise ImpruneError(f"{where}: 'nm' must be quoted, like nm: \"2:4\" (YAML reads 2:4 unquoted as the "
                           f"number {raw['nm']})")
    sparsity = method_sparsity(method, sparsity, options.get("nm"), f"{where}: ", ("'sparsity'", "'nm'"))
    return Step(method, sparsity, tuple(sorted(options.items())))


def _flags(method: str) -> dict[str, dict[str, Any]]:
    """Recipe key (the flag's name, '-' as '_') -> the flag's declaration; a heal step's own method is
    ``heal_method`` (``method`` is the step's key)."""
    out = {}
    if method == HEAL:
        from pruning.heal.config import HEAL_ARGS

        for flags, kwargs in HEAL_ARGS:
            name = flags[0][2:].replace("-", "_")
            out["heal_method" if name == "method" else name] = {**kwargs, "dest": kwargs.get("dest", name)}
        return out
    for flags, kwargs in METHODS[method].args:
        long = next(f for f in flags if f.startswith("--"))
        out[kwargs.get("dest", long[2:].replace("-", "_"))] = kwargs
    return out


def _coerce(kwargs: dict[str, Any], value: Any, where: str) -> Any:
    """Apply the flag's own type and choices to a recipe value, as the command line would."""
    if kwargs.get("action") == "store_true":
        if not isinstance(value, bool):
            raise ImpruneError(f"{where} must be true or false, got {value!r}")
        return value
    kind = kwargs.get("type")
    if kind is not None and value is not None:
        try:
            value = kind(value)
        except (TypeError, ValueError):
            raise ImpruneError(f"{where} must be a {getattr(kind, '__name__', kind)}, got {value!r}") from None
    elif isinstance(value, list):
        value = ",".join(str(v) for v in value)
    choices = kwargs.get("choices")
    if choices is not None and value not in choices:
        raise ImpruneError(f"{where} is {value!r}; choose one of {', '.join(map(str, choices))}")
    return value


def heal_namespace(step: Step) -> argparse.Namespace:
    """A heal step's options under the dest names ``pruning.heal.config.heal_config`` reads."""
    flags = _flags(HEAL)
    return argparse.Namespace(**{flags[k]["dest"]: v for k, v in step.options})
