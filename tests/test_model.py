"""Unit tests of restconsumer.jobs.model: validation, normalisation, hashing and redaction of jobs."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from restconsumer.jobs import model
from restconsumer.jobs.model import (
    REDACTED,
    InvalidJob,
    Job,
    default_dead_letter_topic,
    is_secret_header,
    load,
    redact,
    url_placeholders,
    validate,
)

OLD = "2020-01-02T03:04:05.678Z"


def minimal(**changes: Any) -> dict[str, Any]:
    """A small valid job definition, with ``changes`` applied (None removes a field)."""
    raw: dict[str, Any] = {
        "id": "job-1",
        "owner": "alice",
        "type": "POST",
        "topic": ["people"],
        "datamap": {"id": "$.msg.id", "name": "$.msg.name"},
        "url": "http://api.example.com/people/{id}/",
    }
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


def full(**changes: Any) -> dict[str, Any]:
    """A valid definition using every optional field but ``token`` (which excludes basic_auth)."""
    raw = minimal(
        basic_auth={"user": "svc", "pw": "s3cret"},
        query_params=["name"],
        json_body=["id", "name"],
        constant={"source": "unit"},
        ratelimit=0.5,
        headers={"Accept": "application/json", "X-Api-Key": "k-123"},
        retry={"max_attempts": 3, "initial_wait": 0.5, "max_wait": 5},
        timeout=10,
        follow_redirects=True,
        dead_letter_topic="dead.people",
    )
    raw.update(changes)
    return raw


def problems_of(raw: Any, *args: Any, **kwargs: Any) -> list[model.Problem]:
    """The problems ``validate`` finds in ``raw``; fails the test if it accepts it."""
    with pytest.raises(InvalidJob) as info:
        validate(raw, *args, **kwargs)
    assert info.value.problems, "InvalidJob must list at least one problem"
    return info.value.problems


def fields_of(raw: Any, *args: Any, **kwargs: Any) -> set[str]:
    """The field paths of the problems ``validate`` finds in ``raw``."""
    return {p.field for p in problems_of(raw, *args, **kwargs)}


# --- normalisation ---------------------------------------------------------------


def test_minimal_job_is_accepted() -> None:
    job = validate(minimal())
    assert isinstance(job, Job)
    assert job.id == "job-1"
    assert job.owner == "alice"
    assert job.topics == ["people"]
    assert job.definition == minimal()
    assert job.dead_letter_topic == "restconsumer.deadletter.job-1"
    assert job.retry == {"max_attempts": 8, "initial_wait": 1.0, "max_wait": 30.0, "max_throttled": 3600.0}


def test_keys_are_read_case_insensitively() -> None:
    raw = {
        "ID": "job-1",
        "Owner": "alice",
        "Type": "post",
        "TOPIC": "people",
        "DataMap": {"id": "$.msg.id", "name": "$.msg.name"},
        "Url": "http://api.example.com/people/{id}/",
        "Basic_Auth": {"User": "svc", "Password": "s3cret"},
        "Query_Params": ["name"],
        "Retry": {"Max_Attempts": 2},
    }
    job = validate(raw)
    assert job.definition == {
        "id": "job-1",
        "owner": "alice",
        "type": "POST",
        "topic": ["people"],
        "datamap": {"id": "$.msg.id", "name": "$.msg.name"},
        "url": "http://api.example.com/people/{id}/",
        "basic_auth": {"user": "svc", "pw": "s3cret"},
        "query_params": ["name"],
        "retry": {"max_attempts": 2},
    }


def test_datamap_keys_keep_their_case() -> None:
    job = validate(minimal(datamap={"Id": "$.msg.id"}, url="http://h/{Id}"))
    assert set(job.definition["datamap"]) == {"Id"}
    assert set(job.paths) == {"Id"}


def test_a_single_topic_becomes_a_list_of_one() -> None:
    assert validate(minimal(topic="people")).topics == ["people"]


@pytest.mark.parametrize("method", ["get", "Post", "put", "pAtCh", "delete", "head", "options"])
def test_type_is_uppercased(method: str) -> None:
    assert validate(minimal(type=method)).definition["type"] == method.upper()


@pytest.mark.parametrize("key", ["pw", "password", "PW", "Password"])
def test_basic_auth_password_is_stored_as_pw(key: str) -> None:
    job = validate(minimal(basic_auth={"user": "svc", key: "s3cret"}))
    assert job.definition["basic_auth"] == {"user": "svc", "pw": "s3cret"}


def test_explicit_null_for_an_optional_field_means_not_set() -> None:
    raw = minimal()
    raw["token"] = None
    raw["headers"] = None
    job = validate(raw)
    assert "token" not in job.definition
    assert "headers" not in job.definition


def test_definition_is_in_canonical_field_order() -> None:
    raw = dict(reversed(list(full().items())))
    assert list(validate(raw).definition) == [f for f in model.FIELDS if f in full()]


def test_validate_does_not_change_its_input() -> None:
    raw = full(Basic_Auth={"User": "svc", "Password": REDACTED}, topic="people")
    del raw["basic_auth"]
    before = copy.deepcopy(raw)
    previous = validate(full()).stored()
    validate(raw, previous=previous)
    assert raw == before


def test_dead_letter_topic_and_retry_overrides() -> None:
    job = validate(minimal(dead_letter_topic="dl.x", retry={"max_attempts": 0}))
    assert job.dead_letter_topic == "dl.x"
    assert job.retry == {"max_attempts": 0, "initial_wait": 1.0, "max_wait": 30.0, "max_throttled": 3600.0}
    assert default_dead_letter_topic("a.b") == "restconsumer.deadletter.a.b"


def test_job_id_may_use_the_whole_alphabet() -> None:
    jid = "Az09._-" + "x" * 121
    assert len(jid) == 128
    assert validate(minimal(id=jid), jid).id == jid


# --- refusals --------------------------------------------------------------------


def test_not_an_object_is_refused() -> None:
    assert fields_of(["id", "job-1"]) == {""}
    assert fields_of("job") == {""}


def test_missing_required_fields_are_each_listed() -> None:
    assert fields_of({}) == {"id", "owner", "type", "topic", "datamap", "url"}
    assert fields_of(minimal(owner=None, url=None)) == {"owner", "url"}


def test_every_mistake_is_listed_with_its_field_path() -> None:
    raw = {
        "id": "bad id!",
        "owner": "",
        "type": "FETCH",
        "topic": ["ok", "bad topic"],
        "datamap": {"x": 5, "y": "$.msg[", "{z}": "$.a"},
        "url": "http://h/{x}",
        "basic_auth": {"user": "svc"},
        "token_type": "Bearer",
        "query_params": ["missing"],
        "json_body": "x",
        "constant": [],
        "ratelimit": -1,
        "timeout": "soon",
        "follow_redirects": "yes",
        "headers": {"Bad Header": "v", "X-Ok": "a\r\nInjected: 1"},
        "retry": {"max_attempts": -1, "initial_wait": 0, "jitter": True},
        "dead_letter_topic": "no spaces please",
        "colour": "red",
    }
    problems = problems_of(raw)
    assert {p.field for p in problems} == {
        "id",
        "owner",
        "type",
        "topic[1]",
        "datamap.x",
        "datamap.y",
        "datamap.{z}",
        "basic_auth.pw",
        "token_type",
        "query_params[0]",
        "json_body",
        "constant",
        "ratelimit",
        "timeout",
        "follow_redirects",
        "headers.Bad Header",
        "headers.X-Ok",
        "retry.max_attempts",
        "retry.initial_wait",
        "retry.jitter",
        "dead_letter_topic",
        "colour",
    }
    assert all(p.reason for p in problems)
    assert all(p.as_dict() == {"field": p.field, "reason": p.reason} for p in problems)


def test_header_names_and_values_are_checked() -> None:
    fields = fields_of(minimal(headers={"Bad Header": "v", "X-Ok": "a\r\nInjected: 1", "Accept": "x"}))
    assert fields == {"headers.Bad Header", "headers.X-Ok"}


def test_invalid_job_message_names_every_problem() -> None:
    with pytest.raises(InvalidJob) as info:
        validate(minimal(owner=None, type="FETCH"))
    assert isinstance(info.value, ValueError)
    assert "owner" in str(info.value)
    assert "type" in str(info.value)


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"colour": "red"}, "colour"),
        ({"Modified_By": "me"}, "Modified_By"),
        ({"basic_auth": {"user": "u", "pw": "p", "domain": "d"}}, "basic_auth.domain"),
        ({"retry": {"jitter": 0.1}}, "retry.jitter"),
    ],
)
def test_unknown_fields_are_refused(raw: dict[str, Any], field: str) -> None:
    problems = problems_of(minimal(**raw))
    assert [p.field for p in problems] == [field]
    assert "unknown" in problems[0].reason


def test_a_field_given_twice_in_different_case_is_refused() -> None:
    raw = minimal()
    raw["OWNER"] = "bob"
    assert fields_of(raw) == {"OWNER"}


@pytest.mark.parametrize("jid", ["", "has space", "slash/no", "x" * 129, "ü", 7])
def test_bad_ids_are_refused(jid: Any) -> None:
    assert fields_of(minimal(id=jid)) == {"id"}


def test_id_must_equal_the_id_of_the_path() -> None:
    assert validate(minimal(), "job-1").id == "job-1"
    problems = problems_of(minimal(), "job-2")
    assert [p.field for p in problems] == ["id"]
    assert "job-2" in problems[0].reason


def test_id_of_the_path_is_case_sensitive() -> None:
    assert fields_of(minimal(), "JOB-1") == {"id"}


@pytest.mark.parametrize("method", ["FETCH", "", 3, ["GET"]])
def test_bad_types_are_refused(method: Any) -> None:
    assert fields_of(minimal(type=method)) == {"type"}


@pytest.mark.parametrize(
    "topic, field",
    [([], "topic"), (5, "topic"), ({"t": 1}, "topic"), (["a", "a"], "topic"), (["a", ""], "topic[1]"),
     (["a/b"], "topic[0]"), (["x" * 250], "topic[0]")],
)
def test_bad_topics_are_refused(topic: Any, field: str) -> None:
    assert fields_of(minimal(topic=topic)) == {field}


@pytest.mark.parametrize("datamap", [[], "$.msg.id", {"id": ""}, {"id": None}, {"id": "$.msg[?("}])
def test_bad_datamaps_are_refused(datamap: Any) -> None:
    fields = fields_of(minimal(datamap=datamap, url="http://h/"))
    assert fields and all(f.startswith("datamap") for f in fields)


# --- URLs ------------------------------------------------------------------------


def test_url_placeholders_are_listed_in_order() -> None:
    assert url_placeholders("http://h/{a}/x/{b}?q={a}") == ["a", "b", "a"]
    assert url_placeholders("http://h/") == []


def test_url_placeholders_must_be_datamap_keys() -> None:
    problems = problems_of(minimal(url="http://h/{id}/{nope}"))
    assert [p.field for p in problems] == ["url"]
    assert "nope" in problems[0].reason


def test_empty_placeholder_is_refused() -> None:
    assert fields_of(minimal(url="http://h/{}")) == {"url"}


@pytest.mark.parametrize(
    "url",
    [
        "http://h/{id}",
        "https://h/people/{id}/names/{name}",
        "http://h:8080/x?id={id}&n={name}",
        "HTTPS://h/{id}",
    ],
)
def test_placeholders_in_path_and_query_are_accepted(url: str) -> None:
    assert validate(minimal(url=url)).definition["url"] == url


@pytest.mark.parametrize(
    "url",
    [
        "{scheme}://h/x",
        "http{scheme}://h/x",
        "http://{host}/x",
        "http://{host}.example.com/x",
        "http://api.{host}/x",
        "http://h:{port}/x",
        "http://h:80{port}/x",
        "http://{host}:80/x",
        "http://{user}@h/x",
        "http://u:{port}@h/x",
    ],
)
def test_placeholders_may_not_stand_in_scheme_host_or_port(url: str) -> None:
    datamap = {"scheme": "$.a", "host": "$.b", "port": "$.c", "user": "$.d"}
    assert fields_of(minimal(datamap=datamap, url=url)) == {"url"}


@pytest.mark.parametrize(
    "url",
    ["ftp://h/x", "file:///etc/passwd", "javascript:alert(1)", "gopher://h/", "h/x", "//h/x",
     "mailto:a@h", "", "http://", "http:///x", "http://h/#frag", 5],
)
def test_non_http_or_malformed_urls_are_refused(url: Any) -> None:
    assert fields_of(minimal(url=url)) == {"url"}


def test_allow_hosts_is_enforced() -> None:
    allowed = frozenset({"api.example.com", "127.0.0.1"})
    assert validate(minimal(url="http://api.example.com/{id}"), allow_hosts=allowed)
    assert validate(minimal(url="https://API.Example.COM:8443/{id}"), allow_hosts=allowed)
    assert validate(minimal(url="http://127.0.0.1:9013/{id}"), allow_hosts=allowed)
    for url in ("http://evil.example.com/{id}", "http://api.example.com.evil.net/{id}",
                "http://evil.net/api.example.com/{id}", "http://api.example.com@evil.net/{id}"):
        problems = problems_of(minimal(url=url), allow_hosts=allowed)
        assert {p.field for p in problems} == {"url"}, url
        assert any("evil" in p.reason and "allowed" in p.reason for p in problems), url


def test_any_host_without_allow_hosts() -> None:
    assert validate(minimal(url="http://anything.example.net/{id}"))


# --- body, query, auth -------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "post"])
def test_json_body_with_body_methods(method: str) -> None:
    job = validate(minimal(type=method, json_body=["id", "name"]))
    assert job.definition["json_body"] == ["id", "name"]


@pytest.mark.parametrize("method", ["GET", "DELETE", "HEAD", "OPTIONS", "get"])
def test_json_body_refused_with_other_methods(method: str) -> None:
    assert fields_of(minimal(type=method, json_body=["id"])) == {"json_body"}


@pytest.mark.parametrize("name", ["query_params", "json_body"])
def test_key_lists_take_only_datamap_keys(name: str) -> None:
    assert fields_of(minimal(**{name: ["id", "other"]})) == {f"{name}[1]"}
    assert fields_of(minimal(**{name: "id"})) == {name}
    assert fields_of(minimal(**{name: [1]})) == {name}


def test_token_and_basic_auth_exclude_each_other() -> None:
    fields = fields_of(minimal(token="t", basic_auth={"user": "u", "pw": "p"}))
    assert fields == {"token"}


@pytest.mark.parametrize("auth, field", [
    ({"user": "u"}, "basic_auth.pw"),
    ({"pw": "p"}, "basic_auth.user"),
    ({"user": 1, "pw": "p"}, "basic_auth.user"),
    ("u:p", "basic_auth"),
])
def test_bad_basic_auth_is_refused(auth: Any, field: str) -> None:
    assert fields_of(minimal(basic_auth=auth)) == {field}


def test_token_type_goes_with_a_token() -> None:
    job = validate(minimal(token="t", token_type="Token"))
    assert job.definition["token_type"] == "Token"
    assert fields_of(minimal(token_type="Token")) == {"token_type"}
    assert fields_of(minimal(token="")) == {"token"}


@pytest.mark.parametrize("name", ["ratelimit", "timeout"])
@pytest.mark.parametrize("value", [-0.1, 86401, "1", True, [1]])
def test_bad_seconds_are_refused(name: str, value: Any) -> None:
    assert fields_of(minimal(**{name: value})) == {name}


def test_zero_timeout_is_refused_but_zero_ratelimit_is_fine() -> None:
    assert fields_of(minimal(timeout=0)) == {"timeout"}
    assert validate(minimal(ratelimit=0, timeout=0.5)).definition["ratelimit"] == 0


# --- retry -----------------------------------------------------------------------


@pytest.mark.parametrize("retry, expected", [
    ({"max_attempts": 3}, {"max_attempts": 3, "initial_wait": 1.0, "max_wait": 30.0}),
    ({"max_attempts": 0, "initial_wait": 0.2, "max_wait": 2},
     {"max_attempts": 0, "initial_wait": 0.2, "max_wait": 2}),
    ({"Max_Wait": 60}, {"max_attempts": 8, "initial_wait": 1.0, "max_wait": 60}),
    ({}, {"max_attempts": 8, "initial_wait": 1.0, "max_wait": 30.0}),
])
def test_retry_overrides_are_merged_with_the_defaults(
    retry: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert validate(minimal(retry=retry)).retry == {"max_throttled": 3600.0, **expected}


@pytest.mark.parametrize("retry, field", [
    ({"max_attempts": -1}, "retry.max_attempts"),
    ({"max_attempts": 1.5}, "retry.max_attempts"),
    ({"max_attempts": True}, "retry.max_attempts"),
    ({"max_attempts": "3"}, "retry.max_attempts"),
    ({"initial_wait": 0}, "retry.initial_wait"),
    ({"initial_wait": -1}, "retry.initial_wait"),
    ({"initial_wait": "1"}, "retry.initial_wait"),
    ({"max_wait": 0}, "retry.max_wait"),
    ({"max_wait": 86401}, "retry.max_wait"),
    ({"max_throttled": 0}, "retry.max_throttled"),
    ({"initial_wait": 5, "max_wait": 2}, "retry.max_wait"),
    ({"max_wait": 0.5}, "retry.max_wait"),
    ({"backoff": 2}, "retry.backoff"),
    ([3], "retry"),
])
def test_bad_retry_overrides_are_refused(retry: Any, field: str) -> None:
    assert fields_of(minimal(retry=retry)) == {field}


# --- hash and modified -------------------------------------------------------------


def test_hash_is_stable_for_the_same_definition() -> None:
    assert validate(full()).hash == validate(full()).hash
    assert len(validate(full()).hash) == 64


def test_hash_ignores_key_order_and_case_and_spelling() -> None:
    a = validate(full())
    raw = {k.upper(): v for k, v in reversed(list(full().items()))}
    raw["TYPE"] = "post"
    raw["TOPIC"] = "people"
    raw["BASIC_AUTH"] = {"password": "s3cret", "USER": "svc"}
    raw["RETRY"] = {"Max_Wait": 5, "initial_wait": 0.5, "MAX_ATTEMPTS": 3}
    raw["DATAMAP"] = dict(reversed(list(full()["datamap"].items())))
    b = validate(raw)
    assert b.definition == a.definition
    assert b.hash == a.hash


# (field, value in the base definition or None when absent, another value)
HASH_CHANGES: list[tuple[str, Any, Any]] = [
    ("id", "job-1", "job-2"),
    ("owner", "alice", "bob"),
    ("type", "POST", "PUT"),
    ("topic", ["people"], ["people", "more"]),
    ("topic", ["people"], ["persons"]),
    ("datamap", {"id": "$.msg.id", "name": "$.msg.name"}, {"id": "$.msg.uid", "name": "$.msg.name"}),
    ("datamap", {"id": "$.msg.id", "name": "$.msg.name"},
     {"id": "$.msg.id", "name": "$.msg.name", "x": "$.x"}),
    ("url", "http://api.example.com/people/{id}/", "http://api.example.com/persons/{id}/"),
    ("url", "http://api.example.com/people/{id}/", "https://api.example.com/people/{id}/"),
    ("basic_auth", None, {"user": "svc", "pw": "s3cret"}),
    ("basic_auth", {"user": "svc", "pw": "s3cret"}, {"user": "svc", "pw": "other"}),
    ("basic_auth", {"user": "svc", "pw": "s3cret"}, {"user": "svc2", "pw": "s3cret"}),
    ("token", None, "tok"),
    ("token", "tok", "tok2"),
    ("query_params", None, ["name"]),
    ("query_params", ["name"], ["id", "name"]),
    ("json_body", None, ["id"]),
    ("json_body", ["id"], ["id", "name"]),
    ("constant", None, {"source": "a"}),
    ("constant", {"source": "a"}, {"source": "b"}),
    ("ratelimit", None, 1.5),
    ("ratelimit", 1.5, 2.5),
    ("headers", None, {"Accept": "application/json"}),
    ("headers", {"Accept": "application/json"}, {"Accept": "text/plain"}),
    ("headers", {"X-Api-Key": "k1"}, {"X-Api-Key": "k2"}),
    ("retry", None, {"max_attempts": 3}),
    ("retry", {"max_attempts": 3}, {"max_attempts": 4}),
    ("retry", {"max_attempts": 3}, {"max_attempts": 3, "max_wait": 60}),
    ("dead_letter_topic", None, "dead.people"),
    ("dead_letter_topic", "dead.people", "dead.persons"),
    ("timeout", None, 5),
    ("timeout", 5, 6),
    ("token_type", None, "Token"),
    ("follow_redirects", None, True),
    ("follow_redirects", False, True),
]


@pytest.mark.parametrize(
    "name, before, after", HASH_CHANGES, ids=[f"{c[0]}-{i}" for i, c in enumerate(HASH_CHANGES)]
)
def test_hash_changes_when_a_behavioural_field_changes(name: str, before: Any, after: Any) -> None:
    base = minimal()
    if name == "token_type":
        base["token"] = "tok"
    a, b = dict(base), dict(base)
    a.pop(name, None)
    if before is not None:
        a[name] = before
    b[name] = after
    job_a, job_b = validate(a), validate(b)
    assert job_a.definition != job_b.definition
    assert job_a.hash != job_b.hash


def test_generated_fields_in_the_input_are_ignored() -> None:
    plain = validate(minimal())
    given = validate(minimal(modified=OLD, hash="0" * 64))
    assert given.hash == plain.hash
    assert given.hash != "0" * 64
    assert given.modified != OLD
    assert "modified" not in given.definition
    assert "hash" not in given.definition
    assert validate(minimal(Modified=OLD, HASH="x")).hash == plain.hash


def _parse_time(text: str) -> datetime:
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text[:-1] + "+00:00")


def test_modified_is_now_in_utc_iso_8601() -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    job = validate(minimal())
    after = datetime.now(UTC) + timedelta(seconds=1)
    assert before <= _parse_time(job.modified) <= after


def test_modified_is_kept_when_the_hash_did_not_change() -> None:
    previous = {**validate(minimal()).stored(), "modified": OLD}
    raw = minimal(type=None, topic="people")
    raw["Type"] = "post"
    again = validate(raw, previous=previous)
    assert again.hash == previous["hash"]
    assert again.modified == OLD


def test_modified_is_renewed_when_the_hash_changed() -> None:
    previous = {**validate(minimal()).stored(), "modified": OLD}
    changed = validate(minimal(owner="bob"), previous=previous)
    assert changed.hash != previous["hash"]
    assert changed.modified != OLD
    assert _parse_time(changed.modified) > _parse_time(OLD)


def test_explicit_modified_wins() -> None:
    assert validate(minimal(), modified=OLD).modified == OLD


def test_stored_holds_definition_and_generated_fields() -> None:
    job = validate(full())
    stored = job.stored()
    assert stored == {**job.definition, "modified": job.modified, "hash": job.hash}
    json.dumps(stored)


# --- secrets -----------------------------------------------------------------------


def test_redact_hides_secrets_only() -> None:
    stored = validate(full(headers={
        "Authorization": "Bearer abc",
        "X-Api-Key": "key-1",
        "X-Auth-Token": "tok-2",
        "Accept": "application/json",
        "Content-Type": "application/json",
        "X-Request-Source": "restconsumer",
    })).stored()
    shown = redact(stored)
    assert shown["basic_auth"] == {"user": "svc", "pw": REDACTED}
    assert shown["headers"] == {
        "Authorization": REDACTED,
        "X-Api-Key": REDACTED,
        "X-Auth-Token": REDACTED,
        "Accept": "application/json",
        "Content-Type": "application/json",
        "X-Request-Source": "restconsumer",
    }
    text = json.dumps(shown)
    for secret in ("s3cret", "Bearer abc", "key-1", "tok-2"):
        assert secret not in text
    # the stored job itself is left alone
    assert stored["basic_auth"]["pw"] == "s3cret"
    assert stored["headers"]["X-Api-Key"] == "key-1"


def test_redact_hides_the_token() -> None:
    job = validate(minimal(token="very-secret", token_type="Token"))
    shown = job.public()
    assert shown["token"] == REDACTED
    assert shown["token_type"] == "Token"
    assert "very-secret" not in json.dumps(shown)
    assert job.definition["token"] == "very-secret"


def test_redact_leaves_a_job_without_secrets_alone() -> None:
    stored = validate(minimal()).stored()
    assert redact(stored) == stored


@pytest.mark.parametrize("name", ["Authorization", "authorization", "X-Api-Key", "X-Auth-Token",
                                  "Proxy-Authorization", "Cookie", "X-Client-Secret"])
def test_secret_headers(name: str) -> None:
    assert is_secret_header(name)


@pytest.mark.parametrize("name", ["Accept", "Content-Type", "User-Agent", "X-Request-Id", "If-Match"])
def test_ordinary_headers(name: str) -> None:
    assert not is_secret_header(name)


def test_secrets_sent_back_redacted_keep_the_previous_values() -> None:
    original = validate(full(headers={"Authorization": "Bearer abc", "Accept": "text/plain"}))
    previous = original.stored()
    shown = original.public()
    assert shown["basic_auth"]["pw"] == REDACTED
    again = validate(shown, "job-1", previous=previous)
    assert again.definition["basic_auth"] == {"user": "svc", "pw": "s3cret"}
    assert again.definition["headers"] == {"Authorization": "Bearer abc", "Accept": "text/plain"}
    assert again.definition == original.definition
    assert again.hash == original.hash
    assert again.modified == original.modified


def test_redacted_password_spelt_password_keeps_the_previous_value() -> None:
    previous = validate(minimal(basic_auth={"user": "svc", "pw": "s3cret"})).stored()
    again = validate(minimal(basic_auth={"user": "svc", "Password": REDACTED}), previous=previous)
    assert again.definition["basic_auth"] == {"user": "svc", "pw": "s3cret"}


def test_redacted_token_keeps_the_previous_token() -> None:
    original = validate(minimal(token="very-secret"))
    again = validate(original.public(), previous=original.stored())
    assert again.definition["token"] == "very-secret"
    assert again.hash == original.hash


def test_new_secrets_replace_the_previous_ones() -> None:
    previous = validate(full()).stored()
    again = validate(full(basic_auth={"user": "svc", "pw": "new"}), previous=previous)
    assert again.definition["basic_auth"]["pw"] == "new"
    assert again.hash != previous["hash"]


# --- JSONPath ----------------------------------------------------------------------

SAMPLE = {
    "schema": {"name": "Person"},
    "msg": {"id": "p-1", "name": "Ada", "tags": ["a", "b"], "age": 36},
    "constant": {"source": "unit"},
    "meta": {"topic": "people", "partition": 0, "offset": 7, "key": None, "timestamp": 1},
}


def test_datamap_paths_are_compiled_and_find_values() -> None:
    datamap = {
        "id": "$.msg.id",
        "schema_name": "$.schema.name",
        "source": "$.constant.source",
        "tags": "$.msg.tags[*]",
        "offset": "$.meta.offset",
        "nothing": "$.msg.absent",
    }
    job = validate(minimal(datamap=datamap, url="http://h/{id}", json_body=["schema_name"]))
    assert set(job.paths) == set(datamap)
    found = {key: [m.value for m in path.find(SAMPLE)] for key, path in job.paths.items()}
    assert found == {
        "id": ["p-1"],
        "schema_name": ["Person"],
        "source": ["unit"],
        "tags": ["a", "b"],
        "offset": [7],
        "nothing": [],
    }


def test_each_jsonpath_is_compiled_once(monkeypatch: pytest.MonkeyPatch) -> None:
    compiled: list[str] = []
    real = model.parse_jsonpath

    def counting(expr: str) -> Any:
        compiled.append(expr)
        return real(expr)

    monkeypatch.setattr(model, "parse_jsonpath", counting)
    datamap = {"id": "$.msg.id", "name": "$.msg.name", "schema_name": "$.schema.name"}
    job = validate(minimal(datamap=datamap))
    assert sorted(compiled) == sorted(datamap.values())
    assert [m.value for m in job.paths["name"].find(SAMPLE)] == ["Ada"]
    assert [m.value for m in job.paths["name"].find(SAMPLE)] == ["Ada"]
    assert len(compiled) == len(datamap)


def test_paths_are_not_part_of_equality() -> None:
    assert validate(minimal(), modified=OLD) == validate(minimal(), modified=OLD)


# --- load --------------------------------------------------------------------------


def test_load_keeps_the_stored_modified() -> None:
    job = validate(full(), modified=OLD)
    loaded = load(json.loads(json.dumps(job.stored())))
    assert loaded.modified == OLD
    assert loaded.hash == job.hash
    assert loaded.definition == job.definition
    assert set(loaded.paths) == set(job.definition["datamap"])


def test_load_recomputes_the_hash() -> None:
    job = validate(full(), modified=OLD)
    loaded = load({**job.stored(), "hash": "tampered"})
    assert loaded.hash == job.hash
    assert loaded.modified == OLD


def test_load_without_modified_gives_a_fresh_one() -> None:
    loaded = load(minimal())
    assert _parse_time(loaded.modified) > _parse_time(OLD)


def test_load_refuses_a_broken_stored_job() -> None:
    with pytest.raises(InvalidJob):
        load({**minimal(type="FETCH"), "modified": OLD})


def _secret_job(**changes: Any) -> dict[str, Any]:
    job = {"id": "s", "owner": "o", "type": "POST", "topic": "t", "datamap": {"id": "$.msg.id"},
           "url": "https://crm.example/{id}", "basic_auth": {"user": "u", "pw": "real-pw"},
           "headers": {"X-Api-Key": "real-key"}}
    job.update(changes)
    return job


def test_hidden_secrets_are_kept_only_for_the_same_destination() -> None:
    previous = validate(_secret_job()).stored()
    shown = redact(previous)
    kept = validate(shown, previous=previous)
    assert kept.definition["basic_auth"]["pw"] == "real-pw"
    assert kept.definition["headers"]["X-Api-Key"] == "real-key"
    moved = {**shown, "url": "https://attacker.example/{id}"}
    with pytest.raises(InvalidJob) as caught:
        validate(moved, previous=previous)
    assert {p.field for p in caught.value.problems} == {"basic_auth.pw", "headers.X-Api-Key"}
    other_port = {**shown, "url": "https://crm.example:8443/{id}"}
    with pytest.raises(InvalidJob):
        validate(other_port, previous=previous)


def test_a_new_job_cannot_take_the_mask_as_its_secret() -> None:
    with pytest.raises(InvalidJob) as caught:
        validate(_secret_job(token="***", basic_auth=None))
    assert [p.field for p in caught.value.problems] == ["token"]


def test_header_values_must_be_latin1_and_datamaps_bounded() -> None:
    with pytest.raises(InvalidJob) as caught:
        validate(_secret_job(headers={"X-Coffee": "☕"}))
    assert [p.field for p in caught.value.problems] == ["headers.X-Coffee"]
    huge = {f"k{i}": "$.msg.id" for i in range(101)}
    with pytest.raises(InvalidJob) as caught:
        validate(_secret_job(datamap=huge, url="https://crm.example/x"))
    assert [p.field for p in caught.value.problems] == ["datamap"]
    with pytest.raises(InvalidJob):
        validate(_secret_job(datamap={"id": "$.msg." + "a" * 1001}))


# --- SPEC §8, beyond that: credentials in URLs, connection headers, topics, references ----


@pytest.mark.parametrize("url", ["http://user:pw@h/{id}", "https://user@h/{id}", "http://:pw@h/x",
                                 "http://@h/{id}", "http://u:p@h:8080/{id}?a={name}"])
def test_credentials_in_the_url_are_refused(url: str) -> None:
    problems = problems_of(minimal(url=url))
    assert [p.field for p in problems] == ["url"]
    assert "basic_auth" in problems[0].reason
    assert "pw" not in problems[0].reason.replace("password", "")  # the value is never echoed


def test_redact_masks_credentials_of_a_url_stored_before_they_were_refused() -> None:
    stored = {**validate(minimal()).stored(), "url": "http://user:hunter2@h.example:81/x/{id}"}
    shown = redact(stored)
    assert shown["url"] == "http://***@h.example:81/x/{id}"


@pytest.mark.parametrize("name", ["Host", "host", "Content-Length", "Transfer-Encoding", "Connection",
                                  "Upgrade", "TE", "Trailer", "Keep-Alive", "Proxy-Authorization",
                                  "proxy-connection", "Proxy-Anything"])
def test_connection_level_headers_are_refused(name: str) -> None:
    problems = problems_of(minimal(headers={name: "x", "X-Fine": "y"}))
    assert [p.field for p in problems] == [f"headers.{name}"]
    assert "connection" in problems[0].reason


def test_every_bad_header_is_listed_at_once() -> None:
    problems = problems_of(minimal(headers={"Host": "a", "Content-Length": "5", "TE": "x",
                                            "Accept": "json"}))
    assert [p.field for p in problems] == ["headers.Host", "headers.Content-Length", "headers.TE"]


LIMITS = model.Policy(topic_limits={"alice": ("aether.*", "shared.people")})


def test_topic_limits_apply_to_source_dead_letter_and_result_topics() -> None:
    ok = minimal(topic=["aether.people", "shared.people"], dead_letter_topic="aether.dead")
    assert validate(ok, policy=LIMITS).topics == ["aether.people", "shared.people"]
    bad = minimal(topic=["aether.people", "hr.salaries", "shared.peoplex"],
                  dead_letter_topic="hr.dead")
    problems = problems_of(bad, policy=LIMITS)
    assert [p.field for p in problems] == ["topic[1]", "topic[2]", "dead_letter_topic"]
    assert "owner 'alice'" in problems[0].reason and "aether.*" in problems[0].reason


def test_the_default_dead_letter_topic_is_always_allowed() -> None:
    assert validate(minimal(topic="aether.x"), policy=LIMITS).dead_letter_topic == \
        "restconsumer.deadletter.job-1"
    named = minimal(topic="aether.x", dead_letter_topic="restconsumer.deadletter.job-1")
    assert validate(named, policy=LIMITS)


def test_owners_without_limits_use_any_topic() -> None:
    assert validate(minimal(owner="bob", topic="hr.salaries"), policy=LIMITS)


def test_globs_are_shell_style_and_case_sensitive() -> None:
    assert fields_of(minimal(topic="Aether.people"), policy=LIMITS) == {"topic[0]"}
    policy = model.Policy(topic_limits={"alice": ("t?.[ab]*",)})
    assert validate(minimal(topic=["t1.alpha", "t2.b"]), policy=policy)
    assert fields_of(minimal(topic="t10.a"), policy=policy) == {"topic[0]"}


def test_an_output_topic_that_is_also_a_source_is_refused() -> None:
    problems = problems_of(minimal(topic=["a", "b"], dead_letter_topic="b"))
    assert [p.field for p in problems] == ["dead_letter_topic"]
    assert "source topic" in problems[0].reason
    assert fields_of(minimal(topic=["restconsumer.deadletter.job-1"])) == {"topic"}


def test_limits_are_checked_again_on_load() -> None:
    stored = validate(minimal(topic="hr.salaries")).stored()
    assert load(stored)
    with pytest.raises(InvalidJob) as caught:
        load(stored, LIMITS)
    assert [p.field for p in caught.value.problems] == ["topic[0]"]


FILES = model.Policy(files_allowed=True)


@pytest.mark.parametrize("field_name, value", [
    ("token", "${env:RESTCONSUMER_SECRET_CRM}"),
    ("token", "${file:crm-token}"),
    ("basic_auth", {"user": "u", "pw": "${env:RESTCONSUMER_SECRET_PW_1}"}),
    ("headers", {"X-Api-Key": "${file:api.key}", "Authorization": "${env:RESTCONSUMER_SECRET_A}"}),
])
def test_secret_references_are_kept_and_shown_as_they_are(field_name: str, value: Any) -> None:
    job = validate(minimal(**{field_name: value}), policy=FILES)
    assert job.definition[field_name] == value
    assert job.public()[field_name] == value


@pytest.mark.parametrize("value, words", [
    ("${env:RESTCONSUMER_API_TOKEN}", "RESTCONSUMER_SECRET_"),
    ("${env:HOME}", "RESTCONSUMER_SECRET_"),
    ("${env:RESTCONSUMER_SECRET_}", "RESTCONSUMER_SECRET_"),
    ("${env:RESTCONSUMER_SECRET_KEY_FILE}", "own setting"),
    ("${env:RESTCONSUMER_SECRET_A-B}", "RESTCONSUMER_SECRET_"),
    ("${file:../tokens.json}", "directly inside"),
    ("${file:/etc/passwd}", "directly inside"),
    ("${file:.hidden}", "directly inside"),
    ("${file:a/b}", "directly inside"),
    ("${file:}", "directly inside"),
    ("${vault:x}", "is not a secret reference"),
    ("${env:RESTCONSUMER_SECRET_X", "whole value"),
    ("Bearer ${env:RESTCONSUMER_SECRET_X}", "whole value"),
])
def test_references_outside_what_may_be_read_are_refused(value: str, words: str) -> None:
    problems = problems_of(minimal(token=value), policy=FILES)
    assert [p.field for p in problems] == ["token"]
    assert words in problems[0].reason


def test_file_references_need_a_secrets_dir() -> None:
    problems = problems_of(minimal(token="${file:crm}"))
    assert [p.field for p in problems] == ["token"]
    assert "--secrets-dir" in problems[0].reason


def test_references_only_in_secret_fields() -> None:
    raw = minimal(headers={"X-Tenant": "${env:RESTCONSUMER_SECRET_T}"},
                  basic_auth={"user": "${env:RESTCONSUMER_SECRET_U}", "pw": "p"})
    problems = problems_of(raw)
    assert [p.field for p in problems] == ["headers.X-Tenant", "basic_auth.user"]
    assert all("only a secret field" in p.reason for p in problems)


def test_every_reference_problem_is_listed_at_once() -> None:
    raw = minimal(basic_auth={"user": "u", "pw": "${env:PATH}"},
                  headers={"X-Api-Key": "${file:../x}", "Host": "h"})
    assert fields_of(raw) == {"basic_auth.pw", "headers.X-Api-Key", "headers.Host"}


def test_hash_covers_secrets_through_the_digest_only() -> None:
    def digest(value: str) -> str:
        return "d" + str(len(value))

    keyed = model.Policy(secret_digest=digest)
    one = validate(minimal(token="aaaa"), policy=keyed)
    same_length = validate(minimal(token="bbbb"), policy=keyed)
    longer = validate(minimal(token="aaaaa"), policy=keyed)
    assert one.hash == same_length.hash != longer.hash  # only the digest entered the hash
    assert one.hash != validate(minimal(token="aaaa")).hash
    reference = validate(minimal(token="${env:RESTCONSUMER_SECRET_T}"), policy=keyed)
    other = validate(minimal(token="${env:RESTCONSUMER_SECRET_U}"), policy=keyed)
    assert reference.hash != other.hash  # a reference is hashed as it is


def test_restoring_a_hidden_secret_checks_the_origin_it_is_sent_to() -> None:
    """oauth2 comes with SPEC §12: its client secret follows token_url, not url."""
    previous = {"url": "https://api.example/x", "token": "t-old",
                "oauth2": {"token_url": "https://idp.example/token", "client_secret": "cs-old"}}
    same_idp = {"url": "https://other.example/x", "token": REDACTED,
                "oauth2": {"token_url": "https://idp.example/token2", "client_secret": REDACTED}}
    model._restore_secrets(same_idp, previous)
    assert same_idp["oauth2"]["client_secret"] == "cs-old"  # same token_url origin
    assert same_idp["token"] == REDACTED  # url moved: not restored
    moved_idp = {"url": "https://api.example/y", "token": REDACTED,
                 "oauth2": {"token_url": "https://evil.example/token", "client_secret": REDACTED}}
    model._restore_secrets(moved_idp, previous)
    assert moved_idp["token"] == "t-old"
    assert moved_idp["oauth2"]["client_secret"] == REDACTED
    problems: list[model.Problem] = []
    model._refuse_hidden(moved_idp, problems)
    assert [(p.field, "oauth2.token_url" in p.reason) for p in problems] == \
        [("oauth2.client_secret", True)]


def test_an_empty_secret_is_refused() -> None:
    raw = minimal(basic_auth={"user": "u", "pw": ""}, headers={"X-Api-Key": "", "X-Note": ""})
    problems = problems_of(raw)
    assert [p.field for p in problems] == ["basic_auth.pw", "headers.X-Api-Key"]
    assert all("empty secret" in p.reason for p in problems)
    assert fields_of(minimal(token="")) == {"token"}


# -- SPEC §12 -----------------------------------------------------------------------------


def test_start_from_and_success_status_are_kept_normalised() -> None:
    job = validate(minimal(start_from="Latest", success_status=[409, 302]))
    assert job.definition["start_from"] == "latest"
    assert job.definition["success_status"] == [409, 302]
    assert validate(minimal(start_from="earliest")).definition["start_from"] == "earliest"


@pytest.mark.parametrize(("changes", "field"), [
    ({"start_from": "middle"}, "start_from"),
    ({"start_from": 0}, "start_from"),
    ({"success_status": 409}, "success_status"),
    ({"success_status": ["409"]}, "success_status[0]"),
    ({"success_status": [True]}, "success_status[0]"),
    ({"success_status": [200, 600]}, "success_status[1]"),
    ({"success_status": [409, 409]}, "success_status[1]"),
])
def test_start_from_and_success_status_misuse_is_refused(changes: dict[str, Any], field: str) -> None:
    assert fields_of(minimal(**changes)) == {field}


def test_header_placeholders_name_datamap_keys() -> None:
    job = validate(minimal(headers={"X-Person": "p-{id}", "Authorization": "Bearer {x}"},
                           idempotency_key=True))
    assert job.definition["headers"]["X-Person"] == "p-{id}"
    assert job.definition["idempotency_key"] is True
    assert fields_of(minimal(headers={"X-Person": "{nope}"})) == {"headers.X-Person"}
    assert fields_of(minimal(headers={"X-Person": "{}"})) == {"headers.X-Person"}
    assert fields_of(minimal(idempotency_key="yes")) == {"idempotency_key"}


def test_a_batched_jobs_headers_hold_no_placeholders() -> None:
    raw = minimal(url="http://api.example.com/people", json_body=["id"], headers={"X-Id": "{id}"},
                  batch={"max_messages": 10})
    assert fields_of(raw) == {"headers.X-Id"}
    assert validate({**raw, "headers": {"X-Id": "static"}}).definition["headers"] == {"X-Id": "static"}


def test_a_filter_must_be_valid_jsonpath() -> None:
    assert validate(minimal(filter="$[?(@.msg.status == 'approved')]")).definition["filter"] == \
        "$[?(@.msg.status == 'approved')]"
    assert fields_of(minimal(filter="$[?(@.msg.status == ")) == {"filter"}
    assert fields_of(minimal(filter="")) == {"filter"}
    assert fields_of(minimal(filter=5)) == {"filter"}
    assert fields_of(minimal(filter="$" + "a" * 1000)) == {"filter"}


def test_signing_takes_a_standard_webhooks_secret_which_is_a_secret() -> None:
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    job = validate(minimal(signing={"secret": secret}))
    assert job.definition["signing"] == {"secret": secret, "scheme": "standard-webhooks"}
    assert job.public()["signing"]["secret"] == REDACTED
    assert secret not in json.dumps(job.public())
    again = validate(minimal(signing={"secret": REDACTED}), previous=job.stored())
    assert again.definition["signing"]["secret"] == secret
    elsewhere = minimal(url="http://other.example.com/people/{id}/", signing={"secret": REDACTED})
    assert fields_of(elsewhere, previous=job.stored()) == {"signing.secret"}
    assert validate(minimal(signing={"secret": "${env:RESTCONSUMER_SECRET_SIGN}"})).definition[
        "signing"]["secret"] == "${env:RESTCONSUMER_SECRET_SIGN}"


@pytest.mark.parametrize(("signing", "field"), [
    ({"secret": "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}, "signing.secret"),
    ({"secret": "whsec_not base64!"}, "signing.secret"),
    ({"secret": "whsec_"}, "signing.secret"),
    ({}, "signing.secret"),
    ({"secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "scheme": "github"}, "signing.scheme"),
    ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "signing"),
])
def test_signing_misuse_is_refused(signing: Any, field: str) -> None:
    problems = problems_of(minimal(signing=signing))
    assert {p.field for p in problems} == {field}
    assert not any("not base64!" in p.reason for p in problems), "a problem quoted the secret"


def test_the_signing_secret_is_encrypted_at_rest() -> None:
    from cryptography.fernet import Fernet

    from restconsumer.jobs.secrets import SecretKey, open_definition, seal_definition
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    key = SecretKey([Fernet.generate_key()])
    stored = validate(minimal(signing={"secret": secret})).stored()
    sealed = seal_definition(stored, key)
    assert secret not in json.dumps(sealed)
    assert open_definition(sealed, key) == (stored, [])


def test_a_result_topic_is_a_topic_name_and_not_a_source() -> None:
    assert validate(minimal(result_topic="people.results")).definition["result_topic"] == "people.results"
    assert fields_of(minimal(result_topic="no spaces")) == {"result_topic"}
    assert fields_of(minimal(result_topic="people")) == {"result_topic"}


def test_oauth2_client_credentials_and_its_secret() -> None:
    oauth = {"token_url": "https://auth.example.com/token", "client_id": "svc",
             "client_secret": "cs-model-1", "scope": "people:write"}
    job = validate(minimal(oauth2=oauth))
    assert job.definition["oauth2"] == oauth
    assert job.public()["oauth2"]["client_secret"] == REDACTED
    back = validate(minimal(oauth2={**oauth, "client_secret": REDACTED}), previous=job.stored())
    assert back.definition["oauth2"]["client_secret"] == "cs-model-1"
    # Restored only while the token URL keeps its origin (not the job's url).
    moved = minimal(oauth2={**oauth, "token_url": "https://evil.example.com/token",
                            "client_secret": REDACTED})
    assert fields_of(moved, previous=job.stored()) == {"oauth2.client_secret"}


@pytest.mark.parametrize(("changes", "fields"), [
    ({"oauth2": {"token_url": "https://a/t", "client_id": "c"}}, {"oauth2.client_secret"}),
    ({"oauth2": {"token_url": "ftp://a/t", "client_id": "c", "client_secret": "s"}}, {"oauth2.token_url"}),
    ({"oauth2": {"token_url": "https://a/t", "client_id": "c", "client_secret": "s"},
      "token": "t"}, {"oauth2"}),
    ({"oauth2": {"token_url": "https://a/t", "client_id": "c", "client_secret": "s"},
      "basic_auth": {"user": "u", "pw": "p"}}, {"oauth2"}),
    ({"oauth2": {"token_url": "https://a/t", "client_id": "c", "client_secret": "s", "scope": 1}},
     {"oauth2.scope"}),
    ({"oauth2": {"token_url": "https://a/t", "client_id": "c", "client_secret": "s", "x": 1}},
     {"oauth2.x"}),
])
def test_oauth2_misuse_is_refused(changes: dict[str, Any], fields: set[str]) -> None:
    assert fields_of(minimal(**changes)) == fields
