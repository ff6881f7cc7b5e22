"""The import floors of docs/design.md ("Floors"), checked on the source.

Every module under ``mppproxy/`` is parsed with ``ast`` (imports inside
functions and under ``if TYPE_CHECKING:`` count too: a function-level import
that dodges a circle is still the circle), and the imports between our own
modules make one graph.  The floors table is read from docs/design.md
itself, so the document and this test cannot drift apart: a module missing
from the table, an entry naming no module, an import from a higher floor
and an import circle each fail with the modules named.
"""
from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mppproxy"
DESIGN = ROOT / "docs" / "design.md"

# What the leaves must never import (issue #11: the archive node needs
# config/, db/ and dns/ without the policy stage).
LEAVES = ("mppproxy.config", "mppproxy.db", "mppproxy.dns")
STAGES = ("policy", "scan", "relay", "smtp.server", "smtp.client", "edge", "actions", "gateway",
          "service", "policyd", "scanservice", "tap", "cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@lru_cache(maxsize=1)
def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str) -> Optional[str]:
    """The module ``name`` loads: itself, or the nearest package above it
    (``from mppproxy.x import name`` where ``name`` is not a module)."""
    known = modules()
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


@lru_cache(maxsize=1)
def imports() -> dict[str, dict[str, int]]:
    """module -> {imported module: first line}, our own modules only."""
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules().items():
        is_package = path.name == "__init__.py"
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = name if is_package else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{base}" if base else package
                # "from package import module" loads the module itself.
                targets = [f"{base}.{alias.name}" for alias in node.names] or [base]
            for target in targets:
                if target == "mppproxy" or target.startswith("mppproxy."):
                    found = _resolve(target)
                    if found is not None and found != name:
                        edges.setdefault(found, node.lineno)
        graph[name] = edges
    return graph


def _cycles() -> list[list[str]]:
    """One circle per strongly connected component of the graph (Tarjan),
    each as a path that starts and ends at the same module."""
    graph = {m: sorted(e) for m, e in imports().items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_path_through(c, graph) for c in components]


def _path_through(component: list[str], graph: dict[str, list[str]]) -> list[str]:
    """A circle inside ``component``, from its first module back to it."""
    members = set(component)
    start = component[0]
    came_from: dict[str, str] = {}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in graph[v]:
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, v, start]
            if w in members and w not in came_from:
                came_from[w] = v
                queue.append(w)
    return component  # not reached: a component always holds a circle


@lru_cache(maxsize=1)
def floors_table() -> list[tuple[int, str, str]]:
    """(floor, entry, floor name) for every package or module the floors
    table of docs/design.md names, in the order written."""
    text = DESIGN.read_text(encoding="utf-8")
    section = text.split("\n## Floors\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"(\d+): (.+)", cells[0]) if len(cells) == 3 else None
        if match is None:
            continue
        for entry in re.findall(r"`([^`]+)`", cells[1]):
            rows.append((int(match.group(1)), entry, match.group(2)))
    return rows


def _entry_prefix(entry: str) -> Optional[str]:
    """A table entry as a dotted name inside the package (``smtp/replies``
    -> ``mppproxy.smtp.replies``); None for one outside it
    (``twisted/plugins/``)."""
    path = entry.rstrip("/")
    if path.startswith("twisted/"):
        return None
    # ``__init__`` is the package's own module, not every module in it.
    return "mppproxy" if path == "__init__" else "mppproxy." + path.replace("/", ".")


def floor_of(module: str) -> Optional[tuple[int, str]]:
    """The floor of ``module`` and the entry that places it: the longest
    entry that is the module or a package above it."""
    best: Optional[tuple[int, str, int]] = None
    for floor, entry, _ in floors_table():
        prefix = _entry_prefix(entry)
        if prefix is None or (prefix == "mppproxy" and module != prefix):
            continue
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > best[2]:
                best = (floor, entry, len(prefix))
    return None if best is None else (best[0], best[1])


def test_the_design_has_a_floors_table() -> None:
    """docs/design.md has a floors table with floors 0 to 4, each naming something."""
    floors = {floor for floor, _, _ in floors_table()}
    assert floors == {0, 1, 2, 3, 4}, floors


def test_every_module_has_a_floor() -> None:
    """Every module under mppproxy/ is placed by an entry of the floors table."""
    missing = [m for m in modules() if floor_of(m) is None]
    assert not missing, ("not in the floors table of docs/design.md (add them to a floor): "
                         + ", ".join(missing))


def test_every_table_entry_names_something() -> None:
    """Each entry of the floors table names a module or package that exists."""
    stale = []
    for _, entry, _ in floors_table():
        prefix = _entry_prefix(entry)
        if prefix is None:
            exists = (ROOT / entry).exists()
        elif prefix == "mppproxy":
            exists = True
        else:
            exists = any(m == prefix or m.startswith(prefix + ".") for m in modules())
        if not exists:
            stale.append(entry)
    assert not stale, "the floors table of docs/design.md names what does not exist: " + ", ".join(stale)


def test_no_entry_is_on_two_floors() -> None:
    """No package or module is listed twice in the floors table."""
    entries = [entry.rstrip("/") for _, entry, _ in floors_table()]
    twice = sorted({e for e in entries if entries.count(e) > 1})
    assert not twice, "listed twice in the floors table: " + ", ".join(twice)


def test_no_import_from_a_higher_floor() -> None:
    """No module imports a module of a higher floor than its own."""
    upward = []
    for module, edges in sorted(imports().items()):
        mine = floor_of(module)
        for target, line in sorted(edges.items()):
            theirs = floor_of(target)
            if mine is not None and theirs is not None and theirs[0] > mine[0]:
                upward.append(f"{modules()[module].relative_to(ROOT)}:{line}: {module} (floor "
                              f"{mine[0]}, `{mine[1]}`) imports {target} (floor {theirs[0]}, "
                              f"`{theirs[1]}`)")
    assert not upward, "imports from a higher floor:\n" + "\n".join(upward)


def test_no_import_circle() -> None:
    """No module reaches itself through imports, counting function-level ones."""
    circles = [" -> ".join(c) for c in _cycles()]
    assert not circles, "import circles:\n" + "\n".join(circles)


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaves_import_no_stage(leaf: str) -> None:
    """config/, db/ and dns/ import nothing of a stage, a composition or an entry point."""
    stages = tuple(f"mppproxy.{s}" for s in STAGES)
    found = [f"{modules()[m].relative_to(ROOT)}:{line}: {m} imports {target}"
             for m, edges in sorted(imports().items()) if m == leaf or m.startswith(leaf + ".")
             for target, line in sorted(edges.items())
             if any(target == s or target.startswith(s + ".") for s in stages)]
    assert not found, f"{leaf} reaches into the stages:\n" + "\n".join(found)


def test_the_graph_sees_function_level_and_relative_imports() -> None:
    """The parser finds imports inside functions and resolves names to the module that loads them."""
    graph = imports()
    assert "mppproxy.config.schema" in graph["mppproxy.config.load"]
    # tap.py imports the services inside makeService.
    assert "mppproxy.service" in graph["mppproxy.tap"]
    # "from mppproxy.db import StateDatabase" loads the package.
    assert any(t == "mppproxy.db" or t.startswith("mppproxy.db.") for t in graph["mppproxy.policy.runtime"])
