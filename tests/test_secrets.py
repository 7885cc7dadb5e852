"""Job secrets (SPEC §8): where they are, references to them, encryption at rest, the key check.

The pure parts (restconsumer.jobs.secrets) without Twisted, then the store against the real Redis
in-process, then the whole service: references resolved when a job starts, the error state,
--secret-key (nothing in clear in Redis, rotation, refusing to start with another key or none).
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography.fernet import Fernet
from twisted.internet import reactor
from twisted.internet.task import deferLater

from restconsumer.control.store import JobStore, RedisAddress, StoreUnavailable
from restconsumer.jobs import secrets
from restconsumer.jobs.model import Policy, validate
from restconsumer.jobs.secrets import (
    FINGERPRINT_KEY,
    REDACTED,
    Reference,
    SecretKey,
    UnresolvedSecrets,
    check_key,
    hash_view,
    needs_sealing,
    open_definition,
    parse_reference,
    resolve,
    seal_definition,
    sealed_fingerprints,
    slots,
)
from restconsumer.tap import Options, secret_environment
from tests.infra.kafka import KafkaBroker
from tests.infra.kafka_io import produce, read_all
from tests.infra.ports import wait_for
from tests.infra.redis import RedisServer
from tests.infra.service import ServiceProcess
from tests.infra.sink import Sink
from tests.infra.used_secrets import collect, collect_from, new_secret, secret

Start = Callable[..., ServiceProcess]

# -- where the secrets are ------------------------------------------------------------------


def test_slots_find_every_kind_of_secret_and_only_those() -> None:
    definition = {
        "url": "https://h/x", "basic_auth": {"user": "u", "Password": "p"}, "token": "t",
        "headers": {"Authorization": "a", "X-Api-Key": "k", "Cookie": "c", "Accept": "json"},
        "oauth2": {"token_url": "https://idp/t", "client_id": "id", "client_secret": "cs"},
        "signing": {"secret": "whsec_x", "scheme": "standard-webhooks"},
    }
    found = {s.path: (s.value, s.origin) for s in slots(definition)}
    assert found == {
        "basic_auth.pw": ("p", "url"), "token": ("t", "url"),
        "oauth2.client_secret": ("cs", "oauth2.token_url"), "signing.secret": ("whsec_x", "url"),
        "headers.Authorization": ("a", "url"), "headers.X-Api-Key": ("k", "url"),
        "headers.Cookie": ("c", "url"),
    }
    assert slots({"url": "u", "basic_auth": "not an object", "headers": None}) == []


@pytest.mark.parametrize("text, expected", [
    ("${env:RESTCONSUMER_SECRET_A}", Reference("env", "RESTCONSUMER_SECRET_A")),
    ("${file:crm.token}", Reference("file", "crm.token")),
    ("${env:}", Reference("env", "")),
    ("${vault:x}", None), ("$env:X", None), ("{env:X}", None), ("x${env:X}", None), (None, None),
    ("${env:X}}", None),
])
def test_parse_reference(text: Any, expected: Reference | None) -> None:
    assert parse_reference(text) == expected
    if expected is not None:
        assert str(expected) == text


# -- resolving references --------------------------------------------------------------------

ENV = {"RESTCONSUMER_SECRET_CRM": "crm-token-1", "RESTCONSUMER_SECRET_EMPTY": "",
       "RESTCONSUMER_SECRET_NL": "two\nlines", "RESTCONSUMER_API_TOKEN": "admin-token-x"}


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    """A secrets folder: plain files, a Kubernetes-style link, a link leading out of it."""
    folder = tmp_path / "secrets"
    (folder / "..data").mkdir(parents=True)
    (folder / "pw").write_text("file-pw-1\n")
    (folder / "crlf").write_bytes(b"crlf-pw-2\r\n")
    (folder / "empty").write_text("\n")
    (folder / "binary").write_bytes(b"\xff\xfe")
    (folder / "big").write_text("x" * (secrets.MAX_SECRET_FILE + 1))
    (folder / "..data" / "k8s").write_text("k8s-pw-3")
    (folder / "k8s").symlink_to("..data/k8s")
    (tmp_path / "outside").write_text("outside-secret")
    (folder / "escape").symlink_to(tmp_path / "outside")
    (folder / "sub").mkdir()
    return folder


def test_env_and_file_references_resolve(secrets_dir: Path) -> None:
    definition = {"url": "https://h/", "token": "${env:RESTCONSUMER_SECRET_CRM}",
                  "basic_auth": {"user": "u", "pw": "${file:pw}"},
                  "headers": {"X-Api-Key": "${file:k8s}", "Cookie": "${file:crlf}", "X-A": "plain"}}
    resolved = resolve(definition, ENV, secrets_dir)
    assert resolved["token"] == "crm-token-1"
    assert resolved["basic_auth"]["pw"] == "file-pw-1"  # the trailing line break is no part of it
    assert resolved["headers"] == {"X-Api-Key": "k8s-pw-3", "Cookie": "crlf-pw-2", "X-A": "plain"}
    assert definition["token"] == "${env:RESTCONSUMER_SECRET_CRM}"  # the input is left alone


def test_every_unresolvable_reference_is_listed_without_any_value(secrets_dir: Path) -> None:
    definition = {"url": "https://h/", "headers": {
        "X-Missing-Key": "${env:RESTCONSUMER_SECRET_MISSING}",
        "X-Empty-Key": "${env:RESTCONSUMER_SECRET_EMPTY}",
        "X-Nl-Key": "${env:RESTCONSUMER_SECRET_NL}", "X-Admin-Key": "${env:RESTCONSUMER_API_TOKEN}",
        "X-Absent-Key": "${file:absent}", "X-Escape-Key": "${file:escape}",
        "X-Dir-Key": "${file:sub}", "X-Bin-Key": "${file:binary}", "X-Big-Key": "${file:big}",
        "X-Blank-Key": "${file:empty}", "X-Dots-Key": "${file:../outside}",
    }}
    with pytest.raises(UnresolvedSecrets) as caught:
        resolve(definition, ENV, secrets_dir)
    reasons = dict(caught.value.problems)
    assert set(reasons) == {f"headers.{h}" for h in definition["headers"]}
    assert "not set" in reasons["headers.X-Missing-Key"]
    assert "empty" in reasons["headers.X-Empty-Key"] and "empty" in reasons["headers.X-Blank-Key"]
    assert "control character" in reasons["headers.X-Nl-Key"]
    assert "RESTCONSUMER_SECRET_" in reasons["headers.X-Admin-Key"]
    assert "no such file" in reasons["headers.X-Absent-Key"]
    assert "outside the secrets folder" in reasons["headers.X-Escape-Key"]
    assert "not a regular file" in reasons["headers.X-Dir-Key"]
    assert "UTF-8" in reasons["headers.X-Bin-Key"]
    assert "64 KiB" in reasons["headers.X-Big-Key"]
    assert "directly inside" in reasons["headers.X-Dots-Key"]
    text = str(caught.value)
    for value in ("admin-token-x", "outside-secret", "two\nlines"):
        assert value not in text


def test_file_references_without_a_secrets_dir_do_not_resolve() -> None:
    with pytest.raises(UnresolvedSecrets, match="--secrets-dir"):
        resolve({"token": "${file:pw}"}, {}, None)


def test_a_header_secret_must_be_latin1(tmp_path: Path) -> None:
    with pytest.raises(UnresolvedSecrets, match="Latin-1"):
        resolve({"headers": {"X-Api-Key": "${env:RESTCONSUMER_SECRET_U}"}},
                {"RESTCONSUMER_SECRET_U": "☕"}, None)
    assert resolve({"token": "${env:RESTCONSUMER_SECRET_U}"}, {"RESTCONSUMER_SECRET_U": "☕"},
                   None)["token"] == "☕"


# -- the key, encryption, the hash -------------------------------------------------------------

K1, K2 = Fernet.generate_key(), Fernet.generate_key()


def test_key_file_lines_comments_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text(f"# new key first\n{K2.decode()}\n\n  {K1.decode()}  \n")
    key = SecretKey.from_file(path)
    assert key.fingerprints == [SecretKey([K2]).fingerprint, SecretKey([K1]).fingerprint]
    assert len(key.fingerprint) == 16 and key.fingerprint not in K2.decode()
    path.write_text(f"{K1.decode()}\nnot-a-key\n")
    with pytest.raises(ValueError, match="line 2: not a Fernet key"):
        SecretKey.from_file(path)
    path.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no key"):
        SecretKey.from_file(path)
    with pytest.raises(ValueError, match="cannot read the key file"):
        SecretKey.from_file(tmp_path / "absent")
    with pytest.raises(ValueError, match="cannot read the key file"):
        SecretKey.from_file(tmp_path)


STORED = {"id": "j", "url": "https://h/x", "basic_auth": {"user": "u", "pw": "pw-at-rest-1"},
          "headers": {"X-Api-Key": "key-at-rest-2", "Accept": "json",
                      "Authorization": "${env:RESTCONSUMER_SECRET_A}"}}


def test_seal_and_open_every_secret_but_references() -> None:
    key = SecretKey([K1])
    sealed = seal_definition(STORED, key)
    text = json.dumps(sealed)
    assert "pw-at-rest-1" not in text and "key-at-rest-2" not in text
    assert sealed["headers"]["Authorization"] == "${env:RESTCONSUMER_SECRET_A}"
    assert sealed["headers"]["Accept"] == "json"
    assert sealed_fingerprints(sealed) == {key.fingerprint}
    assert not needs_sealing(sealed, key) and needs_sealing(STORED, key)
    opened, unreadable = open_definition(sealed, key)
    assert (opened, unreadable) == (STORED, [])
    assert STORED["basic_auth"]["pw"] == "pw-at-rest-1"  # the input is left alone


def test_an_unknown_key_leaves_the_secret_encrypted_and_says_so() -> None:
    sealed = seal_definition(STORED, SecretKey([K1]))
    opened, unreadable = open_definition(sealed, SecretKey([K2]))
    assert [p for p, _ in unreadable] == ["basic_auth.pw", "headers.X-Api-Key"]
    assert SecretKey([K1]).fingerprint in unreadable[0][1]
    assert opened["basic_auth"]["pw"] == sealed["basic_auth"]["pw"]
    _, without = open_definition(sealed, None)
    assert "no --secret-key" in without[0][1]


def test_rotation_reads_the_old_key_and_writes_the_new() -> None:
    old = seal_definition(STORED, SecretKey([K1]))
    rotating = SecretKey([K2, K1])
    assert open_definition(old, rotating) == (STORED, [])
    assert needs_sealing(old, rotating)
    again = seal_definition(old, rotating)
    assert sealed_fingerprints(again) == {rotating.fingerprint}
    assert open_definition(again, SecretKey([K2])) == (STORED, [])


def test_hash_view_replaces_literals_by_their_digest() -> None:
    key = SecretKey([K1])
    view = hash_view(STORED, key.digest)
    assert "pw-at-rest-1" not in json.dumps(view)
    assert view["basic_auth"]["pw"] == {"hmac-sha256": key.digest("pw-at-rest-1")}
    assert view["headers"]["Authorization"] == "${env:RESTCONSUMER_SECRET_A}"
    assert key.digest("x") != SecretKey([K2]).digest("x")
    assert key.digest("x") == SecretKey([K1, K2]).digest("x")


def test_the_job_hash_under_a_key_reveals_no_weak_password() -> None:
    """Without the key, the hash of a job with a guessable password cannot be recomputed."""
    raw = {"id": "j", "owner": "o", "type": "POST", "topic": "t", "datamap": {"id": "$.msg.id"},
           "url": "https://h/{id}", "basic_auth": {"user": "u", "pw": "123456"}}
    plain = validate(raw).hash
    keyed = validate(raw, policy=Policy(secret_digest=SecretKey([K1]).digest)).hash
    other_key = validate(raw, policy=Policy(secret_digest=SecretKey([K2]).digest)).hash
    assert len({plain, keyed, other_key}) == 3


@pytest.mark.parametrize("stored, found, plain, key, verdict", [
    (None, set(), 0, None, "ok"),
    ("fp", set(), 0, None, "no --secret-key"),
    (None, {"fp"}, 0, None, "no --secret-key"),
    (None, set(), 3, "k1", "store k1, reseal"),
    ("k1", set(), 0, "k1", "ok"),
    ("k1", {"k1"}, 0, "k1", "ok"),
    ("k9", {"k9"}, 0, "k1", "does not hold"),
    (None, {"k9"}, 0, "k1", "does not hold"),
    ("k1", {"k1", "k9"}, 0, "k1", "does not hold"),
    ("k1", {"k1"}, 0, "k2+k1", "store k2, reseal"),
    ("k2", {"k1", "k2"}, 0, "k2+k1", "reseal"),
])
def test_the_key_check_decides_every_case(stored: str | None, found: set[str], plain: int,
                                          key: str | None, verdict: str) -> None:
    keys = {"k1": [K1], "k2+k1": [K2, K1]}
    secret_key = SecretKey(keys[key]) if key else None
    names = {SecretKey([K1]).fingerprint: "k1", SecretKey([K2]).fingerprint: "k2"}
    fingerprint = {v: k for k, v in names.items()}

    def real(name: str | None) -> str | None:
        return fingerprint.get(name, name) if name else None

    result = check_key(real(stored), {real(f) for f in found}, plain, secret_key)  # type: ignore[misc]
    if result.error is not None:
        assert verdict in result.error
        return
    said = []
    if result.store:
        said.append(f"store {names[result.store]}")
    if result.reseal:
        said.append("reseal")
    assert (", ".join(said) or "ok") == verdict


# -- the secrets registry the final log grep uses ------------------------------------------------


def test_the_log_grep_finds_secrets_where_tests_write_them(tmp_path: Path) -> None:
    module = tmp_path / "test_sample.py"
    module.write_text('''
SECRET_PW, OTHER = "pw-const-0001", "not-a-secret-1"
ALICE = "tok-alice-00001"
def test_x(s):
    s.request("GET", "/", token=ALICE)
    s.start("--api-password", "cli-pw-00002", "--jobs", "folder-0003")
    job = {"basic_auth": {"user": "user-0004", "Password": "pw-field-0005"},
           "headers": {"X-Api-Key": "hdr-key-0006", "X-Trace": "trace-0007"},
           "token": "${env:RESTCONSUMER_SECRET_X}", "key": "msg-key-0008"}
    job["token"] = "tok-assigned-09"
    job["pw"] = "short"
    password = "local-pw-0010"
    name = "local-name-11"
''')
    assert collect_from([module]) == {"pw-const-0001", "tok-alice-00001", "cli-pw-00002",
                                      "pw-field-0005", "hdr-key-0006", "tok-assigned-09",
                                      "local-pw-0010"}
    made = new_secret("made")
    assert made in collect() and secret("also-made-1") in collect()


def test_the_log_grep_covers_what_the_old_hand_kept_list_held() -> None:
    found = collect()
    for old in ("test-admin-token-5f1c9e", "s3cret-pw-41", "k3y-value-77", "pw-delivery-1",
                "pw-ops-93", "pw-legacy-1", "tok-alice-6d1e0b", "tok-bob-77c2a9"):
        assert old in found


# -- the options --------------------------------------------------------------------------------


def test_secret_options_from_the_command_line_or_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file, folder = tmp_path / "key", tmp_path / "dir"
    key_file.write_text(K1.decode() + "\n")
    folder.mkdir()
    monkeypatch.setenv("RESTCONSUMER_SECRET_KEY_FILE", str(key_file))
    monkeypatch.setenv("RESTCONSUMER_SECRETS_DIR", str(folder))
    options = Options()
    options.parseOptions([])
    assert options["secret-keys"].fingerprint == SecretKey([K1]).fingerprint
    assert options["secrets-dir"] == str(folder)
    other = tmp_path / "key2"
    other.write_text(K2.decode())
    options = Options()
    options.parseOptions(["--secret-key", str(other), "--secrets-dir", str(tmp_path)])
    assert options["secret-keys"].fingerprint == SecretKey([K2]).fingerprint
    assert options["secrets-dir"] == str(tmp_path)


@pytest.mark.parametrize("args, words", [
    (["--secret-key", "/nonexistent/key"], "--secret-key: cannot read the key file"),
    (["--secrets-dir", "/nonexistent/dir"], "--secrets-dir /nonexistent/dir: no such folder"),
])
def test_bad_secret_options_are_refused(args: list[str], words: str) -> None:
    from twisted.python import usage

    with pytest.raises(usage.UsageError, match=words):
        Options().parseOptions(args)


def test_workers_get_the_secret_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(K1.decode())
    monkeypatch.setenv("RESTCONSUMER_SECRET_CRM", "v")
    monkeypatch.chdir(tmp_path)
    options = Options()
    options.parseOptions(["--secret-key", "key", "--secrets-dir", "."])
    env = secret_environment(options)
    assert env == {"RESTCONSUMER_SECRET_CRM": "v", "RESTCONSUMER_SECRET_KEY_FILE": str(key_file),
                   "RESTCONSUMER_SECRETS_DIR": str(tmp_path)}


# -- the store, in-process, on the real Redis ----------------------------------------------------


async def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await deferLater(reactor, 0.05, lambda: None)


def _job(job_id: str, **more: Any) -> Any:
    return validate({"id": job_id, "owner": "o", "type": "POST", "topic": "t",
                     "datamap": {"id": "$.msg.id"}, "url": "https://h.example/{id}", **more})


class _Stores:
    def __init__(self, url: str) -> None:
        self.url = url
        self.started: list[JobStore] = []
        self.refused: list[str] = []

    async def start(self, key: SecretKey | None) -> JobStore:
        store = JobStore(RedisAddress.from_url(self.url), clock=reactor,  # type: ignore[arg-type]
                         secret_key=key, on_refused=self.refused.append)
        store.startService()
        self.started.append(store)
        await _until(lambda: store.connected, 10, "Redis")
        return store


@pytest_twisted.async_yield_fixture
async def stores(redis_db: RedisServer) -> Any:
    """Job stores on the session's Redis, each with its own key; stopped after the test."""
    made = _Stores(redis_db.url)
    yield made
    for store in made.started:
        await store.stopService()


@pytest_twisted.ensureDeferred
async def test_store_writes_encrypted_and_reads_decrypted(stores: _Stores, redis_db: RedisServer) -> None:
    store = await stores.start(SecretKey([K1]))
    job = _job("enc", token="tok-in-process-1")
    assert await store.create(job)
    raw = redis_db.client().get("job:enc")
    assert "tok-in-process-1" not in raw and json.loads(raw)["token"]["key"] == SecretKey([K1]).fingerprint
    assert (await store.get("enc"))["token"] == "tok-in-process-1"
    assert redis_db.client().get(FINGERPRINT_KEY) == SecretKey([K1]).fingerprint


@pytest_twisted.ensureDeferred
async def test_replace_only_what_was_read(stores: _Stores) -> None:
    store = await stores.start(None)
    first = _job("cas")
    assert await store.create(first)
    assert not await store.create(_job("cas", url="https://other.example/{id}"))
    _, version = await store.read("cas")
    assert version is not None
    assert await store.replace(_job("cas", url="https://b.example/{id}"), version)
    assert not await store.replace(_job("cas", url="https://c.example/{id}"), version)  # changed
    assert (await store.get("cas"))["url"] == "https://b.example/{id}"
    await store.delete("cas")
    assert not await store.replace(_job("cas"), version)  # gone: not made again


@pytest_twisted.ensureDeferred
async def test_a_store_with_another_key_refuses_and_answers_nothing(stores: _Stores) -> None:
    writer = await stores.start(SecretKey([K1]))
    assert await writer.create(_job("k", token="tok-in-process-2"))
    other = await stores.start(SecretKey([K2]))
    with pytest.raises(StoreUnavailable, match="does not hold"):
        await other.get("k")
    with pytest.raises(StoreUnavailable, match="not started"):
        await other.ids()
    keyless = await stores.start(None)
    with pytest.raises(StoreUnavailable, match="no --secret-key"):
        await keyless.ping()
    assert len(stores.refused) == 2  # each told once, however often it is asked


@pytest_twisted.ensureDeferred
async def test_a_new_key_first_reencrypts_and_jobs_in_clear_get_encrypted(
        stores: _Stores, redis_db: RedisServer) -> None:
    plain = await stores.start(None)
    assert await plain.create(_job("clear", basic_auth={"user": "u", "pw": "pw-in-process-3"}))
    old = await stores.start(SecretKey([K1]))  # first with a key: encrypts what it finds
    assert (await old.get("clear"))["basic_auth"]["pw"] == "pw-in-process-3"
    assert "pw-in-process-3" not in redis_db.client().get("job:clear")
    before = json.loads(redis_db.client().get("job:clear"))
    assert sealed_fingerprints(before) == {SecretKey([K1]).fingerprint}
    assert before["hash"] == validate(before | {"basic_auth": {"user": "u", "pw": "pw-in-process-3"}},
                                      policy=Policy(secret_digest=SecretKey([K1]).digest)).hash
    rotating = await stores.start(SecretKey([K2, K1]))
    assert (await rotating.get("clear"))["basic_auth"]["pw"] == "pw-in-process-3"
    assert sealed_fingerprints(json.loads(redis_db.client().get("job:clear"))) == \
        {SecretKey([K2]).fingerprint}
    assert redis_db.client().get(FINGERPRINT_KEY) == SecretKey([K2]).fingerprint
    new_only = await stores.start(SecretKey([K2]))
    assert (await new_only.get("clear"))["basic_auth"]["pw"] == "pw-in-process-3"
    assert stores.refused == []


# -- the whole service ----------------------------------------------------------------------------

CRM_TOKEN = "crm-env-token-6b2e"
FILE_PW = "file-pw-31c7a0"


def _post(service: ServiceProcess, definition: dict[str, Any], token: Any = True) -> Any:
    return service.request("POST", f"/job/{definition['id']}", definition, token=token)


def _job_for(sink: Sink, job_id: str, topic: str, **more: Any) -> dict[str, Any]:
    return {"id": job_id, "owner": "ops", "type": "POST", "topic": topic,
            "datamap": {"id": "$.msg.id"}, "url": f"{sink.url}/{job_id}/{{id}}", **more}


def test_references_resolve_on_the_instance_and_are_shown_as_they_are(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink,
        tmp_path: Path) -> None:
    """${env:…} and ${file:…} deliver their values; GET and Redis hold the reference only."""
    name = topic(1)
    folder = tmp_path / "secrets"
    folder.mkdir()
    (folder / "crm-pw").write_text(FILE_PW + "\n")
    service = services("--secrets-dir", str(folder), env={"RESTCONSUMER_SECRET_CRM": CRM_TOKEN})
    by_env = _job_for(sink, "by-env", name, token="${env:RESTCONSUMER_SECRET_CRM}")
    by_file = _job_for(sink, "by-file", name, basic_auth={"user": "crm", "pw": "${file:crm-pw}"})
    for definition in (by_env, by_file):
        answer = _post(service, definition)
        assert answer.status == 201, answer
    assert service.request("GET", "/job/by-env").json["token"] == "${env:RESTCONSUMER_SECRET_CRM}"
    assert service.request("GET", "/job/by-file").json["basic_auth"]["pw"] == "${file:crm-pw}"
    produce(kafka.bootstrap, name, [b'{"id": "r1"}'])
    wait_for(lambda: sink.count() >= 2, 30, "both jobs delivered")
    got = {r.path: r.headers["authorization"] for r in sink.snapshot()}
    assert got["/by-env/r1"] == f"Bearer {CRM_TOKEN}"
    assert got["/by-file/r1"] == "Basic " + base64.b64encode(f"crm:{FILE_PW}".encode()).decode()
    dump = _redis_dump(service)
    assert CRM_TOKEN not in dump and FILE_PW not in dump
    for job_id in ("by-env", "by-file"):
        assert service.request("GET", f"/job/{job_id}/status").json["state"] == "running"


def test_references_to_what_jobs_may_not_read_are_400(services: Start, tmp_path: Path) -> None:
    """The service's own token, a file outside --secrets-dir: refused, every problem listed."""
    (tmp_path / "tokens.json").write_text(json.dumps({"tok-ref-7a1f": "ops"}))
    service = services("--secrets-dir", str(tmp_path))
    definition = {"id": "greedy", "owner": "ops", "type": "POST", "topic": "t",
                  "datamap": {"id": "$.msg.id"}, "url": "http://127.0.0.1:9/{id}",
                  "token": "${env:RESTCONSUMER_API_TOKEN}",
                  "headers": {"X-Api-Key": "${file:../tokens.json}", "Cookie": "${file:/etc/passwd}",
                              "X-Tenant": "${env:RESTCONSUMER_SECRET_TENANT}"}}
    answer = _post(service, definition)
    assert answer.status == 400, answer
    fields = [d["field"] for d in answer.json["details"]]
    assert fields == ["token", "headers.X-Api-Key", "headers.Cookie", "headers.X-Tenant"]
    assert service.request("GET", "/job/greedy").status == 404
    keyless = services()  # no --secrets-dir at all
    answer = _post(keyless, {**definition, "token": "${file:tokens.json}", "headers": {}})
    assert answer.status == 400 and "--secrets-dir" in answer.json["details"][0]["reason"]


def test_an_unresolvable_reference_puts_the_job_in_error_and_sends_nothing(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink,
        tmp_path: Path) -> None:
    """The status says which reference and why; no request, no dead letter; fixed, it runs."""
    name = topic(1)
    folder = tmp_path / "secrets"
    folder.mkdir()
    service = services("--secrets-dir", str(folder))
    missing = _job_for(sink, "missing", name, token="${env:RESTCONSUMER_SECRET_NOT_SET}",
                       retry={"max_attempts": 1})
    absent = _job_for(sink, "absent", name, basic_auth={"user": "u", "pw": "${file:later}"})
    assert _post(service, missing).status == 201
    assert _post(service, absent).status == 201
    produce(kafka.bootstrap, name, [b'{"id": "e1"}'])

    def status(job_id: str) -> dict[str, Any]:
        return service.request("GET", f"/job/{job_id}/status").json

    wait_for(lambda: status("missing")["state"] == "error", 15, "the error state")
    error = status("missing")["error"]
    assert "RESTCONSUMER_SECRET_NOT_SET" in error["reason"] and "not set" in error["reason"]
    assert error["at"].endswith("Z")
    wait_for(lambda: status("absent")["state"] == "error", 15, "the error state")
    assert "${file:later}" in status("absent")["error"]["reason"]
    time.sleep(3)
    assert sink.count() == 0
    assert read_all(kafka.bootstrap, "restconsumer.deadletter.missing", expect=1, timeout=1) == []

    (folder / "later").write_text(FILE_PW)
    service.request("POST", "/job/absent/stop")
    service.request("POST", "/job/absent/start")  # tried again at once (or at the next reconcile)
    wait_for(lambda: any(r.path == "/absent/e1" for r in sink.snapshot()), 30, "fixed, it delivers")
    assert status("absent")["state"] == "running" and status("absent")["error"] is None
    assert status("missing")["state"] == "error"
    assert [r.path for r in sink.snapshot()] == ["/absent/e1"]


def _redis_dump(service: ServiceProcess) -> str:
    import redis

    client = redis.Redis.from_url(service.redis, decode_responses=False)
    parts: list[bytes] = []
    for key in client.scan_iter("*"):
        parts.append(key)
        kind = client.type(key)
        if kind == b"string":
            parts.append(client.get(key) or b"")
        elif kind == b"hash":
            for k, v in client.hgetall(key).items():
                parts += [k, v]
        elif kind == b"set":
            parts += list(client.smembers(key))
        elif kind == b"list":
            parts += client.lrange(key, 0, -1)
        elif kind == b"zset":
            parts += [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == b"stream":
            for _, fields in client.xrange(key):
                for k, v in fields.items():
                    parts += [k, v]
    return b"\n".join(parts).decode("utf-8", "replace")


ALL_KINDS_PW, ALL_KINDS_TOKEN = "pw-all-kinds-5d02", "tk-all-kinds-e81b"
HEADER_SECRETS = {"Authorization": "Bearer hdr-auth-ab01", "X-Api-Key": "hdr-apikey-ab02",
                  "Cookie": "session=hdr-cookie-ab03", "X-Auth-Token": "hdr-token-ab04",
                  "X-Client-Secret": "hdr-secret-ab05", "X-Password": "hdr-passw-ab06"}


def _key_file(folder: Path, *keys: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"key-{len(list(folder.iterdir()))}"
    path.write_text("".join(k.decode() + "\n" for k in keys))
    for k in keys:
        secret(k.decode())
    return path


def test_with_a_secret_key_redis_holds_no_secret_in_clear(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink,
        tmp_path: Path) -> None:
    """Every kind of secret, created and updated: a scan of every Redis key finds none of them;
    the jobs still deliver with them, GET shows ***."""
    name = topic(1)
    key = Fernet.generate_key()
    service = services("--secret-key", str(_key_file(tmp_path / "keys", key)))
    with_pw = _job_for(sink, "with-pw", name, basic_auth={"user": "u", "pw": ALL_KINDS_PW},
                       headers={k: v for k, v in HEADER_SECRETS.items() if k != "Authorization"})
    with_token = _job_for(sink, "with-token", name, token=ALL_KINDS_TOKEN)
    with_header = _job_for(sink, "with-header", name,
                           headers={"Authorization": HEADER_SECRETS["Authorization"]})
    for definition in (with_pw, with_token, with_header):
        assert _post(service, definition).status == 201
    shown = service.request("GET", "/job/with-pw").json
    assert shown["basic_auth"]["pw"] == REDACTED
    again = _post(service, {**shown, "ratelimit": 0})  # an update keeping the hidden secrets
    assert again.status == 200, again
    produce(kafka.bootstrap, name, [b'{"id": "k1"}'])
    wait_for(lambda: sink.count() >= 3, 30, "every job delivered")
    got = {r.path.split("/")[1]: r.headers for r in sink.snapshot()}
    assert got["with-pw"]["authorization"] == "Basic " + base64.b64encode(
        f"u:{ALL_KINDS_PW}".encode()).decode()
    assert got["with-pw"]["x-api-key"] == HEADER_SECRETS["X-Api-Key"]
    assert got["with-token"]["authorization"] == f"Bearer {ALL_KINDS_TOKEN}"
    assert got["with-header"]["authorization"] == HEADER_SECRETS["Authorization"]

    dump = _redis_dump(service)
    assert "job:with-pw" in dump  # the scan did read the jobs
    values = [ALL_KINDS_PW, ALL_KINDS_TOKEN, *HEADER_SECRETS.values()]
    values += [v.split(" ")[-1].split("=")[-1] for v in HEADER_SECRETS.values()]
    found = [v for v in values if v in dump]
    assert found == []
    stored = json.loads(service_redis(service).get("job:with-token"))
    assert set(stored["token"]) == {"fernet", "key"}
    print(f"{len(dump)} bytes of Redis scanned for {len(values)} secrets")


def service_redis(service: ServiceProcess) -> Any:
    """A plain client of the service's Redis."""
    import redis

    return redis.Redis.from_url(service.redis, decode_responses=True)


def _ended(service: ServiceProcess, timeout: float = 30) -> int:
    assert service.process is not None
    try:
        code = service.process.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s:\n{service.log()[-3000:]}")
    service.process = None
    return code


def test_another_key_or_none_refuses_to_start_and_rotation_works(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink,
        tmp_path: Path) -> None:
    """Encrypted jobs in Redis: an instance with another key, or none, exits non-zero saying
    why; one with the new key first and the old second starts, re-encrypts, and then the new
    key alone is enough."""
    name = topic(1)
    keys = tmp_path / "keys"
    old, new = Fernet.generate_key(), Fernet.generate_key()
    first = services("--secret-key", str(_key_file(keys, old)))
    assert _post(first, _job_for(sink, "rot", name, token=ALL_KINDS_TOKEN)).status == 201
    first.stop()

    other = services("--secret-key", str(_key_file(keys, new)), wait=False)
    assert _ended(other) != 0
    assert "does not hold" in other.log() and SecretKey([old]).fingerprint in other.log()
    keyless = services(wait=False)
    assert _ended(keyless) != 0
    assert "no --secret-key" in keyless.log()

    rotating = services("--secret-key", str(_key_file(keys, new, old)))
    wait_for(lambda: "key rotation" in rotating.log(), 15, "the rotation")
    wait_for(lambda: json.loads(service_redis(rotating).get("job:rot"))["token"]["key"]
             == SecretKey([new]).fingerprint, 15, "re-encrypted")
    rotating.stop()
    only_new = services("--secret-key", str(_key_file(keys, new)))
    produce(kafka.bootstrap, name, [b'{"id": "after"}'])
    wait_for(lambda: [r.headers["authorization"] for r in sink.snapshot()] ==
             [f"Bearer {ALL_KINDS_TOKEN}"], 30, "delivered with the re-encrypted token")
    assert only_new.request("GET", "/job/rot/status").json["state"] == "running"
    assert _post(only_new, {**_job_for(sink, "rot2", name), "token": "tk-after-rotation-1"}).status == 201


def test_jobs_stored_before_the_key_still_load_and_are_encrypted(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink,
        tmp_path: Path) -> None:
    """Without a key the log says once that secrets are stored as they are; a later instance
    with a key encrypts them, and the job delivers as before."""
    name = topic(1)
    plain = services()
    assert _post(plain, _job_for(sink, "legacy", name, token=ALL_KINDS_TOKEN)).status == 201
    assert ALL_KINDS_TOKEN in service_redis(plain).get("job:legacy")
    plain.stop()
    assert plain.log().count("stored in Redis as they are") == 1
    keyed = services("--secret-key", str(_key_file(tmp_path / "keys", Fernet.generate_key())))
    wait_for(lambda: ALL_KINDS_TOKEN not in service_redis(keyed).get("job:legacy"), 15, "encrypted")
    assert "stored in Redis as they are" not in keyed.log()
    produce(kafka.bootstrap, name, [b'{"id": "old"}'])
    wait_for(lambda: [r.headers["authorization"] for r in sink.snapshot()] ==
             [f"Bearer {ALL_KINDS_TOKEN}"], 30, "the old job delivered")


WORKER_TOKEN = "worker-env-token-93d1"


def test_workers_resolve_references_and_read_encrypted_secrets(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink,
        tmp_path: Path) -> None:
    """--workers 2 with --secret-key and a ${env:…} token: both processes hold partitions, and
    every message, whichever process sends it, carries the resolved token."""
    name = topic(partitions=4)
    key_file = _key_file(tmp_path / "keys", Fernet.generate_key())
    service = services("--workers", "2", "--secret-key", str(key_file),
                       env={"RESTCONSUMER_SECRET_WORKER": WORKER_TOKEN})
    definition = _job_for(sink, "spread", name, token="${env:RESTCONSUMER_SECRET_WORKER}",
                          headers={"X-Api-Key": "wk-api-key-5a0c"})
    assert _post(service, definition).status == 201

    def two_instances() -> bool:
        status = service.request("GET", "/job/spread/status").json
        assert status["state"] != "error", status
        return len(status["instances"]) == 2 and all(i["partitions"] for i in status["instances"])

    wait_for(two_instances, 60, "both processes to hold partitions of the job")
    produce(kafka.bootstrap, name, [json.dumps({"id": f"m{i}"}).encode() for i in range(200)],
            partitions=4)
    wait_for(lambda: len({r.path for r in sink.snapshot()}) >= 200, 60, "200 deliveries")
    assert {(r.headers["authorization"], r.headers["x-api-key"]) for r in sink.snapshot()} == \
        {(f"Bearer {WORKER_TOKEN}", "wk-api-key-5a0c")}
    assert "wk-api-key-5a0c" not in _redis_dump(service)
