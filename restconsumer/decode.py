"""Decoding a Kafka message value into records (SPEC §4): Avro container, JSON, or text.

Plain functions, no Twisted.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import io
import json
import uuid
from dataclasses import dataclass
from typing import Any

import fastavro

__all__ = ["AVRO_MAGIC", "Record", "UndecodableMessage", "decode", "to_json"]

AVRO_MAGIC = b"Obj\x01"


class UndecodableMessage(ValueError):
    """The message is neither an Avro container, nor JSON, nor UTF-8 text."""


@dataclass(frozen=True)
class Record:
    """One record of a message: its writer schema (Avro) or None, and the value."""

    schema: Any
    msg: Any


def decode(value: bytes | None) -> list[Record]:
    """The records a message value holds; raises :class:`UndecodableMessage`.

    An Avro Object Container File gives one record per Avro record, with the file's
    writer schema; otherwise UTF-8 JSON is one record; otherwise valid UTF-8 text is
    one record whose value is the string itself.
    """
    if value is None:
        raise UndecodableMessage("the message has no value (a tombstone)")
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
        raise UndecodableMessage(f"neither Avro, JSON nor UTF-8 text: {e}") from e
    try:
        return [Record(None, json.loads(text))]
    except ValueError:
        return [Record(None, text)]


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
    text = _COMPACT.encode(value)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _ASCII.encode(value).encode("ascii")


# Made once: json.dumps with arguments builds a new encoder on every call.
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=_jsonable)
_ASCII = json.JSONEncoder(separators=(",", ":"), default=_jsonable)
