"""A fetched message made ready for delivery: decoded, mapped, its requests built, its size.

Plain data and functions, no Twisted: :func:`prepare` runs on the job's Kafka thread, a
batch at a time, so that the reactor only sends requests and answers the API.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from restconsumer.base.types import Outgoing
from restconsumer.jobs.decode import SchemaLookup, SchemaNeeded, UndecodableMessage, decode
from restconsumer.jobs.mapping import RequestBuilder, TemplateError

__all__ = ["Incoming", "OrderKey", "Prepared", "RecordWork", "order_key", "prepare"]

#: What one held object costs besides its bytes (Python objects, dicts, references).
_OVERHEAD = 600


@dataclass(slots=True)
class Incoming:
    """One Kafka message, as read."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    timestamp: int | None

    @property
    def tp(self) -> tuple[str, int]:
        """Its topic and partition."""
        return self.topic, self.partition

    def meta(self) -> dict[str, Any]:
        """The ``meta`` part of the JSONPath document (SPEC §4, §12)."""
        key = self.key
        text_key = None
        if key is not None:
            try:
                text_key = key.decode("utf-8")
            except UnicodeDecodeError:
                text_key = None
        headers: dict[str, str | None] = {}
        for name, value in self.headers:
            if value is None:
                headers[name] = None
                continue
            try:
                headers[name] = value.decode("utf-8")
            except UnicodeDecodeError:
                continue
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset,
                "key": text_key, "timestamp": self.timestamp, "headers": headers}

    def size(self) -> int:
        """Bytes it holds."""
        return (len(self.value or b"") + len(self.key or b"")
                + sum(len(k) + len(v or b"") for k, v in self.headers) + _OVERHEAD)


@dataclass(slots=True)
class RecordWork:
    """One record of a message: its request, or why it cannot have one."""

    index: int
    request: Outgoing | None
    error: str | None = None
    entity: Any = None
    #: Its order group beyond the partition (SPEC §11), or None.
    order: Hashable | None = None
    #: Left out by the job's filter: not sent, counted ``filtered``, committed.
    filtered: bool = False

    def size(self) -> int:
        """Bytes it holds."""
        request = self.request
        if request is None:
            return _OVERHEAD
        return len(request.url) + len(request.body or b"") + _OVERHEAD


@dataclass(slots=True)
class Prepared:
    """A message and its records, ready for delivery."""

    incoming: Incoming
    records: list[RecordWork] = field(default_factory=list)
    #: Why the whole message is bad (undecodable), if it is.
    error: str | None = None
    size: int = 0
    #: The Schema Registry id whose schema it waits for (no records yet), if it does.
    schema_id: int | None = None


OrderKey = Callable[[Incoming, dict[str, Any]], Hashable | None]


def order_key(ordering: Any) -> OrderKey | None:
    """How a job's ``ordering`` (SPEC §11) finds a record's order group beyond its partition:
    its Kafka key, or a datamap value; None for ``partition`` and ``none`` (no such group)."""
    if ordering == "key":
        return lambda incoming, values: incoming.key
    if isinstance(ordering, dict) and "by" in ordering:
        name = ordering["by"]
        return lambda incoming, values: _hashable(values.get(name))
    return None


def _hashable(value: Any) -> Hashable | None:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def prepare(builder: RequestBuilder, incoming: Incoming, order: OrderKey | None = None,
            schemas: SchemaLookup | None = None) -> Prepared:
    """Decode ``incoming`` and build a request per record; never raises.

    ``order(incoming, values)`` gives a record's order group beyond its partition. With
    ``schemas`` (a Schema Registry is configured), a message whose schema is not fetched yet
    comes back with no records and its ``schema_id``: prepared again once it is.
    """
    prepared = Prepared(incoming)
    try:
        records = decode(incoming.value, schemas)
    except SchemaNeeded as e:
        prepared.schema_id = e.schema_id
        prepared.size = incoming.size()
        return prepared
    except UndecodableMessage as e:
        prepared.error = str(e)
        prepared.size = incoming.size()
        return prepared
    except Exception as e:  # a bug must not lose the message: it is dead-lettered
        prepared.error = f"internal error while decoding: {type(e).__name__}: {e}"
        prepared.size = incoming.size()
        return prepared
    meta = incoming.meta() if builder.needs_meta else _NO_META
    size = incoming.size()
    for index, record in enumerate(records):
        work = RecordWork(index, None)
        try:
            document = builder.document(record.schema, record.msg, meta)
            if builder.filter is not None:
                try:
                    keep = builder.matches(document)
                except Exception as e:
                    work.error = f"the filter failed on this record: {type(e).__name__}: {e}"
                    work.entity = _entity(record.msg)
                    size += work.size()
                    prepared.records.append(work)
                    continue
                if not keep:
                    work.filtered = True
                    size += work.size()
                    prepared.records.append(work)
                    continue
            values = builder.extract(document)
            work.entity = values["id"] if "id" in values else _entity(record.msg)
            ident = (f"{incoming.topic}:{incoming.partition}:{incoming.offset}:{index}"
                     if builder.needs_ident else None)
            work.request = builder.build(values, ident)
            if order is not None:
                work.order = order(incoming, values)
        except TemplateError as e:
            work.error = str(e)
            if work.entity is None:
                work.entity = _entity(record.msg)
        except Exception as e:
            work.error = f"internal error while mapping: {type(e).__name__}: {e}"
        size += work.size()
        prepared.records.append(work)
    prepared.size = size
    return prepared


#: The ``meta`` of a job that cannot read it (``RequestBuilder.needs_meta``); never changed.
_NO_META: dict[str, Any] = {}


def _entity(msg: Any) -> Any:
    value = msg.get("id") if isinstance(msg, dict) else None
    return value if isinstance(value, (str, int, float)) else None
