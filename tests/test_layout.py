"""Dependencies point one way: exporters/ imports nothing from threed/, examples/ nothing from tests/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module `path` imports (at any depth in the file, lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__" and node.args:
            if isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names.add(node.args[0].value.split(".")[0])
    return names


def test_the_scan_sees_lazy_and_dotted_imports(tmp_path):
    """The checks below could pass by not looking: a file with the imports they forbid must be caught."""
    sample = tmp_path / "sample.py"
    sample.write_text("import os\n\ndef f():\n    from threed.mesh import Mesh\n    import tiny_models as t\n"
                      "    return __import__('tests.shapes')\n")
    assert imported_modules(sample) == {"os", "threed", "tiny_models", "tests"}


@pytest.mark.parametrize("path", sorted((ROOT / "exporters").rglob("*.py")), ids=lambda p: p.name)
def test_exporters_import_nothing_from_threed(path):
    assert "threed" not in imported_modules(path)


@pytest.mark.parametrize("path", sorted((ROOT / "examples").rglob("*.py")), ids=lambda p: p.name)
def test_examples_import_nothing_from_tests(path):
    assert not imported_modules(path) & {"tests", "tiny_models", "conftest", "helpers_gltf", "shapes"}
    assert '"tests"' not in path.read_text() and "'tests'" not in path.read_text()  # no sys.path into tests/
