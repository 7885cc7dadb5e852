"""Values in the Schema Registry wire format as Confluent's own serializers write them.

Tests of our decoding (restconsumer.jobs.decode) take their frames from confluent-kafka's
``AvroSerializer`` and ``JSONSerializer``, not from a second reading of the format beside
the one under test. A serializer set to use its subject's latest version asks its registry
client for that version (and for the schemas a reference names); :class:`ChosenSchema`
answers those two questions with the schema and the id the test chose, so no registry is
needed and any id can be written.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from confluent_kafka.schema_registry import (
    RegisteredSchema,
    Schema,
    SchemaReference,
    topic_subject_name_strategy,
)
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

__all__ = ["Named", "avro_frame", "json_frame"]

#: A schema another one refers to: (full name, subject, version, schema).
Named = tuple[str, str, int, dict[str, Any]]

_TOPIC = "confluent-framed"
_CONF = {"auto.register.schemas": False, "use.latest.version": True,
         "subject.name.strategy": topic_subject_name_strategy}


class ChosenSchema:
    """The part of ``SchemaRegistryClient`` a serializer using the latest version calls:
    the subject's latest version is ``schema`` under ``schema_id``."""

    def __init__(self, schema_id: int, schema: Schema, named: Sequence[Named]) -> None:
        self.latest = RegisteredSchema(schema_id=schema_id, guid=None, schema=schema,
                                       subject=f"{_TOPIC}-value", version=1)
        self.named = {(subject, version): one for _, subject, version, one in named}

    def get_latest_version(self, subject_name: str, fmt: str | None = None) -> RegisteredSchema:
        return self.latest

    def get_version(self, subject_name: str, version: Any = "latest", deleted: bool = False,
                    fmt: str | None = None) -> RegisteredSchema:
        schema = Schema(json.dumps(self.named[(subject_name, version)]), "AVRO")
        return RegisteredSchema(schema_id=None, guid=None, schema=schema, subject=subject_name,
                                version=version)


def _context() -> SerializationContext:
    return SerializationContext(_TOPIC, MessageField.VALUE)


def avro_frame(schema_id: int, schema: dict[str, Any], record: dict[str, Any],
               named: Sequence[Named] = ()) -> bytes:
    """``record`` as confluent-kafka's AvroSerializer frames it under ``schema_id``;
    ``named`` are the schemas ``schema`` refers to."""
    references = [SchemaReference(name, subject, version) for name, subject, version, _ in named]
    wrapped = Schema(json.dumps(schema), "AVRO", references)
    serializer = AvroSerializer(ChosenSchema(schema_id, wrapped, named), wrapped, conf=_CONF)  # type: ignore[arg-type]
    value = serializer(record, _context())
    assert value is not None
    return value


def json_frame(schema_id: int, schema: dict[str, Any], document: Any) -> bytes:
    """``document`` as confluent-kafka's JSONSerializer frames it under ``schema_id``."""
    wrapped = Schema(json.dumps(schema), "JSON")
    serializer = JSONSerializer(wrapped, ChosenSchema(schema_id, wrapped, ()), conf=_CONF)  # type: ignore[arg-type]
    value = serializer(document, _context())
    assert value is not None
    return value
