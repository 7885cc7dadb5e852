"""The dry run (SPEC §9): the requests a job would send for sample messages.

Plain functions, no Twisted, built on the very code delivery uses (:func:`restconsumer.jobs.work.prepare`
and the job's :class:`~restconsumer.jobs.mapping.RequestBuilder`): nothing is sent, stored or
produced. Secrets are shown as ``***``. Schema Registry wire-format messages are decoded with
the schemas the caller fetched first (:func:`schema_ids` says which).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from restconsumer.delivery.compose import RedactedSigner, compose
from restconsumer.jobs.decode import SchemaLookup, schema_id
from restconsumer.jobs.mapping import RequestBuilder
from restconsumer.jobs.model import REDACTED, Job, is_secret_header
from restconsumer.jobs.work import Incoming, Prepared, RecordWork, order_key, prepare

__all__ = ["MAX_MESSAGES", "BadEnvelope", "envelope", "envelopes", "preview", "schema_ids"]

MAX_MESSAGES = 1000


class BadEnvelope(ValueError):
    """Sample messages that cannot be read; ``problems`` lists each (field path, reason)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{field}: {reason}" for field, reason in problems))
        self.problems = problems


def envelope(raw: Any, index: int, job: Job, now_ms: int,
             problems: list[tuple[str, str]]) -> Incoming | None:
    """One sample message (``{"value": any JSON}`` or ``{"base64": "…"}``, plus optional
    ``key``, ``topic``, ``partition``, ``offset``, ``timestamp``, ``headers``)."""
    where = f"messages[{index}]"
    if not isinstance(raw, Mapping):
        problems.append((where, "must be an object with value or base64"))
        return None
    if ("value" in raw) == ("base64" in raw):
        problems.append((where, "needs exactly one of value (any JSON) or base64 (raw bytes)"))
        return None
    value: bytes | None
    if "base64" in raw:
        try:
            value = base64.b64decode(str(raw["base64"]), validate=True)
        except (binascii.Error, ValueError):
            problems.append((f"{where}.base64", "is not valid base64"))
            return None
    else:
        value = json.dumps(raw["value"], ensure_ascii=False).encode("utf-8")
    key = raw.get("key")
    if key is not None and not isinstance(key, str):
        problems.append((f"{where}.key", "must be text"))
    topic = raw.get("topic", job.topics[0])
    if not isinstance(topic, str) or not topic:
        problems.append((f"{where}.topic", "must be a topic name"))
    numbers = {}
    for name, default in (("partition", 0), ("offset", index), ("timestamp", now_ms)):
        number = raw.get(name, default)
        if not isinstance(number, int) or isinstance(number, bool) or number < 0:
            problems.append((f"{where}.{name}", "must be a whole number, 0 or more"))
        numbers[name] = number
    headers = raw.get("headers", {})
    if not isinstance(headers, Mapping) or not all(isinstance(v, str) for v in headers.values()):
        problems.append((f"{where}.headers", "must be an object of name: text"))
        headers = {}
    unknown = set(raw) - {"value", "base64", "key", "topic", "partition", "offset", "timestamp",
                          "headers"}
    if unknown:
        problems.append((where, f"unknown fields: {', '.join(sorted(unknown))}"))
    return Incoming(str(topic), numbers["partition"], numbers["offset"],
                    key.encode("utf-8") if isinstance(key, str) else None, value,
                    [(str(k), v.encode("utf-8")) for k, v in headers.items()], numbers["timestamp"])


def envelopes(job: Job, messages: Any, now_ms: int) -> list[Incoming]:
    """The sample messages of a preview; raises :class:`BadEnvelope` listing every problem."""
    if not isinstance(messages, list) or not messages:
        raise BadEnvelope([("messages", "must be a non-empty list of message envelopes")])
    if len(messages) > MAX_MESSAGES:
        raise BadEnvelope([("messages", f"at most {MAX_MESSAGES} messages in one preview")])
    problems: list[tuple[str, str]] = []
    incoming = [envelope(raw, i, job, now_ms, problems) for i, raw in enumerate(messages)]
    if problems:
        raise BadEnvelope(problems)
    return [one for one in incoming if one is not None]


def schema_ids(incoming: list[Incoming]) -> set[int]:
    """The Schema Registry ids of the wire-format messages among ``incoming``."""
    return {i for one in incoming if (i := schema_id(one.value)) is not None}


def preview(job: Job, messages: Any, now_ms: int, schemas: SchemaLookup | None = None,
            unavailable: Mapping[int, str] | None = None) -> list[dict[str, Any]]:
    """Per record of each sample message: the request it would send, the reason it cannot,
    or that a filter leaves it out. Raises :class:`BadEnvelope` listing every problem.

    ``schemas``: the Schema Registry's cache, when one is configured; ``unavailable``: why
    the schemas of these ids could not be fetched (the registry is down).
    """
    incoming = envelopes(job, messages, now_ms)
    builder = RequestBuilder(job)
    order = order_key(job.definition.get("ordering", "partition"))
    results: list[dict[str, Any]] = []
    for index, one in enumerate(incoming):
        prepared = prepare(builder, one, order, schemas)
        results.extend(_results(index, prepared, builder.idempotency, "oauth2" in job.definition,
                                unavailable or {}, "signing" in job.definition, now_ms / 1000))
    return results


def _results(index: int, prepared: Prepared, idempotency: bool = False,
             oauth2: bool = False, unavailable: Mapping[int, str] | None = None,
             signing: bool = False, now: float = 0.0) -> list[dict[str, Any]]:
    if prepared.schema_id is not None:
        reason = (unavailable or {}).get(prepared.schema_id, f"schema id {prepared.schema_id} not fetched")
        return [{"message": index, "record": 0, "error": f"schema registry unavailable: {reason}"}]
    if prepared.error is not None:
        return [{"message": index, "record": 0, "error": prepared.error}]
    return [_result(index, record, idempotency, oauth2, signing, now) for record in prepared.records]


def _result(index: int, record: RecordWork, idempotency: bool = False,
            oauth2: bool = False, signing: bool = False, now: float = 0.0) -> dict[str, Any]:
    base: dict[str, Any] = {"message": index, "record": record.index}
    if record.filtered:
        return {**base, "filtered": True}
    if record.error is not None or record.request is None:
        return {**base, "error": record.error or "no request"}
    # What delivery sends, composed by the same code: the token and signature as ***.
    request = compose(record.request, now, REDACTED if oauth2 else None,
                      RedactedSigner() if signing else None)
    headers = {}
    for name, values in request.headers.items():
        text = name.decode("latin-1")
        value = _text(values[0]) if values else ""
        if idempotency and text == "Idempotency-Key":
            headers[text] = value  # ours, made of the record's place: no secret
        elif text.lower() == "authorization" and " " in value:
            # The scheme is not secret, and says which auth the job sends.
            headers[text] = f"{value.split(' ', 1)[0]} {REDACTED}"
        else:
            headers[text] = REDACTED if is_secret_header(text) else value
    body = None
    if request.body is not None:
        body = request.body.decode("utf-8", "replace")
    return {**base, "request": {"method": request.method.decode("ascii"),
                                "url": request.url.decode("ascii"), "headers": headers, "body": body}}


def _text(value: bytes) -> str:
    # Templated header values are sent as UTF-8; static ones are Latin-1.
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")
