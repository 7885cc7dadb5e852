"""Every secret the tests use, for the last test of the run to look for in the service logs.

Two sources, so that a new test's secret cannot be missed:

- :func:`collect` reads the test modules themselves (their syntax tree, not their text) and
  takes every string literal that stands where a secret does: the value of a ``pw``,
  ``password``, ``token``, ``client_secret`` or ``secret`` field or of a credential-like
  header (``Authorization``, ``X-Api-Key``…), a ``token=``/``password=`` argument, the
  value after ``--api-token``/``--api-password`` in a command line, and module constants
  and local variables named like a secret (``SECRET_PW``, ``ADMIN_TOKEN``, ``password``…),
  with names resolved to their module constants;
- :func:`secret` and :func:`new_secret` register values made at run time (random secrets
  written to environment variables or files, Fernet keys): a test calls them as it
  makes the secret.
"""

from __future__ import annotations

import ast
import itertools
import re
import secrets as _random
from collections.abc import Iterable
from pathlib import Path

from restconsumer.jobs.secrets import is_secret_header, parse_reference

__all__ = ["collect", "new_secret", "registered", "secret"]

TESTS = Path(__file__).resolve().parents[1]
_REGISTERED: set[str] = set()

#: Field names whose value is a secret (compared in lower case).
SECRET_FIELDS = frozenset({"pw", "password", "token", "client_secret", "secret", "api_token",
                           "api_password"})
#: Keyword arguments that carry a secret.
SECRET_KEYWORDS = frozenset({"token", "password", "pw", "api_token", "api_password", "secret"})
#: Command-line options followed by a secret.
SECRET_OPTIONS = frozenset({"--api-token", "--api-password", "--token", "--password"})
_SECRET_NAME = re.compile(r"(^|_)(PW|PASSWORD|TOKEN|SECRET|KEY)S?($|_)")
#: A header name as tests write one: X-Api-Key, Authorization (not an option like api-token).
_HEADER_SHAPED = re.compile(r"^[A-Z][A-Za-z0-9]*(-[A-Za-z0-9]+)*$")
_VARIABLE = re.compile(r"^[A-Z][A-Z0-9_]+$")


def secret(value: str) -> str:
    """Register a secret made at run time; returns it."""
    _REGISTERED.add(value)
    return value


def new_secret(prefix: str = "s") -> str:
    """A fresh random secret, registered."""
    return secret(f"{prefix}-{_random.token_hex(8)}")


def registered() -> set[str]:
    """The secrets registered at run time so far."""
    return set(_REGISTERED)


def worth_looking_for(value: str) -> bool:
    """Whether a value is specific enough to grep logs for.

    Short or purely alphabetic values ("secret", "password") would be found in ordinary log
    words; masks and references are no secrets.
    """
    if "***" in value or parse_reference(value) is not None or _VARIABLE.match(value):
        return False  # a mask, a reference, an environment variable's name
    return len(value) >= 8 and not value.isalpha()


def _is_secret_key(name: str) -> bool:
    if name.lower() in SECRET_FIELDS:
        return True
    # A header: Authorization, Cookie, X-Api-Key... (not "key" or "token_type" as data).
    return bool(_HEADER_SHAPED.match(name)) and is_secret_header(name)


class _Collector(ast.NodeVisitor):
    def __init__(self, constants: dict[str, str]) -> None:
        self.constants = constants
        self.found: set[str] = set()

    def value(self, node: ast.AST | None) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name):
            return self.constants.get(node.id)
        return None

    def add(self, node: ast.AST | None) -> None:
        text = self.value(node)
        if text is not None:
            self.found.add(text)

    def visit_Dict(self, node: ast.Dict) -> None:
        for key, value in zip(node.keys, node.values, strict=True):
            name = self.value(key) if key is not None else None
            if name is not None and _is_secret_key(name):
                self.add(value)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        for keyword in node.keywords:
            if keyword.arg is not None and (keyword.arg.lower() in SECRET_KEYWORDS
                                            or _is_secret_key(keyword.arg)):
                self.add(keyword.value)
        self._options(node.args)
        self.generic_visit(node)

    def visit_List(self, node: ast.List) -> None:
        self._options(node.elts)
        self.generic_visit(node)

    def visit_Tuple(self, node: ast.Tuple) -> None:
        self._options(node.elts)
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        # job["token"] = "...", headers["X-Api-Key"] = "..." are caught through Assign.
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            if isinstance(target, ast.Name) and _SECRET_NAME.search(target.id.upper()):
                self.add(node.value)  # password = "…" inside a test
            if isinstance(target, ast.Subscript):
                name = self.value(target.slice)
                if name is not None and _is_secret_key(name):
                    self.add(node.value)
        self.generic_visit(node)

    def _options(self, items: list[ast.expr]) -> None:
        for before, after in itertools.pairwise(items):
            if self.value(before) in SECRET_OPTIONS:
                self.add(after)


def _constants(tree: ast.Module) -> tuple[dict[str, str], set[str]]:
    """Module-level ``NAME = "text"`` (tuples too), and those named like a secret."""
    constants: dict[str, str] = {}
    named: set[str] = set()
    for node in tree.body:
        if not isinstance(node, (ast.Assign, ast.AnnAssign)):
            continue
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            pairs: list[tuple[ast.expr, ast.expr | None]] = [(target, node.value)]
            if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                pairs = list(zip(target.elts, node.value.elts, strict=False))
            for name, value in pairs:
                if isinstance(name, ast.Name) and isinstance(value, ast.Constant) \
                        and isinstance(value.value, str):
                    constants[name.id] = value.value
                    if _SECRET_NAME.search(name.id):
                        named.add(value.value)
    return constants, named


def collect_from(paths: Iterable[Path]) -> set[str]:
    """The secrets written in these Python files (see the module's description)."""
    found: set[str] = set()
    imported: dict[str, str] = {}
    trees = []
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        constants, named = _constants(tree)
        imported.update(constants)
        found |= named
        trees.append((tree, constants))
    for tree, constants in trees:
        # A name imported from another test module (ADMIN_TOKEN) resolves through it.
        collector = _Collector({**imported, **constants})
        collector.visit(tree)
        found |= collector.found
    return {value for value in found if worth_looking_for(value)}


def collect() -> set[str]:
    """Every secret the test modules and their helpers write down, and those registered."""
    files = sorted(TESTS.glob("*.py")) + sorted((TESTS / "infra").glob("*.py"))
    return collect_from(files) | registered()
