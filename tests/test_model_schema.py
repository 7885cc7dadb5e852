"""A job's shape comes from ``JobDefinition`` in openapi.json (restconsumer.jobs.schema).

The model checks types, enums, ranges and patterns only through that schema: changing the
document changes what ``validate`` accepts. Its errors read as the API always named them,
one problem per field path.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from restconsumer.jobs import model, schema
from restconsumer.jobs.model import InvalidJob, validate

REPO = Path(__file__).resolve().parent.parent
Change = Callable[[dict[str, Any]], None]


def minimal(**changes: Any) -> dict[str, Any]:
    """A small valid job definition with ``changes``."""
    return {"id": "job-1", "owner": "alice", "type": "POST", "topic": ["people"],
            "datamap": {"id": "$.msg.id", "name": "$.msg.name"},
            "url": "http://api.example.com/people/{id}/", **changes}


def problems_of(raw: Any) -> list[tuple[str, str]]:
    """(field, reason) of every problem ``validate`` finds; fails if it accepts ``raw``."""
    with pytest.raises(InvalidJob) as info:
        validate(raw)
    return [(p.field, p.reason) for p in info.value.problems]


@pytest.fixture
def edit_schema(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Change], None]]:
    """Change the loaded document's schemas (``components.schemas``) for one test."""
    def edit(change: Change) -> None:
        document = copy.deepcopy(schema.document())
        change(document["components"]["schemas"])
        monkeypatch.setattr(schema, "document", lambda: document)
        schema.shape.cache_clear()

    yield edit
    schema.shape.cache_clear()


def test_every_field_of_the_model_is_described_by_the_schema() -> None:
    described = schema.document()["components"]["schemas"]["JobDefinition"]["properties"]
    assert list(described) == list(model.FIELDS)


def test_the_document_is_openapi_3_1_and_its_job_schema_is_json_schema() -> None:
    text = (REPO / "restconsumer" / "api" / "openapi.json").read_text()
    assert json.loads(text) == schema.document()
    assert schema.document()["openapi"].startswith("3.1.")
    assert "nullable" not in text  # OpenAPI 3.0's word; 3.1 says "type": [..., "null"]
    jsonschema.Draft202012Validator.check_schema(schema.shape().schema)


def test_an_enum_of_the_schema_decides_what_validate_accepts(
        edit_schema: Callable[[Change], None]) -> None:
    job = minimal(type="DELETE")
    assert validate(job)

    def without_delete(schemas: dict[str, Any]) -> None:
        methods = schemas["JobDefinition"]["properties"]["type"]["enum"]
        methods.remove("DELETE")
        methods.append("FETCH")

    edit_schema(without_delete)
    assert problems_of(job) == [("type", "must be one of GET, POST, PUT, PATCH, HEAD, OPTIONS, FETCH")]
    assert validate(minimal(type="fetch")).definition["type"] == "FETCH"


def test_a_maximum_of_the_schema_decides_what_validate_accepts(
        edit_schema: Callable[[Change], None]) -> None:
    assert validate(minimal(max_in_flight=6, retry={"initial_wait": 90, "max_wait": 100}))

    def smaller(schemas: dict[str, Any]) -> None:
        schemas["JobDefinition"]["properties"]["max_in_flight"]["oneOf"][0]["maximum"] = 5
        schemas["Retry"]["properties"]["initial_wait"]["maximum"] = 60  # through a $ref

    edit_schema(smaller)
    assert problems_of(minimal(max_in_flight=6, retry={"initial_wait": 90, "max_wait": 100})) == [
        ("retry.initial_wait", "must be a number, above 0 and at most 60"),
        ("max_in_flight", "must be a whole number from 1 to 5"),
    ]


def test_a_new_field_of_the_schema_is_read_case_insensitively(
        edit_schema: Callable[[Change], None]) -> None:
    assert [f for f, _ in problems_of(minimal(Colour="red"))] == ["Colour"]
    edit_schema(lambda s: s["JobDefinition"]["properties"].update(colour={"type": "string"}))
    assert validate(minimal(Colour="red"))
    assert problems_of(minimal(colour=5)) == [("colour", "must be a string")]


def test_each_unknown_field_is_a_problem_of_its_own() -> None:
    raw = minimal(colour="red", Flavour="lime", retry={"jitter": 1, "backoff": 2, "max_attempts": 1})
    assert problems_of(raw) == [("colour", "unknown field"), ("Flavour", "unknown field"),
                                ("retry.jitter", "unknown field"), ("retry.backoff", "unknown field")]


def test_every_missing_field_is_a_problem_of_its_own() -> None:
    assert problems_of({"id": "job-1", "oauth2": {"client_id": "c"}}) == [
        ("owner", "is required"), ("type", "is required"), ("topic", "is required"),
        ("datamap", "is required"), ("url", "is required"),
        ("oauth2.token_url", "is required"), ("oauth2.client_secret", "is required")]


def test_a_choice_is_explained_by_the_choice_the_value_takes() -> None:
    assert problems_of(minimal(topic=["ok", "bad topic"])) == [
        ("topic[1]", "must match [A-Za-z0-9._-]{1,249}")]
    assert problems_of(minimal(topic=[])) == [("topic", "must not be empty")]
    assert problems_of(minimal(topic=["a", "a"])) == [("topic", 'names "a" twice')]
    assert problems_of(minimal(topic=5)) == [
        ("topic", "must be a string matching [A-Za-z0-9._-]{1,249} or a non-empty list of strings")]
    assert problems_of(minimal(ordering={"by": ""})) == [("ordering.by", "must not be empty")]
    assert problems_of(minimal(ordering="sideways")) == [
        ("ordering", "must be one of partition, key, none")]
    assert problems_of(minimal(ordering=3)) == [
        ("ordering", "must be one of partition, key, none or an object {by}")]


def test_reasons_are_worded_for_an_operator() -> None:
    found = dict(problems_of(minimal(
        type=3, ratelimit=-1, timeout=0, follow_redirects="yes", basic_auth="u:p", constant=[],
        datamap={"id": "$.msg.id", "{x}": "$.a", "blank": ""}, headers={"Bad Header": 5},
        success_status=[409, 409, 600], filter="$" + "a" * 1000)))
    assert found == {
        "type": "must be one of GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS",
        "ratelimit": "must be a number from 0 to 86400",
        "timeout": "must be a number, above 0 and at most 86400",
        "follow_redirects": "must be true or false",
        "basic_auth": "must be an object {user, pw}",
        "constant": "must be an object",
        "datamap.{x}": "the name must match [^{}]+",
        "datamap.blank": "must not be empty",
        "headers.Bad Header": "must be a string",
        "success_status[1]": "409 is given twice",
        "success_status[2]": "must be a whole number from 100 to 599",
        "filter": "is longer than 1000 characters",
    }
    names = [p for p in problems_of(minimal(headers={"Bad Header": "v"}))]
    assert names == [("headers.Bad Header", "the name must match [!#$%&'*+.^_`|~0-9A-Za-z-]+")]


def test_a_value_breaking_several_keywords_is_one_problem() -> None:
    assert problems_of(minimal(type=["GET"])) == [
        ("type", "must be one of GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS")]
    assert problems_of(minimal(id=7, start_from=0)) == [
        ("id", "must be a string matching [A-Za-z0-9._-]{1,128}"),
        ("start_from", "must be one of earliest, latest")]


def test_a_key_lists_bad_items_are_named_at_the_list() -> None:
    assert problems_of(minimal(json_body=["id", 1, 2])) == [("json_body", "must be a list of strings")]


def test_counts_are_whole_numbers_as_the_model_always_took_them() -> None:
    """JSON Schema counts 2.0 as an integer; a job's counts never were."""
    assert [f for f, _ in problems_of(minimal(max_in_flight=2.0, retry={"max_attempts": 3.0}))] == \
        ["retry.max_attempts", "max_in_flight"]
    assert [f for f, _ in problems_of(minimal(max_in_flight=True))] == ["max_in_flight"]


def test_nulls_inside_an_object_mean_not_set_as_they_do_outside() -> None:
    job = validate(minimal(retry={"max_attempts": None, "max_wait": 5},
                           signing={"secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "scheme": None}))
    assert job.definition["retry"] == {"max_wait": 5.0}
    assert job.definition["signing"]["scheme"] == "standard-webhooks"
    assert problems_of(minimal(basic_auth={"user": "u", "pw": None})) == [("basic_auth.pw", "is required")]


def test_repeated_items_are_found_in_one_pass() -> None:
    """jsonschema's own uniqueItems compares every pair of unsortable items."""
    started = time.perf_counter()
    found = problems_of(minimal(topic=[{"n": i} for i in range(20_000)]))
    assert len(found) == 20_000
    assert time.perf_counter() - started < 10
    started = time.perf_counter()
    assert len(problems_of(minimal(success_status=[200] * 20_000))) == 19_999
    assert time.perf_counter() - started < 10


def test_the_schema_is_read_without_importing_the_api_package() -> None:
    """jobs/ sits below api/ (pyproject's layers): the document is data of ``restconsumer``."""
    code = ("import sys; from restconsumer.jobs import model; "
            "model.validate({'id': 'a', 'owner': 'o', 'type': 'GET', 'topic': 't', "
            "'datamap': {'id': '$.a'}, 'url': 'http://h/{id}'}); "
            "print(sorted(m for m in sys.modules if m.startswith('restconsumer.api')))")
    shown = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                           check=True)
    assert shown.stdout.strip() == "[]"


@pytest.mark.parametrize("field", ["id", "owner"])
def test_a_pattern_holds_to_the_end_of_the_text(field: str) -> None:
    """JSON Schema's ``$`` ends the text: ``job-1\\n`` is no id (Python's ``$`` alone would let
    it through, and it would reach Redis keys and Kafka topic names)."""
    definition = {"id": "job-1", "owner": "o", "type": "POST", "topic": "t", "datamap": {"id": "$.id"},
                  "url": "http://x.example/{id}"}
    definition[field] = definition[field] + "\n"
    with pytest.raises(InvalidJob) as caught:
        validate(definition)
    assert [p.field for p in caught.value.problems] == [field]
