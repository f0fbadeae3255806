"""Layering: no import cycles among ringsync's modules and packages, and pure layers stay pure.

The cycle check reads module-level imports with ``ast`` (imports inside functions are
deliberate lazy imports, those under ``if TYPE_CHECKING:`` never run), so it sees the
structure without importing anything.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import ringsync

ROOT = Path(ringsync.__file__).parent
# Importing these must not drag in I/O frameworks: the cluster issue runs them in a
# 1000-node simulation.
PURE_PACKAGES = ("ringsync.protocol", "ringsync.policy")
HEAVY_MODULES = ("aiohttp", "asyncinotify", "prometheus_client")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        if "_profiles" not in path.relative_to(ROOT).parts:
            found[module_name(path)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_level_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: not in functions or classes, not
    under ``if TYPE_CHECKING:``."""
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            pending.extend(node.orelse if _is_type_checking(node) else node.body + node.orelse)
        elif isinstance(node, ast.Try):
            pending.extend(node.body + node.orelse + node.finalbody)
            for handler in node.handlers:
                pending.extend(handler.body)
        elif isinstance(node, ast.With):
            pending.extend(node.body)


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The ringsync modules ``name`` imports at module level."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in module_level_imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                package = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        out.update(t for t in targets if t in modules and t != name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def unit_of(module: str) -> str:
    """The layer a module belongs to: ringsync.store, ringsync.node, ringsync.errors, ..."""
    return ".".join(module.split(".")[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Imports between layers; the root package (a facade re-exporting names) is left out."""
    units: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if module in ("ringsync", "ringsync.__main__"):
            continue
        edges = units.setdefault(unit_of(module), set())
        edges.update(unit_of(t) for t in targets if unit_of(t) not in (unit_of(module), "ringsync"))
    return units


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_type_checking_imports_do_not_count() -> None:
    tree = ast.parse("import x\nif TYPE_CHECKING:\n    import y\nelse:\n    import z\n"
                     "def f():\n    import w\n")
    names = {a.name for node in module_level_imports(tree) for a in node.names}
    assert names == {"x", "z"}


def test_the_graph_sees_ringsync_imports() -> None:
    graph = import_graph()
    assert "ringsync.errors" in graph["ringsync.transport.http.wire"]
    assert "ringsync.protocol.batch" in graph["ringsync.store.receiver"]


def test_no_module_imports_itself_through_others() -> None:
    assert cycles(import_graph()) == []


def test_no_two_layers_import_each_other() -> None:
    assert cycles(package_graph(import_graph())) == []


def heavy_imports(package: str) -> str:
    """What importing every module of ``package`` in a fresh interpreter loads of HEAVY_MODULES."""
    modules = sorted(m for m in all_modules() if m == package or m.startswith(package + "."))
    code = (f"import sys\nfor m in {modules!r}:\n    __import__(m)\n"
            f"print(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT.parent, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("package", PURE_PACKAGES)
def test_pure_layers_import_no_io_framework(package: str) -> None:
    assert heavy_imports(package) == "[]", f"importing {package} imported {heavy_imports(package)}"


@pytest.mark.timeout(60)
def test_the_purity_check_sees_a_heavy_import() -> None:
    assert "'aiohttp'" in heavy_imports("ringsync.transport.http")
