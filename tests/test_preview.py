"""The dry run's engine (restconsumer.api.preview): the requests a job would send, nothing sent."""

from __future__ import annotations

import base64
import io
import json

import fastavro
import pytest

from restconsumer.api.preview import BadEnvelope, preview
from restconsumer.jobs.model import validate

JOB = validate({"id": "p", "owner": "o", "type": "POST", "topic": "people",
                "datamap": {"id": "$.msg.id", "name": "$.msg.name", "who": "$.meta.key"},
                "url": "https://crm.example/people/{id}", "json_body": ["name", "who"],
                "basic_auth": {"user": "u", "pw": "s3cret-preview-1"},
                "headers": {"X-Api-Key": "k3y-preview-2", "X-Trace": "on"}})


def avro(records: list[dict[str, str]]) -> str:
    schema = {"type": "record", "name": "Person",
              "fields": [{"name": "id", "type": "string"}, {"name": "name", "type": "string"}]}
    out = io.BytesIO()
    fastavro.writer(out, fastavro.parse_schema(schema), records, codec="deflate")
    return base64.b64encode(out.getvalue()).decode()


def test_json_missing_key_and_an_avro_container() -> None:
    results = preview(JOB, [{"value": {"id": "a", "name": "Ann"}, "key": "k1"},
                            {"value": {"name": "nobody"}},
                            {"base64": avro([{"id": "b", "name": "Bo"}, {"id": "c", "name": "Cy"}])}],
                      1_700_000_000_000)
    assert [(r["message"], r["record"]) for r in results] == [(0, 0), (1, 0), (2, 0), (2, 1)]
    first = results[0]["request"]
    assert first["method"] == "POST"
    assert first["url"] == "https://crm.example/people/a"
    assert json.loads(first["body"]) == {"name": "Ann", "who": "k1"}
    assert first["headers"]["Authorization"] == "Basic ***"
    assert first["headers"]["X-Api-Key"] == "***"
    assert first["headers"]["X-Trace"] == "on"
    assert "needs 'id'" in results[1]["error"]
    assert [r["request"]["url"] for r in results[2:]] == ["https://crm.example/people/b",
                                                          "https://crm.example/people/c"]
    assert "s3cret-preview-1" not in json.dumps(results) and "k3y-preview-2" not in json.dumps(results)


def test_text_and_undecodable_messages() -> None:
    results = preview(JOB, [{"base64": base64.b64encode(b"plain words").decode()},
                            {"base64": base64.b64encode(b"\xff\xfe\x00").decode()}], 0)
    assert "needs 'id'" in results[0]["error"]
    assert results[1] == {"message": 1, "record": 0, "error": results[1]["error"]}
    assert "neither Avro" in results[1]["error"]


def test_meta_fields_come_from_the_envelope() -> None:
    job = validate({"id": "m", "owner": "o", "type": "GET", "topic": "t",
                    "datamap": {"id": "$.meta.offset", "p": "$.meta.partition", "h": "$.meta.headers.h"},
                    "url": "http://h/{id}", "query_params": ["p", "h"]})
    [result] = preview(job, [{"value": 1, "partition": 3, "offset": 42, "headers": {"h": "v"}}], 0)
    assert result["request"]["url"] == "http://h/42?p=3&h=v"
    assert result["request"]["body"] is None


def test_every_problem_of_the_envelopes_is_listed() -> None:
    with pytest.raises(BadEnvelope) as caught:
        preview(JOB, [{"value": 1, "base64": "AA=="}, {"base64": "!!"}, 7,
                      {"value": 1, "partition": -1, "key": 5, "headers": [1], "extra": 1}], 0)
    fields = [field for field, _ in caught.value.problems]
    assert fields == ["messages[0]", "messages[1].base64", "messages[2]", "messages[3].key",
                      "messages[3].partition", "messages[3].headers", "messages[3]"]
    with pytest.raises(BadEnvelope):
        preview(JOB, [], 0)
    with pytest.raises(BadEnvelope):
        preview(JOB, {"value": 1}, 0)


def test_the_preview_shows_user_agent_templated_headers_and_the_idempotency_key() -> None:
    from restconsumer import __version__
    job = validate({"id": "ik", "owner": "o", "type": "POST", "topic": "t",
                    "datamap": {"id": "$.msg.id", "tenant": "$.meta.headers.tenant"},
                    "url": "http://h/{id}", "json_body": ["id"], "idempotency_key": True,
                    "headers": {"X-Tenant": "{tenant}"}})
    [ok, bad] = preview(job, [{"value": {"id": "a"}, "offset": 9, "headers": {"tenant": "acme"}},
                              {"value": {"id": "b"}, "headers": {"tenant": "x\ny"}}], 0)
    headers = ok["request"]["headers"]
    assert headers["User-Agent"] == f"restconsumer/{__version__}"
    assert headers["X-Tenant"] == "acme"
    assert headers["Idempotency-Key"] == "ik:t:0:9:0"
    assert "control character" in bad["error"]


def test_the_preview_says_which_records_the_filter_leaves_out() -> None:
    job = validate({"id": "f", "owner": "o", "type": "POST", "topic": "t",
                    "datamap": {"id": "$.msg.id"}, "url": "http://h/{id}",
                    "filter": "$[?(@.msg.status == 'approved')]"})
    results = preview(job, [{"value": {"id": "a", "status": "approved"}},
                            {"value": {"id": "b", "status": "draft"}}], 0)
    assert results[0]["request"]["url"] == "http://h/a"
    assert results[1] == {"message": 1, "record": 0, "filtered": True}


def test_the_preview_shows_an_oauth2_bearer_without_fetching_a_token() -> None:
    job = validate({"id": "o", "owner": "o", "type": "POST", "topic": "t",
                    "datamap": {"id": "$.msg.id"}, "url": "http://h/{id}",
                    "oauth2": {"token_url": "http://auth/token", "client_id": "c",
                               "client_secret": "cs-preview-3"}})
    [result] = preview(job, [{"value": {"id": "a"}}], 0)
    assert result["request"]["headers"]["Authorization"] == "Bearer ***"
    assert "cs-preview-3" not in json.dumps(result)
