"""The shape of a job definition: ``JobDefinition`` of the API's ``openapi.json``.

That document (OpenAPI 3.1, whose schemas are JSON Schema 2020-12) is the one statement of
a job's fields and of their types, enums, ranges and patterns; :func:`problems` checks a
definition against it with jsonschema and words every error as the API's 400 names it: a
field path (``retry.max_wait``, ``headers.X-Id``, ``topic[1]``) and a reason. The rules
between fields, and the service's policy, stay with :mod:`restconsumer.jobs.model`.

The document is package data of ``restconsumer`` itself (``api/openapi.json``, as
``setup.py`` declares it) and is read as a resource of that root package: nothing of
:mod:`restconsumer.api`, which sits above this package, is imported.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError

__all__ = ["Report", "Shape", "document", "problems", "shape"]

#: Where the description is, inside the ``restconsumer`` package.
RESOURCE = ("api", "openapi.json")
#: The schema of a job definition in it.
DEFINITION = "JobDefinition"

#: Where an answer names a problem elsewhere than jsonschema finds it, as the API always did:
#: a key list's bad items are the list's problem (``json_body: must be a list of strings``),
#: and a repeated status code is named at its own index (a repeated topic at the list).
WHOLE_LISTS = frozenset({"query_params", "json_body"})
REPEATS_BY_INDEX = frozenset({"success_status"})

_PLURALS = {"string": "strings", "integer": "whole numbers", "number": "numbers",
            "boolean": "true or false", "object": "objects", "array": "lists", "null": "null"}


def _whole_number(checker: Any, instance: Any) -> bool:
    # JSON Schema counts 2.0 as an integer; a job's counts have always been refused as floats.
    return isinstance(instance, int) and not isinstance(instance, bool)


def _same(value: Any) -> Any:
    """A hashable stand-in for ``value`` under JSON Schema's equality (1 is 1.0, true is not 1)."""
    if isinstance(value, bool) or value is None:
        return ("literal", value)
    if isinstance(value, int | float):
        return ("number", value)
    if isinstance(value, str):
        return ("string", value)
    if isinstance(value, Mapping):
        return ("object", frozenset((k, _same(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return ("array", tuple(_same(v) for v in value))
    return ("other", id(value))


def _repeats(items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
    """Each item (index, item) equal to one before it, in one pass."""
    seen: set[Any] = set()
    for i, item in enumerate(items):
        key = _same(item)
        if key in seen:
            yield i, item
        seen.add(key)


def _unique_items(validator: Any, unique: bool, instance: Any, schema: Any) -> Iterator[ValidationError]:
    # jsonschema's own uniqueItems compares every pair once the items cannot be sorted (objects,
    # mixed types): a 1 MiB body of them would hold the reactor for minutes.
    if unique and validator.is_type(instance, "array") and next(_repeats(instance), None):
        yield ValidationError("has repeated items")


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str]:
    # ECMA-262's $ ends the text; Python's also matches before a final newline ("job-1\n").
    return re.compile(pattern[:-1] + r"\Z" if pattern.endswith("$") and not pattern.endswith("\\$")
                      else pattern)


def _pattern_check(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _compiled(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


_Validator = validators.extend(
    Draft202012Validator, validators={"uniqueItems": _unique_items, "pattern": _pattern_check},
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _whole_number))


@lru_cache(maxsize=1)
def document() -> dict[str, Any]:
    """The API's OpenAPI document, read once from the package."""
    where = resources.files("restconsumer")
    for part in RESOURCE:
        where = where / part
    loaded: dict[str, Any] = json.loads(where.read_text(encoding="utf-8"))
    return loaded


@dataclass(frozen=True)
class Shape:
    """``JobDefinition`` with its ``$ref`` s written out, and the validator built for it.

    ``objects`` holds the schema of each field that is an object of named fields (``retry``,
    ``basic_auth``...; for a choice such as ``ordering``, a word or ``{by}``, the object).
    """

    schema: dict[str, Any]
    validator: Any
    objects: dict[str, dict[str, Any]]


@lru_cache(maxsize=1)
def shape() -> Shape:
    """The job definition's schema and its validator, built once from :func:`document`."""
    root = document()
    schema = _inline(root["components"]["schemas"][DEFINITION], root)
    _Validator.check_schema(schema)
    objects = {}
    for name, node in schema["properties"].items():
        for choice in (node, *node.get("oneOf", ()), *node.get("anyOf", ())):
            if "properties" in choice:
                objects[name] = choice
                break
    return Shape(schema, _Validator(schema), objects)


#: Keywords that only describe: a ``$ref``'s own may stand beside, and over, its target's.
_ANNOTATIONS = frozenset({"description", "title", "examples", "default", "deprecated"})


def _inline(node: Any, root: Mapping[str, Any], seen: tuple[str, ...] = ()) -> Any:
    """``node`` with every local ``$ref`` replaced by its target.

    A ``$ref``'s siblings (a ``description``) are kept beside the target's keywords. Written
    out, the schema is validated without resolving anything, and the schema of every error
    is a plain node of it.
    """
    if isinstance(node, list):
        return [_inline(item, root, seen) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _inline(value, root, seen) for key, value in node.items() if key != "$ref"}
    ref = node.get("$ref")
    if ref is None:
        return out
    if not isinstance(ref, str) or not ref.startswith("#/") or ref in seen:
        raise ValueError(f"{ref!r}: only local references, and no cycle, can be written out")
    target: Any = root
    for part in ref[2:].split("/"):
        target = target[part.replace("~1", "/").replace("~0", "~")]
    written = _inline(target, root, (*seen, ref))
    clash = (set(out) & set(written)) - _ANNOTATIONS
    if clash:
        raise ValueError(f"{ref!r}: its siblings {sorted(clash)} would change its target")
    return {**written, **out}


@dataclass(frozen=True)
class Report:
    """What the schema finds in a definition.

    ``problems`` are (field path, reason), in the order found; ``unsound`` the field paths
    whose value broke the schema (not those whose key's name did), which the rules between
    fields leave alone.
    """

    problems: list[tuple[str, str]]
    unsound: frozenset[str]


def problems(definition: Mapping[str, Any]) -> Report:
    """Check a normalised definition (keys folded, nulls left out) against ``JobDefinition``."""
    checked = shape()
    found: dict[tuple[str, str], None] = {}
    unsound: set[str] = set()
    for error in checked.validator.iter_errors(definition):
        for field, reason, of_value in _explain(error, checked):
            # Said once: ["GET"] as type breaks both its type and its enum, in the same words.
            found.setdefault((field, reason))
            if of_value:
                unsound.add(field)
    return Report(list(found), frozenset(unsound))


def _explain(error: ValidationError, checked: Shape) -> Iterator[tuple[str, str, bool]]:
    """(field path, reason, whether the value is at fault) for one jsonschema error."""
    keyword = error.validator
    node: Mapping[str, Any] = error.schema
    instance = error.instance
    path = list(error.absolute_path)
    where = field_path(path)
    if path and path[0] in WHOLE_LISTS and len(path) > 1:
        yield path[0], "must be " + _noun(checked.schema["properties"][path[0]]), True
        return
    if keyword in ("oneOf", "anyOf"):
        # jsonschema reports a failed choice at the choice: explain it from the choice whose
        # type the value has (a list of topics by its items), else name the choices.
        chosen = next((i for i, choice in enumerate(node[keyword])
                       if "type" not in choice or _is(checked, instance, choice["type"])), None)
        inner = [e for e in error.context or () if e.relative_schema_path[0] == chosen]
        if chosen is None or not inner:
            yield where, "must be " + _noun(node), True
        for sub in inner:
            yield from _explain(sub, checked)
        return
    if keyword == "required":
        for name in node["required"]:
            if name not in instance:
                yield field_path([*path, name]), "is required", True
        return
    if keyword == "additionalProperties" and node["additionalProperties"] is False:
        # One problem per unknown field, where jsonschema lumps them into one error.
        for name in instance:
            if name not in node.get("properties", {}):
                yield field_path([*path, name]), "unknown field", True
        return
    if len(error.relative_schema_path) > 1 and error.relative_schema_path[-2] == "propertyNames":
        # The key's name broke the rule: the error stands at the object, the name is the instance.
        reason = _reason(keyword, node, instance, error.message)
        yield field_path([*path, instance]), f"the name {reason}", False
        return
    if keyword == "uniqueItems" and path and path[-1] in REPEATS_BY_INDEX:
        for i, item in _repeats(instance):
            yield field_path([*path, i]), f"{_show(item)} is given twice", True
        return
    yield where, _reason(keyword, node, instance, error.message), True


def _reason(keyword: str, node: Mapping[str, Any], instance: Any, fallback: str = "") -> str:
    """An operator's wording of one failed keyword, from the values of its schema node.

    A keyword the job's schema does not use yet falls back to jsonschema's own message.
    """
    value: Any = node.get(keyword)
    if keyword in ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        return "must be " + _noun(node)
    if keyword == "enum":
        return "must be one of " + ", ".join(map(_show_word, value))
    if keyword == "const":
        return f"must be {_show(value)}"
    if keyword == "pattern":
        return f"must match {_pattern(value)}"
    if keyword == "minLength":
        return "must not be empty" if value == 1 else f"must be at least {value} characters long"
    if keyword == "maxLength":
        return f"is longer than {value} characters"
    if keyword == "minItems":
        return "must not be empty" if value == 1 else f"must hold at least {value} items"
    if keyword == "maxItems":
        return f"holds {len(instance)} items; at most {value}"
    if keyword == "maxProperties":
        return f"has {len(instance)} keys; at most {value}"
    if keyword == "minProperties":
        return f"has {len(instance)} keys; at least {value}"
    if keyword == "uniqueItems":
        return f"names {_show(next(_repeats(instance))[1])} twice"
    return fallback or f"breaks the rule {keyword!r}"


def _noun(node: Mapping[str, Any]) -> str:
    """What a value of ``node`` is, as in "must be <noun>"."""
    if "enum" in node:
        return "one of " + ", ".join(map(_show_word, node["enum"]))
    if "const" in node:
        return _show(node["const"])
    for keyword in ("oneOf", "anyOf"):
        if keyword in node:
            return " or ".join(_noun(choice) for choice in node[keyword])
    kinds = node.get("type", [])
    return " or ".join(_noun_of(kind, node) for kind in ([kinds] if isinstance(kinds, str) else kinds)) \
        or "valid"


def _noun_of(kind: str, node: Mapping[str, Any]) -> str:
    if kind == "string":
        if "pattern" in node:
            return f"a string matching {_pattern(node['pattern'])}"
        return "a non-empty string" if node.get("minLength") == 1 else "a string"
    if kind in ("integer", "number"):
        return ("a whole number" if kind == "integer" else "a number") + _range(node)
    if kind == "boolean":
        return "true or false"
    if kind == "object":
        names = list(node.get("properties", ()))
        if names:
            required = node.get("required", ())
            shown = [n if not required or n in required else f"{n}?" for n in names]
            return "an object {" + ", ".join(shown) + "}"
        values = node.get("additionalProperties")
        if isinstance(values, Mapping) and isinstance(values.get("type"), str):
            return f"an object of {_PLURALS[values['type']]}"
        return "an object"
    if kind == "array":
        head = "a non-empty list" if node.get("minItems") == 1 else "a list"
        items = node.get("items")
        if isinstance(items, Mapping) and isinstance(items.get("type"), str):
            return f"{head} of {_PLURALS[items['type']]}"
        return head
    return kind


def _range(node: Mapping[str, Any]) -> str:
    low, high = node.get("minimum"), node.get("maximum")
    if low is not None and high is not None:
        return f" from {low} to {high}"
    bounds = [f"{word} {node[key]}" for key, word in (
        ("minimum", "at least"), ("exclusiveMinimum", "above"),
        ("maximum", "at most"), ("exclusiveMaximum", "below")) if node.get(key) is not None]
    return ", " + " and ".join(bounds) if bounds else ""


def _pattern(pattern: str) -> str:
    return pattern.removeprefix("^").removesuffix("$")


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _show_word(value: Any) -> str:
    return value if isinstance(value, str) else _show(value)


def _is(checked: Shape, instance: Any, kinds: str | Sequence[str]) -> bool:
    return any(checked.validator.is_type(instance, kind)
               for kind in ([kinds] if isinstance(kinds, str) else kinds))


def field_path(parts: Sequence[Any]) -> str:
    """The API's name of a place in a definition: ``retry.max_wait``, ``topic[1]``."""
    out = ""
    for i, part in enumerate(parts):
        out += f"[{part}]" if isinstance(part, int) and not isinstance(part, bool) else (
            f".{part}" if i else str(part))
    return out
