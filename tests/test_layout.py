"""The package's layering, read from the source with `ast`: no module imports, directly or through others,
one that imports it back, and the method imports nothing from the harness, study, report or tasks."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "diffusion_lib"
METHOD = ("schedule", "models", "diffusion", "mining", "samplers", "registry")
ABOVE_THE_METHOD = ("harness", "study", "report", "tasks")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
    return isinstance(node, ast.If) and name == "TYPE_CHECKING"


def _imports(node: ast.AST, package: str, modules: set[str]) -> set[str]:
    """The modules of `modules` imported anywhere under `node` (module level and in functions), outside
    `if TYPE_CHECKING:` blocks; relative imports resolved against `package`. `from a import b` points at
    a.b if that is a module, else at a; never at a's parent packages (so a package's __init__ importing
    its submodules is no cycle)."""
    found = set()
    for child in ast.iter_child_nodes(node):
        if _type_checking_only(child):
            found |= {m for other in child.orelse for m in _imports(other, package, modules)}
            continue
        if isinstance(child, ast.Import):
            found |= {alias.name for alias in child.names}
        elif isinstance(child, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - child.level + 1]) if child.level else ""
            module = ".".join(p for p in (base, child.module or "") if p)
            found |= {f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in child.names}
        found |= _imports(child, package, modules)
    return found & modules


def import_graph(source: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """module -> the modules of `source` it imports; `source`: module -> (its code, whether it is a package)."""
    graph = {}
    for name, (code, is_package) in source.items():
        package = name if is_package else name.rpartition(".")[0]
        graph[name] = _imports(ast.parse(code), package, set(source)) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle as [a, b, ..., a], or [] if the graph has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def package_graph() -> dict[str, set[str]]:
    return import_graph({module_name(p): (p.read_text(), p.name == "__init__.py") for p in PACKAGE.rglob("*.py")})


# -- the checks themselves can fail ----------------------------------------------------------------------
def test_the_graph_sees_function_level_imports_and_skips_type_checking_blocks():
    source = {
        "pkg": ("from pkg import a, b  # a package importing its submodules", True),
        "pkg.a": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import X\n", False),
        "pkg.b": ("def f():\n    from . import c\n", False),
        "pkg.c": ("import pkg.a\nfrom pkg.a import helper\n", False),
    }
    graph = import_graph(source)
    assert graph == {"pkg": {"pkg.a", "pkg.b"}, "pkg.a": set(), "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}}
    assert find_cycle(graph) == []
    source["pkg.a"] = ("def g():\n    from pkg.b import f\n", False)  # a function-level import closes a circle
    assert find_cycle(import_graph(source)) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]


# -- the package ----------------------------------------------------------------------------------------------
def test_no_module_imports_one_that_imports_it_back():
    cycle = find_cycle(package_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_method_imports_nothing_from_the_harness_study_report_or_tasks():
    graph = package_graph()
    assert {f"diffusion_lib.{m}" for m in METHOD} <= set(graph)
    for module in METHOD:
        above = sorted(m for m in reachable(graph, f"diffusion_lib.{module}")
                       if m.split(".")[1] in ABOVE_THE_METHOD)
        assert not above, f"diffusion_lib.{module} imports {above}"
