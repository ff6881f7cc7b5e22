"""Every test says what it shows (STYLE.md, "Testing"; docs/design.md: each
promise has tests, and a reader should find which one without running it).

Walks the test modules with ``ast`` (nothing is imported or run) and lists
the test functions and methods, the ones pytest collects, that have no
docstring.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, Union

TESTS = Path(__file__).resolve().parent

Function = Union[ast.FunctionDef, ast.AsyncFunctionDef]


def _tests_in(body: list[ast.stmt]) -> Iterator[Function]:
    """The test functions of a module body, and the test methods of its
    classes (nested classes too); not functions defined inside a test."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.name.startswith("test"):
                yield node
        elif isinstance(node, ast.ClassDef):
            yield from _tests_in(node.body)


def undocumented(root: Path) -> list[str]:
    """``path:line: name`` of every test under ``root`` without a docstring."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in _tests_in(tree.body):
            if not (ast.get_docstring(node) or "").strip():
                found.append(f"{path.relative_to(root)}:{node.lineno}: {node.name}")
    return found


def test_every_test_has_a_docstring() -> None:
    """No test function or method under tests/ lacks a docstring saying what it shows."""
    assert undocumented(TESTS) == []


def test_the_checker_finds_an_undocumented_test(tmp_path: Path) -> None:
    """The checker lists a test without a docstring, in a class or not, and passes
    documented tests and helpers."""
    (tmp_path / "test_x.py").write_text(
        'def test_bare():\n    pass\n\n'
        'def test_told():\n    """Shows a thing."""\n\n'
        'def helper():\n    pass\n\n'
        'class Case:\n'
        '    async def test_method(self):\n        pass\n\n'
        '    def test_fine(self):\n        """Shows another."""\n'
        '        def test_inner():\n            pass\n')
    assert undocumented(tmp_path) == ["test_x.py:1: test_bare", "test_x.py:11: test_method"]
