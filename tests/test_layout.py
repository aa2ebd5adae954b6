"""Dependencies point one way: exporters/ imports nothing from threed/, examples/ nothing from tests/, no
module of threed/ or exporters/ imports itself back through others; and no module there is over 700 lines."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("threed", "exporters")
MAX_MODULE_LINES = 700


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


# -- import circles ---------------------------------------------------------------------------------------

def package_modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file, for every module of `package` (a folder under `root`); a package is its __init__."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    """`if TYPE_CHECKING:` or `if typing.TYPE_CHECKING:`: imports for annotations only."""
    test = node.test
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of `tree` but those in the body of an `if TYPE_CHECKING:`, which never runs (its else does)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack += [node.test, *node.orelse]
        else:
            stack += ast.iter_child_nodes(node)


def _absolute(level: int, name: str, package: str) -> str:
    """The module a relative import of `name` at `level` dots names, from a module of `package`."""
    parts = package.split(".")
    return ".".join(parts[:len(parts) - level + 1] + ([name] if name else []))


def _import_module_target(call: ast.Call, package: str) -> str | None:
    """The literal module name of an `importlib.import_module(...)` or `__import__(...)` call, resolved."""
    func = call.func
    kind = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if kind not in ("import_module", "__import__"):
        return None
    if not call.args or not isinstance(call.args[0], ast.Constant) or not isinstance(call.args[0].value, str):
        return None
    name = call.args[0].value
    if not name.startswith("."):
        return name
    if kind == "__import__":  # relative only through its `level` argument
        return None
    anchor = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "package"), None)
    if isinstance(anchor, ast.Name) and anchor.id == "__package__":
        base = package
    elif isinstance(anchor, ast.Constant) and isinstance(anchor.value, str):
        base = anchor.value
    else:
        return None
    level = len(name) - len(name.lstrip("."))
    return _absolute(level, name[level:], base)


def import_targets(node: ast.AST, package: str) -> list[str]:
    """Dotted names that `node` may import, if it is an import: `from a import b` gives a and a.b (b may be a
    module). `package`: the package of the module the node is in, which relative imports start from."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = _absolute(node.level, node.module or "", package) if node.level else node.module or ""
        return [base, *(f"{base}.{alias.name}" for alias in node.names)]
    if isinstance(node, ast.Call):
        target = _import_module_target(node, package)
        return [target] if target else []
    return []


def import_graph(root: Path, package: str) -> dict[str, dict[str, str]]:
    """module -> {module of the same package it imports at run time: "file:line" of its first such import}."""
    modules = package_modules(root, package)
    graph: dict[str, dict[str, str]] = {}
    for name, path in modules.items():
        home = name if path.name == "__init__.py" else name.rpartition(".")[0]
        first: dict[str, int] = {}
        for node in runtime_nodes(ast.parse(path.read_text(), filename=str(path))):
            for target in import_targets(node, home):
                if target in modules and target != name:
                    first[target] = min(first.get(target, node.lineno), node.lineno)
        where = path.relative_to(root).as_posix()
        graph[name] = {target: f"{where}:{line}" for target, line in sorted(first.items())}
    return graph


def import_cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def shortest_circle(graph: dict[str, dict[str, str]], component: list[str]) -> list[str]:
    """The shortest way from the component's first module back to itself (breadth first), for the message."""
    start = component[0]
    paths = {start: [start]}
    queue = [start]
    for v in queue:
        for w in graph[v]:
            if w == start:
                return paths[v] + [start]
            if w in component and w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    raise AssertionError(f"{component} is not a strongly connected component")


def describe_cycles(graph: dict[str, dict[str, str]], cycles: list[list[str]]) -> str:
    """Each circle, then every import among its modules, so a failure says which to remove or move."""
    lines = []
    for component in cycles:
        lines.append("circle: " + " -> ".join(shortest_circle(graph, component)))
        lines.append(f"  imports among {', '.join(component)}:")
        lines += [f"    {a} -> {b}   ({where})" for a in component for b, where in graph[a].items() if b in component]
    return "\n".join(lines)


def test_the_cycle_check_sees_lazy_relative_and_import_module_circles(tmp_path):
    """The circle check could pass by not looking: a package with circles closed by a lazy relative import,
    an import_module call and an else branch of TYPE_CHECKING must be caught; one closed only under
    `if TYPE_CHECKING:` must not."""
    files = {
        "__init__.py": "",
        "a.py": "from pkg import b\n",
        "b.py": "def f():\n    from . import a\n    return a\n",
        "c.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from pkg.d import D\n",
        "d.py": "import pkg.c\n\nD = 1\n",
        "e.py": "import importlib\n\nVALUE = 1\n\ndef g():\n    return importlib.import_module('pkg.sub.g')\n",
        "sub/__init__.py": "",
        "sub/g.py": "from ..e import VALUE\n",
        "h.py": "import typing\n\nif typing.TYPE_CHECKING:\n    pass\nelse:\n    from pkg import i\n",
        "i.py": "from importlib import import_module\n\nh = import_module('.h', __package__)\n",
    }
    for name, text in files.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(text)
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.b"] == {"pkg": "pkg/b.py:2", "pkg.a": "pkg/b.py:2"}
    assert graph["pkg.c"] == {} and graph["pkg.d"] == {"pkg.c": "pkg/d.py:1"}
    cycles = import_cycles(graph)
    assert cycles == [["pkg.a", "pkg.b"], ["pkg.e", "pkg.sub.g"], ["pkg.h", "pkg.i"]]
    message = describe_cycles(graph, cycles)
    assert ("circle: pkg.e -> pkg.sub.g -> pkg.e\n  imports among pkg.e, pkg.sub.g:\n"
            "    pkg.e -> pkg.sub.g   (pkg/e.py:6)\n    pkg.sub.g -> pkg.e   (pkg/sub/g.py:1)") in message
    assert "pkg.i -> pkg.h   (pkg/i.py:3)" in message
    # the real scan reads lazy imports too: the Triton hash grid is imported only inside make_hashgrid
    assert "threed.fields.hashgrid_triton" in import_graph(ROOT, "threed")["threed.fields.hashgrid_backend"]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circles(package):
    """A circle makes import order matter and hides which module is the lower one: move what both need into
    a module below them, or make one of the imports go away."""
    graph = import_graph(ROOT, package)
    cycles = import_cycles(graph)
    if cycles:
        pytest.fail(f"import circles among {package}'s modules:\n" + describe_cycles(graph, cycles), pytrace=False)


def test_no_module_is_over_700_lines():
    """A module past 700 lines does several things: split it by what they are (.py files only; the vendored
    three.min.js is not a module)."""
    sizes = {path.relative_to(ROOT).as_posix(): len(path.read_text().splitlines())
             for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
    assert "threed/config.py" in sizes  # looked
    over = {path: n for path, n in sorted(sizes.items()) if n > MAX_MODULE_LINES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines (split them): {over}"
