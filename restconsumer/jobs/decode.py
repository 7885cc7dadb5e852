"""Decoding a Kafka message value into records (SPEC §4, §12): Avro container, Confluent
Schema Registry wire format, JSON, or text.

Plain functions, no Twisted. The wire format's schemas come from a :class:`SchemaLookup`
(the process's schema cache, filled on the reactor by :mod:`restconsumer.delivery.registry`).
"""

from __future__ import annotations

import base64
import datetime
import decimal
import io
import json
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import fastavro

__all__ = ["AVRO_MAGIC", "Record", "SchemaLookup", "SchemaNeeded", "UndecodableMessage", "UnknownSchema",
           "WireSchema", "decode", "schema_id", "to_json"]

AVRO_MAGIC = b"Obj\x01"
#: Magic byte 0 and a 4-byte big-endian schema id open a Confluent wire-format value.
WIRE_HEADER = 5


class UndecodableMessage(ValueError):
    """The message is neither an Avro container, nor JSON, nor UTF-8 text."""


@dataclass(slots=True)
class Record:
    """One record of a message: its writer schema (Avro) or None, and the value."""

    schema: Any
    msg: Any


@dataclass(frozen=True)
class WireSchema:
    """A schema of the Schema Registry, ready to decode with."""

    #: ``AVRO`` or ``JSON`` (the registry's ``schemaType``).
    kind: str
    #: The writer schema as JSON, as registered: what ``$.schema`` shows.
    writer: Any
    #: fastavro's parsed form of an Avro schema (None for JSON).
    parsed: Any = None


@dataclass(frozen=True)
class UnknownSchema:
    """A schema id that the registry does not know (or that cannot be used), and why."""

    reason: str


class SchemaLookup(Protocol):
    """What decoding asks of the schema cache; safe to call from any thread."""

    def get(self, schema_id: int) -> WireSchema | UnknownSchema | None:
        """The schema of ``schema_id``, that it is unknown, or None when not fetched yet."""


class SchemaNeeded(Exception):
    """The value is in the wire format, and its schema has not been fetched yet."""

    def __init__(self, schema_id: int) -> None:
        super().__init__(f"schema id {schema_id} is not fetched yet")
        self.schema_id = schema_id


#: The largest schema id a registry gives (a Java int).
MAX_SCHEMA_ID = 2**31 - 1


def schema_id(value: bytes | None) -> int | None:
    """The schema id of a Confluent wire-format value (magic byte 0, 4-byte id), else None."""
    if value is None or len(value) < WIRE_HEADER or value[0] != 0:
        return None
    return int.from_bytes(value[1:WIRE_HEADER], "big")


def decode(value: bytes | None, schemas: SchemaLookup | None = None) -> list[Record]:
    """The records a message value holds; raises :class:`UndecodableMessage`.

    With ``schemas`` (a Schema Registry is configured), a wire-format value is one record
    with its writer schema, or raises :class:`SchemaNeeded` when its schema is not fetched
    yet. An Avro Object Container File gives one record per Avro record, with the file's
    writer schema; otherwise UTF-8 JSON is one record; otherwise valid UTF-8 text is
    one record whose value is the string itself.
    """
    if value is None:
        raise UndecodableMessage("the message has no value (a tombstone)")
    if schemas is not None and (ident := schema_id(value)) is not None:
        return [_wire(value, ident, schemas.get(ident))]
    if value.startswith(AVRO_MAGIC):
        try:
            reader = fastavro.reader(io.BytesIO(value))
            schema = reader.writer_schema
            return [Record(schema, record) for record in reader]
        except Exception as e:  # fastavro raises many kinds for corrupt data
            raise UndecodableMessage(f"corrupt Avro container: {type(e).__name__}: {e}") from e
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as e:
        if schemas is None and (ident := schema_id(value)) is not None:
            raise UndecodableMessage(
                f"neither Avro, JSON nor UTF-8 text: it looks like Confluent Schema Registry "
                f"framing (magic byte 0, schema id {ident}), but --schema-registry is not set") from e
        raise UndecodableMessage(f"neither Avro, JSON nor UTF-8 text: {e}") from e
    try:
        return [Record(None, json.loads(text))]
    except ValueError:
        return [Record(None, text)]


def _wire(value: bytes, ident: int, schema: WireSchema | UnknownSchema | None) -> Record:
    if ident > MAX_SCHEMA_ID:
        # Registry ids are positive 32-bit ints: no registry can know it (asking would
        # only get an error that looks like an outage).
        raise UndecodableMessage(f"schema id {ident} is not a schema registry id (over 2^31 - 1)")
    if schema is None:
        raise SchemaNeeded(ident)
    if isinstance(schema, UnknownSchema):
        raise UndecodableMessage(f"schema id {ident} is unknown to the schema registry: {schema.reason}")
    payload = value[WIRE_HEADER:]
    if schema.kind == "JSON":
        try:
            return Record(schema.writer, json.loads(payload.decode("utf-8")))
        except ValueError as e:
            raise UndecodableMessage(f"corrupt JSON payload for schema id {ident}: {e}") from e
    data = io.BytesIO(payload)
    try:
        msg = fastavro.schemaless_reader(data, schema.parsed, None)
    except Exception as e:  # fastavro raises many kinds for corrupt data
        raise UndecodableMessage(f"corrupt Avro payload for schema id {ident}: "
                                 f"{type(e).__name__}: {e}") from e
    left = len(payload) - data.tell()
    if left:
        # One datum per message: bytes beyond it mean the payload was not written with this schema.
        raise UndecodableMessage(f"corrupt Avro payload for schema id {ident}: {left} bytes left "
                                 f"after the record")
    return Record(schema.writer, msg)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def to_json(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON; Avro's bytes, dates, decimals and UUIDs as strings.

    A string with a lone surrogate (legal in JSON text, not in UTF-8) is written as its
    ``\\uXXXX`` escape, so the body is still valid JSON.
    """
    text = "".join(_compact(value, 0)) if _compact is not None else _COMPACT.encode(value)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _ASCII.encode(value).encode("ascii")


# Made once: json.dumps with arguments builds a new encoder on every call.
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=_jsonable)
_ASCII = json.JSONEncoder(separators=(",", ":"), default=_jsonable)
# _COMPACT's own C encoder, made once too: JSONEncoder.encode makes it anew on every call,
# most of the cost for the small bodies of most records. No check for circular values:
# decoded JSON and Avro cannot hold one.
_make_encoder = getattr(json.encoder, "c_make_encoder", None)
_compact = (_make_encoder(None, _jsonable, json.encoder.encode_basestring, None, ":", ",",
                          False, False, True) if _make_encoder is not None else None)
