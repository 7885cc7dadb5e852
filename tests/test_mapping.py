"""Unit tests of restconsumer.jobs.mapping: JSONPath document, datamap, URL template, body, auth (SPEC §4).

Jobs are built with :func:`restconsumer.jobs.model.validate`, exactly as the service builds them.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonpath_ng.ext import parse as parse_uncached

from restconsumer.jobs.decode import to_json
from restconsumer.jobs.mapping import Outgoing, RequestBuilder, TemplateError, compile_getter, encode_value
from restconsumer.jobs.model import Job, parse_jsonpath, validate

META = {"topic": "people", "partition": 3, "offset": 1234, "key": "k-1", "timestamp": 1700000000000}


def job(**changes: Any) -> Job:
    """A valid job, with ``changes`` applied to a small definition (None removes a field)."""
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
    return validate(raw)


def builder(**changes: Any) -> RequestBuilder:
    """The request builder of :func:`job`."""
    return RequestBuilder(job(**changes))


def render(value: Any) -> str:
    """A value as :func:`encode_value` puts it in the URL, before percent-encoding."""
    return value if isinstance(value, str) else to_json(value).decode("utf-8")


def url_of(out: Outgoing) -> str:
    """The request's URL as text."""
    return out.url.decode("ascii")


# -- the document and the datamap ------------------------------------------------------------


def test_document_has_schema_msg_constant_and_meta() -> None:
    b = builder(constant={"source": "aether", "n": 2})
    schema = {"type": "record", "name": "Person"}
    msg = {"id": "p-1"}
    assert b.document(schema, msg, META) == {
        "schema": schema, "msg": msg, "constant": {"source": "aether", "n": 2}, "meta": META}


def test_document_constant_is_empty_without_constants() -> None:
    assert builder().document(None, "text", META)["constant"] == {}


def test_datamap_reads_schema_msg_constant_and_meta() -> None:
    b = builder(
        datamap={"id": "$.msg.id", "schema_name": "$.schema.name", "src": "$.constant.source",
                 "offset": "$.meta.offset", "topic": "$.meta.topic", "key": "$.meta.key"},
        constant={"source": "aether"},
    )
    values = b.extract(b.document({"name": "Person"}, {"id": "p-1"}, META))
    assert values == {"id": "p-1", "schema_name": "Person", "src": "aether", "offset": 1234,
                      "topic": "people", "key": "k-1"}


def test_datamap_no_match_leaves_the_key_out() -> None:
    b = builder(datamap={"id": "$.msg.id", "name": "$.msg.name", "deep": "$.msg.a.b.c"})
    values = b.extract(b.document(None, {"id": 7, "a": {"b": "not a dict"}}, META))
    assert values == {"id": 7}
    assert "name" not in values
    assert "deep" not in values


def test_datamap_one_match_is_its_value() -> None:
    b = builder(datamap={"id": "$.msg.id", "household": "$.msg.household", "n": "$.msg.none"})
    household = {"id": "h-1", "members": [1, 2]}
    values = b.extract(b.document(None, {"id": "p-1", "household": household, "none": None}, META))
    assert values == {"id": "p-1", "household": household, "n": None}


def test_datamap_several_matches_make_a_list() -> None:
    b = builder(datamap={"id": "$.msg.id", "ids": "$.msg.items[*].id"})
    msg = {"id": "p", "items": [{"id": 1}, {"id": 2}, {"other": 0}, {"id": "three"}]}
    assert b.extract(b.document(None, msg, META)) == {"id": "p", "ids": [1, 2, "three"]}


def test_wildcard_with_a_single_match_is_the_value_not_a_list() -> None:
    b = builder(datamap={"id": "$.msg.id", "ids": "$.msg.items[*].id"})
    values = b.extract(b.document(None, {"id": "p", "items": [{"id": 9}]}, META))
    assert values["ids"] == 9


def test_wildcard_with_no_match_leaves_the_key_out() -> None:
    b = builder(datamap={"id": "$.msg.id", "ids": "$.msg.items[*].id"})
    assert b.extract(b.document(None, {"id": "p", "items": []}, META)) == {"id": "p"}


def test_filter_path_still_works() -> None:
    b = builder(datamap={"id": "$.msg.id", "big": "$.msg.items[?(@.x > 1)].id"})
    msg = {"id": "p", "items": [{"x": 0, "id": "a"}, {"x": 2, "id": "b"}, {"x": 5, "id": "c"}]}
    assert b.extract(b.document(None, msg, META))["big"] == ["b", "c"]
    msg = {"id": "p", "items": [{"x": 0, "id": "a"}, {"x": 3, "id": "b"}]}
    assert b.extract(b.document(None, msg, META))["big"] == "b"
    msg = {"id": "p", "items": [{"x": 0, "id": "a"}]}
    assert "big" not in b.extract(b.document(None, msg, META))


def test_descendant_and_field_wildcard_paths_still_work() -> None:
    b = builder(datamap={"id": "$.msg.id", "all": "$..name", "fields": "$.msg.h.*"})
    msg = {"id": "p", "h": {"name": "x", "k": 1}, "name": "top"}
    values = b.extract(b.document(None, msg, META))
    assert sorted(values["all"]) == ["top", "x"]
    assert sorted(values["fields"], key=str) == [1, "x"]


@pytest.mark.parametrize(("datamap", "extra", "needs"), [
    ({"id": "$.msg.id", "n": "$.msg.items[0].name"}, {}, False),
    ({"id": "$.msg.id", "k": "$.meta.key"}, {}, True),
    ({"id": "$.msg.id", "any": "$..offset"}, {}, True),
    ({"id": "$.msg.id", "all": "$"}, {}, True),
    ({"id": "$.msg.id", "x": "$.msg.items[*].x"}, {}, True),
    ({"id": "$.msg.id"}, {"filter": "$[?(@.msg.id == 'a')]"}, True),
])
def test_the_meta_of_a_record_is_made_only_when_the_job_can_read_it(
        datamap: dict[str, str], extra: dict[str, Any], needs: bool) -> None:
    from restconsumer.jobs.work import Incoming, prepare

    b = builder(datamap=datamap, url="http://api.example.com/people/", json_body=list(datamap), **extra)
    assert b.needs_meta is needs
    incoming = Incoming("people", 3, 1234, b"k-1", b'{"id": "a", "items": [{"name": "n", "x": 1}]}',
                        [], 1700000000000)
    [work] = prepare(b, incoming).records
    # What the job reads is the same either way: the full document's values.
    full = b.document(None, {"id": "a", "items": [{"name": "n", "x": 1}]}, incoming.meta())
    assert work.request is not None
    assert work.request.body == b.build(b.extract(full)).body
    assert json.loads(work.request.body or b"")["id"] == "a"


def test_constant_urls_and_json_bodies_are_made_as_before() -> None:
    b = builder(url="http://api.example.com/people/?x=1", json_body=["id", "name"],
                query_params=["id"])
    out = b.build({"id": "a/b", "name": "Zoë", "n": float("nan")})
    assert out.url == b"http://api.example.com/people/?x=1&id=a%2Fb"
    assert out.body == '{"id":"a/b","name":"Zoë"}'.encode()
    assert to_json({"f": 1.5, "n": float("nan"), "b": b"\x01", "s": "\ud800", "l": [1, None, True]}) == \
        b'{"f":1.5,"n":NaN,"b":"AQ==","s":"\\ud800","l":[1,null,true]}'


def test_datamap_on_a_plain_text_message() -> None:
    b = builder(datamap={"id": "$.msg.id", "text": "$.msg"})
    assert b.extract(b.document(None, "just text", META)) == {"text": "just text"}


# -- compile_getter --------------------------------------------------------------------------

FIELD_PATHS = ["$.a", "$.a.b", "$.a.b.c", "$.b.a", "$.a.a.a.a", '$."a.b"', "$.msg.household.id"]

#: Compiled once for the property test (compiling takes milliseconds); never changed.
COMPILED_FIELD_PATHS = {expression: parse_uncached(expression) for expression in FIELD_PATHS}


def fast_getter(expression: str) -> Callable[[Any], list[Any]]:
    """compile_getter's function for ``expression``, on a path whose jsonpath-ng search fails:
    it answers only if it took the fast path (a plain chain of names and indexes)."""
    path = parse_uncached(expression)
    get = compile_getter(path)

    def refuse(_: Any) -> Any:
        raise AssertionError(f"{expression}: the fast path called jsonpath-ng")

    path.find = refuse  # type: ignore[method-assign]
    return get


def jsonpath_ng_finds(expression: str, doc: Any) -> list[Any]:
    """The values jsonpath-ng itself finds, on a path parsed anew (not the one compiled)."""
    return [match.value for match in parse_uncached(expression).find(doc)]


#: The fast getters of the property test, made once.
FAST_FIELD_GETTERS = {expression: fast_getter(expression) for expression in FIELD_PATHS}

SPECIAL_PATHS = ["$.a[*]", "$.a[*].b", "$.a.*", "$..b", "$.a[?(@.b > 1)].c", "$.a[1:3]"]

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text("abc", max_size=3),
                         st.floats(allow_nan=False, allow_infinity=False))
json_documents = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(["a", "b", "c", "a.b", "msg", "household", "id"]),
                        children, max_size=4),
    ),
    max_leaves=20,
)


def fixed_documents() -> list[Any]:
    """Documents with the keys present, missing, or holding the wrong type."""
    leaves: list[Any] = [None, True, False, 0, 1, -1, 2.5, "", "abc", [], {}, [1, 2], {"c": 1}]
    docs: list[Any] = list(leaves)
    for leaf in leaves:
        docs += [{"a": leaf}, {"a": {"b": leaf}}, {"a": {"b": {"c": leaf}}}, {"b": {"a": leaf}},
                 {"a": [leaf]}, {"a": [{"b": leaf}]}, {"a.b": leaf}, {"a": {"a": {"a": {"a": leaf}}}},
                 {"msg": {"household": {"id": leaf}}}, {"msg": {"household": [leaf]}}]
    return docs


@pytest.mark.parametrize("expression", FIELD_PATHS)
def test_fast_path_agrees_with_jsonpath_ng_on_fixed_documents(expression: str) -> None:
    get = fast_getter(expression)
    found = 0
    for doc in fixed_documents():
        expected = jsonpath_ng_finds(expression, doc)
        assert get(doc) == expected, (expression, doc)
        found += len(expected)
    assert found > 0, "no document had a match: nothing was compared"


@settings(max_examples=300, deadline=None)
@given(doc=json_documents, expression=st.sampled_from(FIELD_PATHS))
def test_fast_path_agrees_with_jsonpath_ng_on_any_document(doc: Any, expression: str) -> None:
    expected = [m.value for m in COMPILED_FIELD_PATHS[expression].find(doc)]
    assert FAST_FIELD_GETTERS[expression](doc) == expected


@pytest.mark.parametrize("expression", FIELD_PATHS)
def test_plain_field_chains_do_not_go_through_jsonpath_ng(expression: str) -> None:
    doc = {"a": {"b": {"c": 1}, "a": {"a": {"a": 2}}}, "b": {"a": 3}, "a.b": 4,
           "msg": {"household": {"id": 5}}}
    expected = jsonpath_ng_finds(expression, doc)
    assert fast_getter(expression)(doc) == expected
    assert len(expected) == 1


@pytest.mark.parametrize("expression", SPECIAL_PATHS)
def test_special_paths_agree_with_jsonpath_ng(expression: str) -> None:
    get = compile_getter(parse_uncached(expression))
    docs = [
        {"a": [{"b": 1, "c": "x"}, {"b": 2, "c": "y"}, {"b": 3, "c": "z"}, {"c": "w"}]},
        {"a": {"b": 5, "c": 6}},
        {"a": []},
        {"b": {"b": {"b": 1}}},
        {},
    ]
    for doc in docs:
        assert get(doc) == jsonpath_ng_finds(expression, doc), (expression, doc)


def test_filter_getter_selects_the_matching_items() -> None:
    get = compile_getter(parse_uncached("$.msg.items[?(@.x > 1)].id"))
    doc = {"msg": {"items": [{"x": 1, "id": "a"}, {"x": 2, "id": "b"}, {"x": 9, "id": "c"}]}}
    assert get(doc) == ["b", "c"]


def test_wildcard_getter_gives_every_item() -> None:
    get = compile_getter(parse_uncached("$.msg.items[*].id"))
    assert get({"msg": {"items": [{"id": 1}, {"id": 2}]}}) == [1, 2]
    assert get({"msg": {"items": [{"no": 1}]}}) == []


# -- URL building ----------------------------------------------------------------------------


def test_url_value_is_percent_encoded_into_one_component() -> None:
    b = builder()
    out = b.build({"id": "a/b?c=d&e#f g%2F"})
    assert url_of(out) == "http://api.example.com/people/a%2Fb%3Fc%3Dd%26e%23f%20g%252F/"
    parts = urlsplit(url_of(out))
    assert parts.netloc == "api.example.com"
    assert parts.path.split("/") == ["", "people", "a%2Fb%3Fc%3Dd%26e%23f%20g%252F", ""]
    assert parts.query == ""
    assert parts.fragment == ""


@pytest.mark.parametrize("value", [".", ".."])
def test_dot_segments_are_encoded(value: str) -> None:
    out = builder().build({"id": value})
    segment = url_of(out).split("/")[4]
    assert segment == "%2E" * len(value)
    assert unquote(segment) == value


def test_other_dotted_values_stay_readable() -> None:
    assert url_of(builder().build({"id": "a.b"})) == "http://api.example.com/people/a.b/"


def test_value_cannot_change_the_host() -> None:
    b = builder(url="http://api.example.com/{id}")
    for evil in ["@evil.org", ":1@evil.org", ".evil.org", "/../../x", "\\evil.org"]:
        parts = urlsplit(url_of(b.build({"id": evil})))
        assert parts.hostname == "api.example.com"
        assert parts.port is None


def test_non_ascii_values_are_utf8_percent_encoded() -> None:
    out = builder().build({"id": "Zoë/你"})
    assert url_of(out) == "http://api.example.com/people/Zo%C3%AB%2F%E4%BD%A0/"


@pytest.mark.parametrize(("value", "encoded"), [
    (5, "5"),
    (-1.5, "-1.5"),
    (True, "true"),
    (None, "null"),
    ([1, "a"], "%5B1%2C%22a%22%5D"),
    ({"k": "v"}, "%7B%22k%22%3A%22v%22%7D"),
])
def test_non_string_values_are_written_as_json(value: Any, encoded: str) -> None:
    assert encode_value(value) == encoded
    assert url_of(builder().build({"id": value})) == f"http://api.example.com/people/{encoded}/"


def test_missing_url_key_is_a_template_error() -> None:
    b = builder()
    with pytest.raises(TemplateError, match="id"):
        b.build({"name": "x"})
    assert issubclass(TemplateError, ValueError)


def test_missing_url_key_after_extraction_is_a_template_error() -> None:
    b = builder()
    values = b.extract(b.document(None, {"name": "no id here"}, META))
    with pytest.raises(TemplateError):
        b.build(values)


def test_several_placeholders() -> None:
    b = builder(url="https://api.example.com/h/{hh}/p/{id}", datamap={"id": "$.msg.id", "hh": "$.msg.h"})
    out = b.build(b.extract(b.document(None, {"id": "p 1", "h": "h/2"}, META)))
    assert url_of(out) == "https://api.example.com/h/h%2F2/p/p%201"


def test_literal_template_text_is_made_ascii() -> None:
    b = builder(url="http://api.example.com/café/{id}?q=a b&k=%20")
    assert url_of(b.build({"id": "x"})) == "http://api.example.com/caf%C3%A9/x?q=a%20b&k=%20"


def test_placeholder_in_the_query_of_the_template() -> None:
    b = builder(url="http://api.example.com/people?id={id}&v=1")
    out = url_of(b.build({"id": "a&b=c"}))
    assert out == "http://api.example.com/people?id=a%26b%3Dc&v=1"
    assert parse_qs(urlsplit(out).query) == {"id": ["a&b=c"], "v": ["1"]}


def test_query_params_start_with_a_question_mark() -> None:
    b = builder(datamap={"id": "$.msg.id", "name": "$.msg.name", "n": "$.msg.n"},
                query_params=["name", "n"])
    out = b.build({"id": "p", "name": "Zoë & co", "n": 3})
    assert url_of(out) == "http://api.example.com/people/p/?name=Zo%C3%AB%20%26%20co&n=3"


def test_query_params_follow_a_query_in_the_template_with_an_ampersand() -> None:
    b = builder(url="http://api.example.com/people/{id}?fixed=1", query_params=["name"])
    assert url_of(b.build({"id": "p", "name": "n"})) == "http://api.example.com/people/p?fixed=1&name=n"


def test_query_params_list_values_are_repeated() -> None:
    b = builder(datamap={"id": "$.msg.id", "tags": "$.msg.tags[*]"}, query_params=["tags"])
    values = b.extract(b.document(None, {"id": "p", "tags": ["a", "b c", "d&e"]}, META))
    out = url_of(b.build(values))
    assert out == "http://api.example.com/people/p/?tags=a&tags=b%20c&tags=d%26e"
    assert parse_qs(urlsplit(out).query) == {"tags": ["a", "b c", "d&e"]}


def test_missing_query_params_are_left_out() -> None:
    b = builder(datamap={"id": "$.msg.id", "name": "$.msg.name", "age": "$.msg.age"},
                query_params=["name", "age"])
    assert url_of(b.build({"id": "p"})) == "http://api.example.com/people/p/"
    assert url_of(b.build({"id": "p", "age": 4})) == "http://api.example.com/people/p/?age=4"


def test_query_param_values_that_are_not_strings() -> None:
    b = builder(datamap={"id": "$.msg.id", "x": "$.msg.x"}, query_params=["x"])
    assert url_of(b.build({"id": "p", "x": None})).endswith("?x=null")
    assert url_of(b.build({"id": "p", "x": False})).endswith("?x=false")
    assert url_of(b.build({"id": "p", "x": [1, [2, 3]]})).endswith("?x=1&x=%5B2%2C3%5D")


def test_url_is_ascii_bytes() -> None:
    out = builder().build({"id": "✓"})
    assert isinstance(out.url, bytes)
    out.url.decode("ascii")


# -- body, method, headers -------------------------------------------------------------------


def test_json_body_takes_only_matched_keys() -> None:
    b = builder(datamap={"id": "$.msg.id", "name": "$.msg.name", "size": "$.msg.h.size"},
                json_body=["id", "name", "size"])
    values = b.extract(b.document(None, {"id": "p", "h": {"size": 4}}, META))
    out = b.build(values)
    assert json.loads(out.body) == {"id": "p", "size": 4}
    assert out.headers[b"Content-Type"] == [b"application/json"]


def test_json_body_does_not_take_unlisted_keys() -> None:
    b = builder(datamap={"id": "$.msg.id", "name": "$.msg.name"}, json_body=["name"])
    out = b.build({"id": "p", "name": "Zoë"})
    assert out.body == '{"name":"Zoë"}'.encode()


def test_json_body_with_nothing_matched_is_an_empty_object() -> None:
    b = builder(datamap={"id": "$.msg.id", "name": "$.msg.name"}, json_body=["name"])
    out = b.build({"id": "p"})
    assert json.loads(out.body) == {}


def test_no_json_body_means_no_body_and_no_content_type() -> None:
    out = builder().build({"id": "p", "name": "x"})
    assert out.body is None
    assert b"Content-Type" not in out.headers


def test_method_is_bytes_and_upper_case() -> None:
    assert builder(type="put").build({"id": "p"}).method == b"PUT"
    assert builder(type="DELETE").build({"id": "p"}).method == b"DELETE"


def test_entity_id_is_the_id_value() -> None:
    assert builder().build({"id": 42}).entity_id == 42
    b = builder(datamap={"key": "$.msg.k"}, url="http://api.example.com/{key}")
    assert b.build({"key": "x"}).entity_id is None


def test_basic_auth_header() -> None:
    out = builder(basic_auth={"user": "u", "pw": "pässword:1"}).build({"id": "p"})
    [value] = out.headers[b"Authorization"]
    assert value.startswith(b"Basic ")
    assert base64.b64decode(value[6:]) == "u:pässword:1".encode()


def test_basic_auth_accepts_password_for_pw() -> None:
    out = builder(basic_auth={"user": "admin", "password": "s3cret"}).build({"id": "p"})
    assert out.headers[b"Authorization"] == [b"Basic " + base64.b64encode(b"admin:s3cret")]


def test_token_is_sent_as_bearer() -> None:
    out = builder(token="abc.def").build({"id": "p"})
    assert out.headers[b"Authorization"] == [b"Bearer abc.def"]


def test_token_type_changes_the_word() -> None:
    out = builder(token="abc", token_type="Token").build({"id": "p"})
    assert out.headers[b"Authorization"] == [b"Token abc"]


def test_no_auth_means_no_authorization_header() -> None:
    assert b"Authorization" not in builder().build({"id": "p"}).headers


def test_static_headers_are_added() -> None:
    b = builder(headers={"X-Api-Key": "k-1", "Accept": "application/json"}, token="t",
                json_body=["id"])
    headers = b.build({"id": "p"}).headers
    assert headers[b"X-Api-Key"] == [b"k-1"]
    assert headers[b"Accept"] == [b"application/json"]
    assert headers[b"Authorization"] == [b"Bearer t"]
    assert headers[b"Content-Type"] == [b"application/json"]


def test_each_record_gets_its_own_request() -> None:
    b = builder(datamap={"id": "$.msg.id", "name": "$.msg.name"}, json_body=["name"])
    rng = random.Random(7)
    for i in range(50):
        name = "".join(rng.choice("ab/ &?é") for _ in range(rng.randint(0, 8)))
        out = b.build(b.extract(b.document(None, {"id": i, "name": name}, META)))
        assert url_of(out) == f"http://api.example.com/people/{i}/"
        assert json.loads(out.body) == {"name": name}


# -- property: message data never changes the URL's structure --------------------------------

url_values = st.recursive(
    st.one_of(
        st.text(st.characters(codec="utf-8")),
        st.integers(),
        st.floats(),
        st.booleans(),
        st.none(),
    ),
    lambda children: st.lists(children, max_size=4),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(value=url_values)
def test_any_value_stays_in_its_url_component(value: Any) -> None:
    b = builder(type="GET", datamap={"id": "$.msg.id"},
                url="http://example.org:8080/api/{id}/x?fixed=1", query_params=["id"])
    values = b.extract(b.document(None, {"id": value}, META))
    assert values == {"id": value}
    url = url_of(b.build({"id": value}))

    parts = urlsplit(url)
    assert parts.scheme == "http"
    assert parts.hostname == "example.org"
    assert parts.port == 8080
    assert parts.fragment == ""
    assert "#" not in url
    segments = parts.path.split("/")
    assert len(segments) == 4
    assert segments[:2] == ["", "api"]
    assert segments[3] == "x"
    assert unquote(segments[2], errors="strict") == render(value)

    items = value if isinstance(value, list) else [value]
    expected: dict[str, list[str]] = {"fixed": ["1"]}
    if items:
        expected["id"] = [render(item) for item in items]
    assert parse_qs(parts.query, keep_blank_values=True, strict_parsing=True,
                    errors="strict") == expected


@pytest.mark.parametrize(("expression", "document", "expected", "jsonpath_ng_raises"), [
    ("$.a.b[0].c", {"a": {"b": [{"c": 1}, {"c": 2}]}}, [1], None),
    ("$.a[-1]", {"a": [1, 2, 3]}, [3], None),
    ("$.a[0][1]", {"a": [[1, 2], [3]]}, [2], None),
    ("$.a[5]", {"a": [1]}, [], None),
    ("$.a[0]", {"a": "xyz"}, ["x"], None),
    ("$.a[1]", {"a": {"b": 1}}, [], None),
    ("$.a[0]", {"a": None}, [], None),
    # Where jsonpath-ng raises, the fast path finds nothing (the key is absent).
    ("$.a[0]", {"a": {"0": "dict"}}, [], KeyError),
    ("$.a[0]", {"a": 5}, [], TypeError),
    ("$.a[-4]", {"a": [1, 2, 3]}, [], IndexError),
])
def test_indexed_paths_take_the_fast_path(expression: str, document: Any, expected: list[Any],
                                          jsonpath_ng_raises: type[Exception] | None) -> None:
    """Paths with [n] indexes are walked directly, and agree with jsonpath-ng where it answers."""
    assert fast_getter(expression)(document) == expected
    if jsonpath_ng_raises is None:
        assert jsonpath_ng_finds(expression, document) == expected
    else:
        with pytest.raises(jsonpath_ng_raises):
            jsonpath_ng_finds(expression, document)
    # The service's own (cached) parse of it compiles to the same walk.
    assert compile_getter(parse_jsonpath(expression))(document) == expected


def test_a_lone_surrogate_is_a_template_error_not_a_crash() -> None:
    """A value JSON allows but UTF-8 does not fails that message cleanly (dead letter)."""
    job = validate({"id": "s", "owner": "o", "type": "POST", "topic": "t",
                    "datamap": {"id": "$.msg.id"}, "url": "http://h/{id}", "json_body": ["id"]})
    builder = RequestBuilder(job)
    with pytest.raises(TemplateError, match="surrogate"):
        builder.build({"id": "\ud800"})
    body_only = RequestBuilder(validate({**job.definition, "url": "http://h/x"}))
    assert json.loads(body_only.build({"id": "\ud800"}).body) == {"id": "\ud800"}
