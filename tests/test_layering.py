"""The layers of refattn (CONTRIBUTING.md): no module imports another in a
cycle, each is a layer that can be read (and loaded) after the ones it uses,
and the math (ops and block math modules) imports none of the tools around
it, the check module and the specs included.

Every module under the two packages is parsed with ``ast``.  Each ``import``
and ``from ... import`` in it, at module level or inside a function, that
names a refattn module is an edge: ``from pkg import name`` leads to
``pkg.name`` when that is a module, else to ``pkg``; relative imports are
resolved.  The implicit import of a package's ``__init__`` before any of its
submodules is not an edge (refattn/cli/__init__.py imports ``main``, which
imports every subcommand: counted, every package ``__init__`` that exposes a
submodule would be a cycle).
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("refattn/golden", "refattn/cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    base = REPO.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _imports(path: Path, name: str) -> set[str]:
    """The refattn modules that the module `name` (file `path`) imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0]  # up level - 1
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}")
                       else base for alias in node.names]
        else:
            continue
        out.update(t for t in targets if t == "refattn" or t.startswith("refattn."))
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module name -> the refattn modules it imports, for both packages."""
    graph = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = _module_name(path)
            graph[name] = _imports(path, name)
    return graph


def find_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One cycle ``[a, b, ..., a]`` through each strongly connected component
    of `graph` that has one (Tarjan's algorithm, then a breadth-first search
    for the way back to the component's first module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for component in components:
        start = min(component)
        if len(component) == 1 and start not in graph.get(start, ()):
            continue
        came_from: dict[str, str] = {}  # module -> the one importing it on the way
        frontier = [start]
        while start not in came_from:
            reached = []
            for v in frontier:
                for w in sorted(graph[v] & component):
                    if w not in came_from:
                        came_from[w] = v
                        reached.append(w)
            frontier = reached
        path = [start]
        while len(path) == 1 or path[-1] != start:
            path.append(came_from[path[-1]])
        cycles.append(path[::-1])
    return cycles


def test_no_import_cycles_in_cli_and_golden() -> None:
    graph = import_graph()
    # the parser sees imports at both levels (a blind parser finds no cycle)
    assert "refattn.golden.format" in graph["refattn.cli.verify"]  # module level
    assert "refattn.golden.generate" in graph["refattn.cli.golden"]  # in a function
    cycles = find_cycles(graph)
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_find_cycles_finds_planted_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": set(), "e": {"e"},
             "f": {"g"}, "g": set()}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["e", "e"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def package_graph() -> dict[str, set[str]]:
    """Module name -> the refattn modules it imports, for all of refattn."""
    return {_module_name(p): _imports(p, _module_name(p))
            for p in sorted((REPO / "refattn").rglob("*.py"))}


def test_no_import_cycle_anywhere_in_refattn() -> None:
    assert find_cycles(package_graph()) == []


MATH_MAY_IMPORT = ("refattn._typing", "refattn.backend", "refattn.params", "refattn.ops")
"""What the math sees: the array backend, parameter-dict helpers, the ops
(the override table among them) and the other block math modules."""

NOT_MATH = ("refattn.blocks.registry", "refattn.blocks.spec", "refattn.blocks.specs")


def math_modules(graph: Mapping[str, set[str]]) -> list[str]:
    """The ops and the block math modules (``refattn/blocks/<block>.py``)."""
    return sorted(m for m in graph if m.startswith("refattn.ops")
                  or (m.startswith("refattn.blocks.") and not m.startswith(NOT_MATH)))


def tool_imports(graph: Mapping[str, set[str]]) -> list[tuple[str, str]]:
    """(module, import) for every import of a math module outside what the
    math may see: no check module (``refattn.checks``), no spec, no tool
    (golden, cli, cuda, validate, gradcheck, plot, adapters)."""
    math = math_modules(graph)
    assert len(math) >= 14
    blocks = {m for m in math if m.startswith("refattn.blocks.")}
    return sorted((m, d) for m in math for d in graph[m]
                  if not (d.startswith(MATH_MAY_IMPORT) or d in blocks))


def test_the_math_imports_no_tool() -> None:
    graph = package_graph()
    assert {"refattn.blocks.cbam", "refattn.blocks.cgnl", "refattn.ops.conv"} <= set(
        math_modules(graph))
    assert "refattn.blocks.specs.cbam" not in math_modules(graph)
    assert tool_imports(graph) == []


def test_the_checks_sit_above_the_math() -> None:
    """Every spec module checks through refattn.checks, which imports no math."""
    graph = package_graph()
    specs = [m for m in graph if m.startswith("refattn.blocks.specs.")]
    assert len(specs) >= 7
    assert all("refattn.checks" in graph[m] for m in specs)
    assert not any(d.startswith(("refattn.blocks", "refattn.ops"))
                   for d in graph["refattn.checks"])


def test_the_package_scan_finds_a_planted_tool_import_and_cycle() -> None:
    graph = package_graph()
    graph["refattn.ops.softmax"] = graph["refattn.ops.softmax"] | {"refattn.golden.format"}
    assert tool_imports(graph) == [("refattn.ops.softmax", "refattn.golden.format")]
    graph["refattn.blocks.cbam"] = graph["refattn.blocks.cbam"] | {"refattn.checks"}
    graph["refattn.blocks.gap"] = graph["refattn.blocks.gap"] | {"refattn.blocks.spec"}
    assert ("refattn.blocks.cbam", "refattn.checks") in tool_imports(graph)
    assert ("refattn.blocks.gap", "refattn.blocks.spec") in tool_imports(graph)
    graph["refattn.backend"] = graph["refattn.backend"] | {"refattn.ops.softmax"}
    assert ["refattn.backend", "refattn.ops.softmax", "refattn.backend"] in find_cycles(graph)
