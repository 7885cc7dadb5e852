"""Unit tests of restconsumer.jobs.decode: Avro Object Container Files, JSON, text and bad messages (SPEC §4).

Avro containers are written here with fastavro, as Aether does; nothing touches Kafka.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import io
import json
import uuid
from typing import Any

import fastavro
import pytest

from restconsumer.jobs.decode import AVRO_MAGIC, Record, UndecodableMessage, decode, to_json

PERSON = {
    "type": "record",
    "name": "Person",
    "namespace": "org.ehealth.aether",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "age", "type": ["null", "int"], "default": None},
        {"name": "nickname", "type": ["null", "string"], "default": None},
        {
            "name": "household",
            "type": {
                "type": "record",
                "name": "Household",
                "fields": [
                    {"name": "id", "type": "string"},
                    {"name": "size", "type": "int"},
                    {
                        "name": "location",
                        "type": [
                            "null",
                            {
                                "type": "record",
                                "name": "Location",
                                "fields": [
                                    {"name": "lat", "type": "double"},
                                    {"name": "lng", "type": "double"},
                                ],
                            },
                        ],
                        "default": None,
                    },
                ],
            },
        },
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {
            "name": "visits",
            "type": {
                "type": "array",
                "items": {
                    "type": "record",
                    "name": "Visit",
                    "fields": [
                        {"name": "day", "type": "int"},
                        {"name": "note", "type": ["null", "string"], "default": None},
                    ],
                },
            },
        },
        {"name": "scores", "type": {"type": "map", "values": "long"}},
    ],
}

LOGICAL = {
    "type": "record",
    "name": "Logical",
    "fields": [
        {"name": "raw", "type": "bytes"},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "clock", "type": {"type": "int", "logicalType": "time-millis"}},
        {"name": "amount",
         "type": {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}},
        {"name": "ref", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "label", "type": "string"},
    ],
}


def person(i: int) -> dict[str, Any]:
    """The ``i``-th Person record, with its optional parts present or absent by turns."""
    return {
        "id": f"person-{i}",
        "age": None if i % 3 == 0 else 20 + i,
        "nickname": None if i % 2 else f"Nick ñ {i}",
        "household": {
            "id": f"hh-{i // 2}",
            "size": i % 7,
            "location": None if i % 4 == 1 else {"lat": 1.5 + i, "lng": -0.25 * i},
        },
        "tags": [f"t{j}" for j in range(i % 4)],
        "visits": [{"day": d, "note": None if d % 2 else f"note {d}"} for d in range(i % 3)],
        "scores": {f"s{j}": j * i for j in range(i % 3)},
    }


def container(schema: dict[str, Any], records: list[dict[str, Any]], codec: str = "deflate") -> bytes:
    """An Avro Object Container File holding ``records``."""
    buffer = io.BytesIO()
    fastavro.writer(buffer, fastavro.parse_schema(schema), records, codec=codec)
    return buffer.getvalue()


def writer_schema_of(data: bytes) -> Any:
    """The writer schema fastavro itself reads from a container's header."""
    return fastavro.reader(io.BytesIO(data)).writer_schema


# -- Avro ------------------------------------------------------------------------------------


def test_deflate_container_gives_every_record_in_order_with_the_writer_schema() -> None:
    records = [person(i) for i in range(250)]
    data = container(PERSON, records, codec="deflate")
    assert data.startswith(AVRO_MAGIC)

    decoded = decode(data)

    assert len(decoded) == 250
    assert all(isinstance(r, Record) for r in decoded)
    assert [r.msg for r in decoded] == records
    schema = decoded[0].schema
    assert schema == writer_schema_of(data)
    assert all(r.schema == schema for r in decoded)


def test_writer_schema_describes_the_nested_records() -> None:
    data = container(PERSON, [person(1)])
    schema = decode(data)[0].schema
    assert schema["type"] == "record"
    assert schema["name"].endswith("Person")
    assert [f["name"] for f in schema["fields"]] == [
        "id", "age", "nickname", "household", "tags", "visits", "scores"]
    household = next(f for f in schema["fields"] if f["name"] == "household")["type"]
    assert household["type"] == "record"
    assert household["name"].endswith("Household")
    age = next(f for f in schema["fields"] if f["name"] == "age")["type"]
    assert age == ["null", "int"]


def test_nested_records_nullable_unions_and_arrays_come_back_as_plain_data() -> None:
    records = [person(i) for i in range(8)]
    decoded = decode(container(PERSON, records))
    zero, one, two = decoded[0].msg, decoded[1].msg, decoded[2].msg
    assert zero["age"] is None
    assert one["age"] == 21
    assert zero["nickname"] == "Nick ñ 0"
    assert one["nickname"] is None
    assert one["household"]["location"] is None
    assert zero["household"]["location"] == {"lat": 1.5, "lng": -0.0}
    assert two["household"] == {"id": "hh-1", "size": 2, "location": {"lat": 3.5, "lng": -0.5}}
    assert zero["tags"] == []
    assert decoded[3].msg["tags"] == ["t0", "t1", "t2"]
    assert two["visits"] == [{"day": 0, "note": "note 0"}, {"day": 1, "note": None}]
    assert two["scores"] == {"s0": 0, "s1": 2}
    assert isinstance(zero, dict)
    assert isinstance(two["visits"], list)


def test_null_codec_container() -> None:
    records = [person(i) for i in range(40)]
    data = container(PERSON, records, codec="null")
    decoded = decode(data)
    assert [r.msg for r in decoded] == records
    assert decoded[0].schema == writer_schema_of(data)


def test_a_container_of_one_record() -> None:
    decoded = decode(container(PERSON, [person(5)]))
    assert len(decoded) == 1
    assert decoded[0].msg == person(5)


def test_many_blocks_keep_their_order() -> None:
    buffer = io.BytesIO()
    records = [person(i) for i in range(300)]
    # A small sync interval forces many deflate blocks.
    fastavro.writer(buffer, fastavro.parse_schema(PERSON), records, codec="deflate", sync_interval=200)
    assert [r.msg["id"] for r in decode(buffer.getvalue())] == [f"person-{i}" for i in range(300)]


@pytest.mark.parametrize("garbage", [
    b"",
    b"garbage after the magic",
    b"\x00\x00\x00\x00\x00",
    b"\xff" * 64,
    bytes(range(256)),
])
def test_magic_followed_by_garbage_is_undecodable(garbage: bytes) -> None:
    with pytest.raises(UndecodableMessage):
        decode(AVRO_MAGIC + garbage)


def test_truncated_container_is_undecodable() -> None:
    data = container(PERSON, [person(i) for i in range(50)])
    for cut in (len(data) // 3, len(data) // 2, len(data) - 10):
        with pytest.raises(UndecodableMessage):
            decode(data[:cut])


def test_container_with_a_damaged_deflate_block_is_undecodable() -> None:
    data = bytearray(container(PERSON, [person(i) for i in range(50)]))
    data[-40] ^= 0xFF
    with pytest.raises(UndecodableMessage):
        decode(bytes(data))


def test_undecodable_message_is_a_value_error() -> None:
    assert issubclass(UndecodableMessage, ValueError)


# -- JSON and text ---------------------------------------------------------------------------


def test_json_object_is_one_record_without_schema() -> None:
    value = {"id": "p-1", "household": {"size": 4}, "name": "Zoë", "tags": ["a", "b"]}
    assert decode(json.dumps(value, ensure_ascii=False).encode("utf-8")) == [Record(None, value)]


def test_json_list_is_one_record() -> None:
    assert decode(b'[1, {"a": null}, "x"]') == [Record(None, [1, {"a": None}, "x"])]


@pytest.mark.parametrize(("raw", "value"), [
    (b"42", 42),
    (b"-3.5", -3.5),
    (b"true", True),
    (b"null", None),
    (b'"quoted"', "quoted"),
])
def test_json_scalars_are_one_record(raw: bytes, value: Any) -> None:
    records = decode(raw)
    assert len(records) == 1
    assert records[0].schema is None
    assert records[0].msg == value
    assert type(records[0].msg) is type(value)


def test_json_with_surrounding_whitespace() -> None:
    assert decode(b'  \n{"a": 1}\n') == [Record(None, {"a": 1})]


@pytest.mark.parametrize("text", [
    "hello world",
    "{not json",
    "Ünïcödé text ✓",
    "id=5&name=x",
])
def test_valid_utf8_that_is_not_json_is_the_string_itself(text: str) -> None:
    assert decode(text.encode("utf-8")) == [Record(None, text)]


@pytest.mark.parametrize("raw", [
    b"\xff\xfe\xfd",
    b"\xc3\x28",
    b"abc\x80def",
    b"\xed\xa0\x80",  # an encoded surrogate is not valid UTF-8
    b"Obj\x00 not quite the magic \xff",
])
def test_invalid_utf8_is_undecodable(raw: bytes) -> None:
    with pytest.raises(UndecodableMessage):
        decode(raw)


def test_tombstone_is_undecodable() -> None:
    with pytest.raises(UndecodableMessage):
        decode(None)


# -- to_json ---------------------------------------------------------------------------------


def test_to_json_writes_avro_logical_types_as_strings() -> None:
    ref = uuid.UUID("12345678-1234-5678-1234-567812345678")
    at = datetime.datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=datetime.UTC)
    record = {
        "raw": b"\x00\x01\x02\xff",
        "day": datetime.date(2024, 2, 29),
        "at": at,
        "clock": datetime.time(13, 14, 15, 500000),
        "amount": decimal.Decimal("1234.50"),
        "ref": str(ref),
        "label": "Ça va? 你好",
    }
    [decoded] = decode(container(LOGICAL, [record]))
    msg = decoded.msg
    # fastavro gives back the Python types of the logical types ...
    assert isinstance(msg["day"], datetime.date)
    assert isinstance(msg["at"], datetime.datetime)
    assert isinstance(msg["amount"], decimal.Decimal)
    assert isinstance(msg["ref"], uuid.UUID)

    # ... and to_json turns each into a string.
    out = json.loads(to_json(msg))
    assert out == {
        "raw": base64.b64encode(b"\x00\x01\x02\xff").decode("ascii"),
        "day": "2024-02-29",
        "at": at.isoformat(),
        "clock": "13:14:15.500000",
        "amount": "1234.50",
        "ref": "12345678-1234-5678-1234-567812345678",
        "label": "Ça va? 你好",
    }
    assert datetime.datetime.fromisoformat(out["at"]) == at


def test_to_json_keeps_non_ascii_as_utf8() -> None:
    data = to_json({"name": "Zoë 你好 ✓"})
    assert isinstance(data, bytes)
    assert "Zoë 你好 ✓".encode() in data
    assert b"\\u" not in data
    assert data.decode("utf-8") == '{"name":"Zoë 你好 ✓"}'


def test_to_json_is_compact() -> None:
    assert to_json({"a": [1, 2], "b": None}) == b'{"a":[1,2],"b":null}'


def test_to_json_of_plain_values() -> None:
    assert to_json("x") == b'"x"'
    assert to_json(5) == b"5"
    assert to_json(None) == b"null"
    assert to_json([True, 1.5]) == b"[true,1.5]"


def test_to_json_of_python_types_directly() -> None:
    out = json.loads(to_json([
        b"hi",
        datetime.date(2000, 1, 2),
        datetime.datetime(2000, 1, 2, 3, 4, 5),
        decimal.Decimal("0.10"),
        uuid.UUID(int=1),
    ]))
    assert out == ["aGk=", "2000-01-02", "2000-01-02T03:04:05", "0.10",
                   "00000000-0000-0000-0000-000000000001"]


def test_to_json_refuses_other_objects() -> None:
    with pytest.raises(TypeError):
        to_json({"x": object()})


def test_decoded_avro_records_serialise_back() -> None:
    records = [person(i) for i in range(20)]
    for record, original in zip(decode(container(PERSON, records)), records, strict=True):
        assert json.loads(to_json(record.msg)) == original
