"""The tree's shape (README "Layout"): imports go only down, and none hides in a function.

Which package may import which is import-linter's contract in ``pyproject.toml``, checked by
``tests/run.sh``; this adds what it cannot see: an import of our own inside a function (the
way a cycle hides), and that every package says what it holds.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "restconsumer"
MODULES = sorted(PACKAGE.rglob("*.py"))


def local_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """Imports of restconsumer modules inside a function or class body of ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("restconsumer"):
                    found.append((inner.lineno, inner.module or ""))
                elif isinstance(inner, ast.Import):
                    found.extend((inner.lineno, a.name) for a in inner.names
                                 if a.name.startswith("restconsumer"))
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_ours_inside_a_function(path: Path) -> None:
    assert local_imports(ast.parse(path.read_text())) == []


def test_the_check_sees_a_local_import() -> None:
    tree = ast.parse("def f():\n    from restconsumer.jobs.mapping import Outgoing\n    import json\n")
    assert local_imports(tree) == [(2, "restconsumer.jobs.mapping")]


def test_every_package_says_what_it_holds() -> None:
    packages = [p for p in PACKAGE.rglob("__init__.py")]
    assert len(packages) >= 8
    for init in packages:
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 80, init
