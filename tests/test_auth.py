"""Unit tests of restconsumer.api.auth: admin token, user/password, owner-scoped tokens, tokens files."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from restconsumer.api.auth import Authenticator, Principal, load_token_file, load_tokens
from restconsumer.jobs.destinations import Destinations


def basic(user: str, password: str) -> bytes:
    """An ``Authorization`` header value for Basic auth."""
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


@pytest.fixture
def auth() -> Authenticator:
    """An authenticator with an admin token, an admin user and two owner-scoped tokens."""
    return Authenticator.configure("admin-token", "admin", "pa:ss wörd",
                                   {"alice-token": "alice", "bob-token": "bob"})


# --- principals ------------------------------------------------------------------


def test_principal_admin_and_owner() -> None:
    admin = Principal()
    assert admin.is_admin
    assert admin.may_see("alice") and admin.may_see("bob")
    alice = Principal("alice")
    assert not alice.is_admin
    assert alice.may_see("alice")
    assert not alice.may_see("bob")
    assert not alice.may_see("Alice")


# --- bearer ----------------------------------------------------------------------


@pytest.mark.parametrize("header", [b"Bearer admin-token", b"bearer admin-token", b"BEARER admin-token",
                                    b"  Bearer   admin-token  "])
def test_admin_token(auth: Authenticator, header: bytes) -> None:
    assert auth.authenticate(header) == Principal()


def test_scoped_tokens_name_their_owner(auth: Authenticator) -> None:
    alice = auth.authenticate(b"Bearer alice-token")
    assert alice == Principal("alice")
    assert alice is not None and not alice.is_admin
    assert auth.authenticate(b"Bearer bob-token") == Principal("bob")


def test_scoped_tokens_without_admin_token() -> None:
    auth = Authenticator.configure(None, "admin", "pw", {"alice-token": "alice"})
    assert auth.authenticate(b"Bearer alice-token") == Principal("alice")
    assert auth.authenticate(b"Bearer admin-token") is None


def test_admin_token_only() -> None:
    auth = Authenticator.configure("t0k", None, None)
    assert not auth.generated
    assert auth.token == "t0k"
    assert auth.authenticate(b"Bearer t0k") == Principal()
    assert auth.authenticate(basic("admin", "t0k")) is None
    assert auth.challenge == 'Bearer realm="restconsumer"'


# --- basic -----------------------------------------------------------------------


def test_basic_user_and_password(auth: Authenticator) -> None:
    assert auth.authenticate(basic("admin", "pa:ss wörd")) == Principal()
    assert auth.authenticate(b"basic " + basic("admin", "pa:ss wörd")[6:]) == Principal()


def test_basic_only() -> None:
    auth = Authenticator.configure(None, "admin", "secret")
    assert not auth.generated
    assert auth.token is None
    assert auth.authenticate(basic("admin", "secret")) == Principal()
    assert auth.authenticate(b"Bearer secret") is None
    assert auth.authenticate(b"Bearer ") is None
    assert "Basic" in auth.challenge
    assert "Bearer" in auth.challenge


@pytest.mark.parametrize(
    "header",
    [
        basic("admin", "wrong"),
        basic("Admin", "pa:ss wörd"),
        basic("admin", "pa:ss wörd "),
        basic("admin", ""),
        basic("", "pa:ss wörd"),
        basic("other", "pa:ss wörd"),
        b"Basic " + base64.b64encode(b"admin"),
        b"Basic " + base64.b64encode("admin:pa:ss wörd".encode("latin-1")),
        b"Basic not*base64!",
        b"Basic YWRtaW46",
        b"Basic",
        b"Basic ",
    ],
)
def test_wrong_basic_credentials(auth: Authenticator, header: bytes) -> None:
    assert auth.authenticate(header) is None


# --- refusals --------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        None,
        b"",
        b"   ",
        b"admin-token",
        b"Bearer",
        b"Bearer ",
        b"Bearer wrong",
        b"Bearer admin-token-and-more",
        b"Bearer admin-toke",
        b"Bearer ADMIN-TOKEN",
        b"Token admin-token",
        b"Bearer: admin-token",
        b"Digest username=admin",
        b"Bearer alice-token2",
        b"Bearer \xff\xfe",
    ],
)
def test_wrong_missing_or_malformed_headers(auth: Authenticator, header: bytes | None) -> None:
    assert auth.authenticate(header) is None


def test_owner_name_is_not_a_token(auth: Authenticator) -> None:
    assert auth.authenticate(b"Bearer alice") is None


# --- generated -------------------------------------------------------------------


def test_generated_token_when_nothing_is_configured() -> None:
    auth = Authenticator.configure(None, None, None)
    assert auth.generated
    assert auth.token
    assert len(auth.token) >= 24
    assert auth.authenticate(f"Bearer {auth.token}".encode()) == Principal()
    assert auth.authenticate(b"Bearer ") is None
    other = Authenticator.configure("", "", "")
    assert other.generated
    assert other.token != auth.token


@pytest.mark.parametrize("user, password", [("admin", None), (None, "pw"), ("admin", "")])
def test_half_a_user_is_no_credential(user: str | None, password: str | None) -> None:
    auth = Authenticator.configure(None, user, password)
    assert auth.generated
    assert auth.authenticate(basic(user or "", password or "")) is None


def test_generated_token_keeps_scoped_tokens() -> None:
    auth = Authenticator.configure(None, None, None, {"alice-token": "alice"})
    assert auth.generated
    assert auth.authenticate(b"Bearer alice-token") == Principal("alice")
    assert auth.authenticate(f"Bearer {auth.token}".encode()) == Principal()


def test_configured_credentials_are_not_generated() -> None:
    assert not Authenticator.configure("t", None, None).generated
    assert not Authenticator.configure(None, "u", "p").generated


# --- tokens files ----------------------------------------------------------------


def test_load_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"alice-token": "alice", "bob-token": "bob"}), encoding="utf-8")
    assert load_tokens(path) == {"alice-token": "alice", "bob-token": "bob"}
    assert load_tokens(str(path)) == {"alice-token": "alice", "bob-token": "bob"}


def test_load_empty_tokens_object(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text("{}", encoding="utf-8")
    assert load_tokens(path) == {}


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "{'single': 'quotes'}",
        '{"alice-token": "alice"',
        '["alice-token", "alice"]',
        '"alice-token"',
        "null",
        '{"alice-token": 1}',
        '{"alice-token": null}',
        '{"alice-token": ["alice"]}',
        '{"alice-token": ""}',
        '{"": "alice"}',
    ],
)
def test_load_tokens_refuses_malformed_files(tmp_path: Path, text: str) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match="tokens file"):
        load_tokens(path)


def test_load_tokens_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tokens file"):
        load_tokens(tmp_path / "absent.json")


def test_load_tokens_refuses_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tokens file"):
        load_tokens(tmp_path)


def test_load_tokens_refuses_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_bytes(b'{"t\xff": "alice"}')
    with pytest.raises(ValueError, match="tokens file"):
        load_tokens(path)


# --- topic limits in the tokens file (SPEC §8) -------------------------------------------


def test_tokens_may_limit_their_owner_to_topics(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({
        "tok-a1": {"owner": "alice", "topics": ["aether.*", "shared.people"]},
        "tok-a2": {"owner": "alice", "topics": ["aether.*", "shared.people"]},
        "tok-b": "bob",
    }), encoding="utf-8")
    tokens = load_token_file(path)
    assert tokens.owners == {"tok-a1": "alice", "tok-a2": "alice", "tok-b": "bob"}
    assert tokens.topic_limits == {"alice": ("aether.*", "shared.people")}
    assert load_tokens(path) == tokens.owners


@pytest.mark.parametrize("entries, words", [
    ({"t1": {"owner": "alice"}}, "topics must be a non-empty list"),
    ({"t1": {"owner": "alice", "topics": []}}, "topics must be a non-empty list"),
    ({"t1": {"owner": "alice", "topics": ["a", 3]}}, "topics must be a non-empty list"),
    ({"t1": {"topics": ["a"]}}, "owner must be a non-empty string"),
    ({"t1": {"owner": "alice", "topics": ["a"], "admin": True}}, "unknown field(s) admin"),
    ({"t1": {"owner": "alice", "topics": ["a.*"]}, "t2": {"owner": "alice", "topics": ["b.*"]}},
     "different topic limits"),
    ({"t1": {"owner": "alice", "topics": ["a.*"]}, "t2": "alice"}, "different topic limits"),
])
def test_bad_topic_limits_are_refused_without_showing_a_token(
        tmp_path: Path, entries: dict[str, object], words: str) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    with pytest.raises(ValueError) as caught:
        load_token_file(path)
    assert words in str(caught.value) and "tokens file" in str(caught.value)
    assert "t1" not in str(caught.value).replace(str(path), "")


def test_every_problem_of_a_tokens_file_is_said(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"t1": 5, "t2": {"owner": ""}, "t3": "carol"}), encoding="utf-8")
    with pytest.raises(ValueError) as caught:
        load_token_file(path)
    assert "entry 1" in str(caught.value) and "entry 2" in str(caught.value)


# --- destinations in the tokens file (SPEC §8) -------------------------------------------


def test_every_owner_of_a_tokens_file_is_limited_to_what_it_is_granted(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({
        "tok-a1": {"owner": "alice", "destinations": ["crm.internal", "*.corp.example", "10.20.0.0/16"]},
        "tok-a2": {"owner": "alice", "destinations": ["crm.internal", "*.corp.example", "10.20.0.0/16"]},
        "tok-c": {"owner": "carol", "topics": ["aether.*"]},
        "tok-b": "bob",
    }), encoding="utf-8")
    tokens = load_token_file(path)
    assert tokens.destinations["alice"].names == {"crm.internal"}
    assert tokens.destinations["alice"].suffixes == (".corp.example",)
    assert [str(n) for n in tokens.destinations["alice"].networks] == ["10.20.0.0/16"]
    assert tokens.destinations["bob"] == tokens.destinations["carol"] == Destinations()  # public only
    assert tokens.topic_limits == {"carol": ("aether.*",)}


@pytest.mark.parametrize("entries, words", [
    ({"t1": {"owner": "alice", "destinations": "crm.internal"}}, "must be a list"),
    ({"t1": {"owner": "alice", "destinations": ["10.0.0.0/33", "bad host"]}}, "'bad host'"),
    ({"t1": {"owner": "alice", "destinations": ["a.example"]}, "t2": "alice"}, "different destinations"),
])
def test_bad_destinations_are_refused_without_showing_a_token(
        tmp_path: Path, entries: dict[str, object], words: str) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    with pytest.raises(ValueError) as caught:
        load_token_file(path)
    assert words in str(caught.value) and "t1" not in str(caught.value)
