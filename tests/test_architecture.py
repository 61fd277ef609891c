"""The package layout of harness/ (README "Layout", docs/architecture.md): imports run one way.

Read from the source with `ast`, so a new upward import fails here with the module and line that
made it, before it grows into a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import PROJECT_ROOT

HARNESS = PROJECT_ROOT / "harness"
# Bottom to top: a module may import its own package and the ones listed before it.
LAYERS = ["errors", "host", "private_apis", "runtime", "lean_import", "config", "distributed", "data", "tasks",
          "training", "checkpoint", "operations", "control", "results"]
# `harness/__init__.py` only offers `harness.load` (results), imported when called.
IMPORTED_BY_THE_ROOT_PACKAGE = {"results"}


def _unit(path: Path) -> str:
    """The layer a file belongs to: its package under harness/, or the top-level module's name."""
    relative = path.relative_to(HARNESS)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imported_units(tree: ast.AST) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(tree):
        modules: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "harness":
            modules = [f"harness.{alias.name}" for alias in node.names] if node.module == "harness" else [node.module]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names if alias.name.split(".")[0] == "harness"]
        for module in modules:
            parts = module.split(".")
            if len(parts) > 1 and parts[1] != "PROJECT_ROOT":
                found.append((parts[1], node.lineno))
    return found


def test_every_package_imports_only_packages_below_it() -> None:
    upward = []
    files = sorted(HARNESS.rglob("*.py"))
    assert len(files) > 40, "harness/ not found: the test would check nothing"
    for path in files:
        unit = _unit(path)
        if unit == "__init__":
            imported = {name for name, _ in _imported_units(ast.parse(path.read_text()))}
            assert imported <= IMPORTED_BY_THE_ROOT_PACKAGE, imported
            continue
        assert unit in LAYERS, f"{path}: a new package or top-level module; place it in LAYERS"
        for name, line in _imported_units(ast.parse(path.read_text())):
            if LAYERS.index(name) > LAYERS.index(unit):
                upward.append(f"{path.relative_to(PROJECT_ROOT)}:{line} imports harness.{name}")
    assert upward == []


def test_measurement_and_fault_injection_tooling_is_not_in_the_library() -> None:
    names = {path.stem for path in HARNESS.rglob("*.py")}
    assert not names & {"benchmarking", "chaos"}
    assert (PROJECT_ROOT / "scripts" / "tooling" / "chaos.py").is_file()
