"""Layering of attndsl/ (ARCHITECTURE.md): codegen never imports runtime, and no module imports
a module that imports it back, counting imports inside functions (lazy imports hid the cycles).
Imports under `if TYPE_CHECKING:` never run, so they are not counted.
`python tests/test_layering.py` prints the graph and its cycles."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "attndsl"


def module_names() -> dict[str, Path]:
    """Dotted name -> file for every module of the package (a package is its __init__)."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


class _Imports(ast.NodeVisitor):
    """The package modules one module's source imports, anywhere in its body."""

    def __init__(self, module: str, is_package: bool, known: set[str]) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.known = known
        self.found: set[str] = set()

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
        if name == "TYPE_CHECKING":
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.found.update(alias.name for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            parts = self.package.split(".")
            parent = ".".join(parts[:len(parts) - node.level + 1])
            base = f"{parent}.{node.module}" if node.module else parent
        for alias in node.names:  # `from pkg import module` imports the module itself
            sub = f"{base}.{alias.name}"
            self.found.add(sub if sub in self.known else base)


def imports_of(module: str, source: str, is_package: bool, known: set[str]) -> set[str]:
    visitor = _Imports(module, is_package, known)
    visitor.visit(ast.parse(source))
    return {name for name in visitor.found if name in known and name != module}


def import_graph() -> dict[str, set[str]]:
    names = module_names()
    return {name: imports_of(name, path.read_text(encoding="utf-8"),
                             path.name == "__init__.py", set(names))
            for name, path in names.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = [stack.pop()]
            while component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_codegen_imports_nothing_from_runtime() -> None:
    bad = {name: sorted(dep for dep in deps if dep.startswith("attndsl.runtime"))
           for name, deps in import_graph().items() if name.startswith("attndsl.codegen")}
    assert {name: deps for name, deps in bad.items() if deps} == {}


def test_layering_sees_lazy_relative_and_package_imports() -> None:
    # the checks above are only as good as this parser: a function-level relative import, a
    # module imported from its package, a name imported from a package's __init__
    known = {"attndsl", "attndsl.grad", "attndsl.codegen", "attndsl.codegen.numpy_ref",
             "attndsl.runtime.cache"}
    source = ("from typing import TYPE_CHECKING\n"
              "if TYPE_CHECKING:\n    from ..runtime import cache\n"
              "def f():\n    from ..grad import derive_gradients\n"
              "    from . import numpy_ref\n    from .. import __version__\n")
    assert imports_of("attndsl.codegen.x", source, False, known) == {
        "attndsl.grad", "attndsl.codegen.numpy_ref", "attndsl"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


if __name__ == "__main__":
    graph = import_graph()
    for name in sorted(graph):
        print(name, "->", ", ".join(sorted(graph[name])))
    print("cycles:")
    for component in cycles(graph):
        print("  ", " <-> ".join(component))
