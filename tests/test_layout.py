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


#: The one module allowed private names of Twisted (pinned by tests/test_pinned.py).
PINNED = PACKAGE / "delivery" / "agent.py"
#: Private names of Twisted and txredisapi once used here, looked for by name.
KNOWN_PRIVATE = {"_requestWithEndpoint", "_getEndpoint", "_parseServer", "_addCACertsToContext",
                 "_sslverify", "IOpenSSLTrustRoot"}
#: Private fields of Twisted's endpoints and txredisapi's handler: ours only on ``self``.
FOREIGN_FIELDS = {"_port", "_interface", "_address", "_factory"}


def our_names(trees: list[ast.AST]) -> set[str]:
    """Every name restconsumer itself defines, assigns or takes as an argument."""
    names: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return names


def private_uses(tree: ast.AST, ours: set[str]) -> list[tuple[int, str]]:
    """Private names of others that ``tree`` uses: imported from a private module or by a
    private name of Twisted or txredisapi, known ones anywhere, an endpoint's private field on
    something other than ``self``, or any ``x._name`` we never define (lower-case: Kafka's
    error codes such as ``KafkaError._PARTITION_EOF`` are its documented API)."""
    found = []
    for node in ast.walk(tree):
        module = node.module or "" if isinstance(node, ast.ImportFrom) else ""
        if isinstance(node, ast.ImportFrom) and module.split(".")[0] in ("twisted", "txredisapi"):
            names = [a.name for a in node.names]
            if any(part.startswith("_") for part in module.split(".")) or \
                    any(n.startswith("_") or n in KNOWN_PRIVATE for n in names):
                found.append((node.lineno, f"from {module} import {', '.join(names)}"))
        elif isinstance(node, ast.Attribute):
            on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            name = node.attr
            if name in KNOWN_PRIVATE or (name in FOREIGN_FIELDS and not on_self) or (
                    name.startswith("_") and not name.startswith("__") and not name.isupper()
                    and name not in ours and name != "_exit"):
                found.append((node.lineno, name))
    return sorted(found)


def test_no_private_names_of_twisted_or_txredisapi_outside_the_pinned_module() -> None:
    trees = {path: ast.parse(path.read_text()) for path in MODULES}
    ours = our_names(list(trees.values()))
    used = {str(path.relative_to(PACKAGE)): private_uses(tree, ours)
            for path, tree in trees.items() if path != PINNED}
    assert {path: uses for path, uses in used.items() if uses} == {}
    assert private_uses(trees[PINNED], ours)  # the pinned module is where they are


def test_the_check_sees_private_names() -> None:
    tree = ast.parse("from twisted.internet._sslverify import IOpenSSLTrustRoot\n"
                     "endpoints._parseServer('tcp:1', None)\n"
                     "port = endpoint._port\n"
                     "pool._factory.maxDelay = 2\n"
                     "agent._somethingNew()\n"
                     "self._port = 1\n"
                     "KafkaError._PARTITION_EOF\n")
    assert private_uses(tree, {"_port"}) == [
        (1, "from twisted.internet._sslverify import IOpenSSLTrustRoot"),
        (2, "_parseServer"), (3, "_port"), (4, "_factory"), (5, "_somethingNew")]
