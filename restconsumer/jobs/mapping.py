"""From a decoded record to the job's request (SPEC §4): datamap, URL template, body, auth.

Plain functions and data, no Twisted. A :class:`RequestBuilder` is compiled once per job;
building a request is then a few dict look-ups and string joins.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from jsonpath_ng import JSONPath
from jsonpath_ng.jsonpath import Child, Fields, Index, Root

from restconsumer.base.types import USER_AGENT, Outgoing
from restconsumer.base.urls import DEFAULT_PORTS, origin
from restconsumer.jobs.decode import to_json
from restconsumer.jobs.model import PLACEHOLDER, Job, is_secret_header, parse_jsonpath

__all__ = ["USER_AGENT", "Outgoing", "RequestBuilder", "TemplateError", "compile_getter", "encode_value"]

_MISSING = object()
_URL_SAFE = ":/?#[]@!$&'()*+,;=%~"
#: What a header value taken from a message may not hold: it could end the header, or
#: start another one (request smuggling), or be read differently by each server.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class TemplateError(ValueError):
    """A record lacks a value the URL template needs."""


def _indices(node: Index) -> tuple[int, ...]:
    # jsonpath-ng 1.8 keeps a tuple in ``indices``; older releases one ``index``.
    indices = getattr(node, "indices", None)
    return tuple(indices) if indices is not None else (node.index,)


def plain_steps(path: JSONPath) -> tuple[str | int, ...] | None:
    """The field names and indexes of a plain chain from the root (``$.msg.household.id``,
    ``$.msg.items[0]``), or None for any other path."""
    steps: list[str | int] = []
    node = path
    while isinstance(node, Child):
        right = node.right
        if isinstance(right, Fields) and len(right.fields) == 1 and right.fields[0] != "*":
            steps.append(right.fields[0])
        elif isinstance(right, Index) and len(indices := _indices(right)) == 1:
            steps.append(indices[0])
        else:
            break
        node = node.left
    if not isinstance(node, Root):
        return None
    return tuple(reversed(steps))


def compile_getter(path: JSONPath) -> Callable[[Any], list[Any]]:
    """A function giving every value ``path`` matches in a document.

    Plain chains of field names and indexes from the root (``$.msg.household.id``,
    ``$.msg.items[0]``) — nearly every datamap — are walked with dict and list look-ups;
    anything else goes through jsonpath-ng.
    """
    steps = plain_steps(path)
    if steps is None:
        return lambda document: [match.value for match in path.find(document)]
    keys = steps

    def walk(document: Any) -> list[Any]:
        value = document
        for key in keys:
            if isinstance(key, str):
                if not isinstance(value, dict):
                    return []
                value = value.get(key, _MISSING)
            else:
                if not isinstance(value, (list, str)) or not -len(value) <= key < len(value):
                    return []
                value = value[key]
            if value is _MISSING:
                return []
        return [value]

    return walk


def encode_value(value: Any) -> str:
    """A datamap value as one percent-encoded URL component that nothing can escape from."""
    text = value if isinstance(value, str) else to_json(value).decode("utf-8")
    if text in (".", ".."):
        # A bare dot segment would move up the path once the server normalises it.
        return text.replace(".", "%2E")
    try:
        return quote(text, safe="")
    except UnicodeEncodeError as e:
        raise TemplateError(f"a value is not valid Unicode (lone surrogate): {e}") from e


def _host_header(template: str) -> bytes:
    """The ``Host`` header of a URL template (its authority never holds a placeholder)."""
    scheme, host, port = origin(PLACEHOLDER.sub("x", template))
    if ":" in host:
        host = f"[{host}]"
    value = host if port == DEFAULT_PORTS.get(scheme) else f"{host}:{port}"
    return value.encode("idna") if not value.isascii() else value.encode("ascii")


class RequestBuilder:
    """The request-making half of a job, compiled once from its definition."""

    def __init__(self, job: Job) -> None:
        d = job.definition
        self.job = job
        self.method = d["type"].encode("ascii")
        self._getters = {key: compile_getter(path) for key, path in job.paths.items()}
        self._constant = d.get("constant", {})
        #: The job's ``filter`` (SPEC §12), compiled (validation compiled it: cached), or None.
        self.filter: JSONPath | None = parse_jsonpath(d["filter"]) if "filter" in d else None
        chains = [plain_steps(path) for path in job.paths.values()]
        #: Whether anything of the job can read a record's ``$.meta`` (made per message,
        #: so left out when no path can reach it): a filter, a path that is not a plain
        #: chain of names, ``$`` itself, or one under ``$.meta``.
        self.needs_meta = self.filter is not None or any(
            steps is None or not steps or steps[0] == "meta" for steps in chains)
        parts = PLACEHOLDER.split(d["url"])
        # Even items are literal text, odd ones datamap keys.
        self._url_parts: list[str] = [
            quote(part, safe=_URL_SAFE) if i % 2 == 0 else part for i, part in enumerate(parts)
        ]
        self._has_query = "?" in PLACEHOLDER.sub("", d["url"])
        self._query_keys: list[str] = d.get("query_params", [])
        self._body_keys: list[str] | None = d.get("json_body")
        headers: dict[bytes, list[bytes]] = {b"Host": [_host_header(d["url"])],
                                             b"User-Agent": [USER_AGENT]}
        #: Headers whose value takes datamap values: (name, parts), parts alternating
        #: literal text and datamap keys. A credential header is never a template.
        self._header_templates: list[tuple[bytes, list[str]]] = []
        for k, v in d.get("headers", {}).items():
            if PLACEHOLDER.search(v) and not is_secret_header(k):
                self._header_templates.append((k.encode("latin-1"), PLACEHOLDER.split(v)))
            else:
                headers[k.encode("latin-1")] = [v.encode("latin-1")]
        self._job_id: str = d["id"]
        #: Whether each request carries an ``Idempotency-Key`` made by :meth:`build`
        #: (a batch's is made where the batch is).
        self.idempotency = bool(d.get("idempotency_key")) and "batch" not in d
        #: Whether :meth:`build` needs the record's place (``ident``): for the idempotency
        #: key, or the ``webhook-id`` of a signed request.
        self.needs_ident = self.idempotency or ("signing" in d and "batch" not in d)
        if "basic_auth" in d:
            pair = f"{d['basic_auth']['user']}:{d['basic_auth']['pw']}".encode()
            headers[b"Authorization"] = [b"Basic " + base64.b64encode(pair)]
        elif "token" in d:
            headers[b"Authorization"] = [f"{d.get('token_type', 'Bearer')} {d['token']}".encode()]
        if self._body_keys is not None:
            headers[b"Content-Type"] = [b"application/json"]
        #: The headers every request of the job shares (Host included), never changed.
        self.headers = headers

    def document(self, schema: Any, msg: Any, meta: dict[str, Any]) -> dict[str, Any]:
        """The JSONPath document of one record."""
        return {"schema": schema, "msg": msg, "constant": self._constant, "meta": meta}

    def matches(self, document: dict[str, Any]) -> bool:
        """Whether the job's filter keeps the record (with no filter, every record is kept).

        The document is the one element of a list, so that a filter is written
        ``$[?(...)]``; an error in it (a type jsonpath-ng cannot compare) raises.
        """
        return self.filter is None or bool(self.filter.find([document]))

    def extract(self, document: dict[str, Any]) -> dict[str, Any]:
        """The datamap's values: no match leaves the key out, several make a list."""
        values: dict[str, Any] = {}
        for key, getter in self._getters.items():
            found = getter(document)
            if found:
                values[key] = found[0] if len(found) == 1 else found
        return values

    def build(self, values: dict[str, Any], ident: str | None = None) -> Outgoing:
        """The request for one record's datamap values; :class:`TemplateError` if one is missing.

        ``ident`` (``topic:partition:offset:record``) makes the ``Idempotency-Key`` of a
        job with ``idempotency_key``.
        """
        parts = self._url_parts
        if len(parts) == 1:
            url = parts[0]  # no placeholder (a batched job's URL never has one)
        else:
            pieces = []
            for i, part in enumerate(parts):
                if i % 2 == 0:
                    pieces.append(part)
                elif part in values:
                    pieces.append(encode_value(values[part]))
                else:
                    raise TemplateError(f"the URL needs '{part}', which the datamap did not find")
            url = "".join(pieces)
        query = []
        for query_key in self._query_keys:
            if query_key in values:
                value = values[query_key]
                for item in value if isinstance(value, list) else [value]:
                    query.append(f"{quote(query_key, safe='')}={encode_value(item)}")
        if query:
            url += ("&" if self._has_query else "?") + "&".join(query)
        body = None
        if self._body_keys is not None:
            try:
                body = to_json({k: values[k] for k in self._body_keys if k in values})
            except (TypeError, ValueError) as e:
                raise TemplateError(f"the JSON body cannot be made: {e}") from e
        headers = self.headers
        key: str | None = f"{self._job_id}:{ident}" if ident is not None else None
        if self._header_templates or (key is not None and self.idempotency):
            headers = dict(headers)
            for name, parts in self._header_templates:
                headers[name] = [_header_value(name, parts, values)]
            if key is not None and self.idempotency:
                headers[b"Idempotency-Key"] = [key.encode()]
            return Outgoing(self.method, url.encode("ascii"), headers, body, values.get("id"), True,
                            key)
        return Outgoing(self.method, url.encode("ascii"), headers, body, values.get("id"), False, key)


def _header_value(name: bytes, parts: list[str], values: dict[str, Any]) -> bytes:
    """A templated header's value; :class:`TemplateError` if a key is missing or its value
    holds a control character (CR, LF, NUL, tab...): nothing from a message can add a header."""
    pieces = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            pieces.append(part)
            continue
        if part not in values:
            raise TemplateError(f"the header {name.decode('latin-1')} needs '{part}', "
                                f"which the datamap did not find")
        value = values[part]
        text = value if isinstance(value, str) else to_json(value).decode("utf-8")
        if _CONTROL.search(text):
            raise TemplateError(f"the value of '{part}' for the header {name.decode('latin-1')} "
                                f"holds a control character (CR, LF...): not sent")
        pieces.append(text)
    try:
        return "".join(pieces).encode("utf-8")
    except UnicodeEncodeError as e:
        raise TemplateError(f"a value is not valid Unicode (lone surrogate): {e}") from e
