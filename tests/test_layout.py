"""The layering of the packages (README, Layout): checked over the source with ``ast``, not by convention.

- nothing under ``importance/`` imports ``pruning`` (the scoring half never depends on the acting half);
- nothing outside ``pruning/cli/`` imports ``pruning.cli`` (the command line is the top layer);
- every module opens with a docstring, and every package's ``__init__.py`` says what lives there.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p for pkg in ("importance", "pruning") for p in (ROOT / pkg).rglob("*.py"))


def _imports(path: Path, root: Path = ROOT) -> list[str]:
    """Every module name ``path`` imports (absolute; relative imports resolved against its package)."""
    package = list(path.relative_to(root).parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names += [base] + [f"{base}.{a.name}" for a in node.names]
    return names


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_module_list_is_not_empty() -> None:
    assert len(MODULES) > 40 and any("cli" in p.parts for p in MODULES)


@pytest.mark.parametrize("path", [p for p in MODULES if p.parts[len(ROOT.parts)] == "importance"], ids=_rel)
def test_importance_never_imports_pruning(path: Path) -> None:
    bad = [n for n in _imports(path) if n == "pruning" or n.startswith("pruning.")]
    assert not bad, f"{_rel(path)} imports {bad}: importance/ must not depend on pruning/"


@pytest.mark.parametrize("path", [p for p in MODULES if "cli" not in p.relative_to(ROOT).parts], ids=_rel)
def test_only_the_cli_imports_the_cli(path: Path) -> None:
    bad = [n for n in _imports(path) if n == "pruning.cli" or n.startswith("pruning.cli.")]
    if path == ROOT / "pruning" / "__main__.py":  # `python -m pruning` is the command line itself
        bad = [n for n in bad if n != "pruning.cli" and n != "pruning.cli.main"]
    assert not bad, f"{_rel(path)} imports {bad}: only pruning/cli/ may import the command line"


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_every_module_has_a_docstring(path: Path) -> None:
    tree = ast.parse(path.read_text())
    if path.name == "__init__.py" and path.parent in (ROOT / "importance", ROOT / "pruning") and not tree.body:
        pytest.skip("a top-level package marker without code")
    assert ast.get_docstring(tree), f"{_rel(path)} has no opening docstring"


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The import walker itself: a relative import of the CLI from a sibling package resolves to pruning.cli."""
    mod = tmp_path / "pruning" / "run" / "probe.py"
    mod.parent.mkdir(parents=True)
    mod.write_text('"""probe"""\nfrom ..cli import core\nfrom . import report\nimport pruning.methods\n')
    names = _imports(mod, tmp_path)
    assert {"pruning.cli", "pruning.cli.core", "pruning.run.report", "pruning.methods"} <= set(names)
