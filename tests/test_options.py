"""Unit tests of restconsumer.tap: command-line options, their environment variables, makeService."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from twisted.application.service import IService, MultiService
from twisted.python import usage

from restconsumer import tap
from restconsumer.control.jobsdir import JobsFolder
from restconsumer.control.store import JobStore, RedisAddress
from restconsumer.kafka.health import KafkaProbe
from restconsumer.ops.logs import kafka_logger
from restconsumer.tap import ENVIRONMENT, APIServer, Options, kafka_config, makeService
from tests.infra.certs import make_pki
from tests.infra.service import REPO

KAFKA_OPTIONS_VARIABLE = "RESTCONSUMER_KAFKA_OPTIONS"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No restconsumer variable set, and an empty working folder (so no ./jobs)."""
    for variable, _ in ENVIRONMENT.values():
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv(KAFKA_OPTIONS_VARIABLE, raising=False)
    monkeypatch.delenv("RESTCONSUMER_SCHEMA_REGISTRY_OPTIONS", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def parse(*args: str) -> Options:
    """Options parsed from ``args`` (never from sys.argv)."""
    options = Options()
    options.parseOptions(list(args))
    return options


def folder(tmp_path: Path, name: str) -> str:
    """A new folder under ``tmp_path``."""
    path = tmp_path / name
    path.mkdir()
    return str(path)


def tokens_file(tmp_path: Path, name: str) -> str:
    """A valid tokens file under ``tmp_path`` mapping ``{name}-token`` to ``name``."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({f"{name}-token": name}), encoding="utf-8")
    return str(path)


def ca_file(tmp_path: Path, name: str) -> str:
    """A CA bundle of one certificate under ``tmp_path``."""
    return str(make_pki(tmp_path / f"{name}-pki").ca_file)


# option → two valid values (for the variable, for the command line), made in tmp_path
VALUES: dict[str, Callable[[Path], tuple[str, str]]] = {
    "api": lambda _: ("tcp:9999", "tcp:0:interface=127.0.0.1"),
    "kafka": lambda _: ("k1:9092,k2:9092", "other:19092"),
    "redis": lambda _: ("redis://r.example:6380/2", "rediss://:pw@s.example:6390/3"),
    "jobs": lambda p: (folder(p, "env-jobs"), folder(p, "cli-jobs")),
    "api-token": lambda _: ("env-token", "cli-token"),
    "api-user": lambda _: ("env-user", "cli-user"),
    "api-password": lambda _: ("env-password", "cli-password"),
    "tokens": lambda p: (tokens_file(p, "envowner"), tokens_file(p, "cliowner")),
    "allow-hosts": lambda _: ("env.example", "cli.example,other.example"),
    "ca-file": lambda p: (ca_file(p, "env"), ca_file(p, "cli")),
    "log-format": lambda _: ("json", "text"),
    "reconcile-every": lambda _: ("5", "0.5"),
    "max-buffer-mb": lambda _: ("64", "1024"),
    "revoke-grace": lambda _: ("2.5", "0"),
    "workers": lambda _: ("3", "2"),
    "log-level": lambda _: ("debug", "warn"),
    "metrics": lambda _: ("tcp:9100", "tcp:0:interface=127.0.0.1"),
    "schema-registry": lambda _: ("http://registry.example:8081", "https://sr.example/api"),
    "instance-id": lambda _: ("node-env", "node-cli"),
}

# options kept in another form than their text
PARSED: dict[str, Callable[[str], object]] = {"revoke-grace": float}

# what an option needs besides itself to be valid
COMPANIONS = {"api-user": ("api-password", "pw"), "api-password": ("api-user", "u")}


def test_every_environment_option_is_tested() -> None:
    assert set(VALUES) == set(ENVIRONMENT)


def test_environment_variable_names() -> None:
    assert {name: variable for name, (variable, _) in ENVIRONMENT.items()} == {
        "api": "RESTCONSUMER_API",
        "kafka": "KAFKA_BOOTSTRAP_SERVERS",
        "redis": "REDIS_URL",
        "jobs": "RESTCONSUMER_JOBS",
        "api-token": "RESTCONSUMER_API_TOKEN",
        "api-user": "RESTCONSUMER_API_USER",
        "api-password": "RESTCONSUMER_API_PASSWORD",
        "tokens": "RESTCONSUMER_TOKENS",
        "allow-hosts": "RESTCONSUMER_ALLOW_HOSTS",
        "ca-file": "RESTCONSUMER_CA_FILE",
        "log-format": "RESTCONSUMER_LOG_FORMAT",
        "reconcile-every": "RESTCONSUMER_RECONCILE_EVERY",
        "max-buffer-mb": "RESTCONSUMER_MAX_BUFFER_MB",
        "revoke-grace": "RESTCONSUMER_REVOKE_GRACE",
        "workers": "RESTCONSUMER_WORKERS",
        "log-level": "RESTCONSUMER_LOG_LEVEL",
        "metrics": "RESTCONSUMER_METRICS",
        "schema-registry": "RESTCONSUMER_SCHEMA_REGISTRY",
        "instance-id": "RESTCONSUMER_INSTANCE_ID",
    }


def test_defaults() -> None:
    options = parse()
    assert options["api"] == "tcp:9013"
    assert options["kafka"] == "localhost:9092"
    assert options["redis"] == "redis://localhost:6379/0"
    assert options["redis-address"] == RedisAddress("localhost", 6379, 0, None, None, False)
    assert options["jobs"] is None
    assert options["api-token"] is None
    assert options["api-user"] is None
    assert options["api-password"] is None
    assert options["tokens"] is None
    assert options["scoped-tokens"] == {}
    assert options["allow-hosts"] is None
    assert options["allowed-hosts"] is None
    assert options["ca-file"] is None
    assert options["log-format"] == "text"
    assert options["reconcile-seconds"] == 30.0
    assert options["max-buffer-bytes"] == 256 * 1024 * 1024
    assert options["revoke-grace"] == 10.0
    assert options["kafka-options"] == {}
    assert not options["embedded"]
    assert kafka_config(options) == {"bootstrap.servers": "localhost:9092", "logger": kafka_logger}


@pytest.mark.parametrize("name", sorted(ENVIRONMENT))
def test_option_read_from_its_environment_variable(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env_value, _ = VALUES[name](tmp_path)
    monkeypatch.setenv(ENVIRONMENT[name][0], env_value)
    if name in COMPANIONS:
        other, value = COMPANIONS[name]
        monkeypatch.setenv(ENVIRONMENT[other][0], value)
    assert parse()[name] == PARSED.get(name, str)(env_value)


@pytest.mark.parametrize("name", sorted(ENVIRONMENT))
def test_command_line_wins_over_the_variable(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env_value, cli_value = VALUES[name](tmp_path)
    assert env_value != cli_value
    monkeypatch.setenv(ENVIRONMENT[name][0], env_value)
    if name in COMPANIONS:
        other, value = COMPANIONS[name]
        monkeypatch.setenv(ENVIRONMENT[other][0], value)
    assert parse(f"--{name}", cli_value)[name] == PARSED.get(name, str)(cli_value)


def test_derived_values_follow_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:p%40ss@r.example:6380/2")
    monkeypatch.setenv("RESTCONSUMER_ALLOW_HOSTS", " API.Example.com , ,other.example ")
    monkeypatch.setenv("RESTCONSUMER_TOKENS", tokens_file(tmp_path, "alice"))
    options = parse()
    assert options["redis-address"] == RedisAddress("r.example", 6380, 2, None, "p@ss", False)
    assert options["allowed-hosts"] == frozenset({"api.example.com", "other.example"})
    assert options["scoped-tokens"] == {"alice-token": "alice"}


def test_derived_values_follow_the_command_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://env.example:6380/2")
    monkeypatch.setenv("RESTCONSUMER_ALLOW_HOSTS", "env.example")
    monkeypatch.setenv("RESTCONSUMER_TOKENS", tokens_file(tmp_path, "envowner"))
    options = parse("--redis", "rediss://cli.example/5", "--allow-hosts", "cli.example",
                    "--tokens", tokens_file(tmp_path, "cliowner"))
    assert options["redis-address"] == RedisAddress("cli.example", 6379, 5, None, None, True)
    assert options["allowed-hosts"] == frozenset({"cli.example"})
    assert options["scoped-tokens"] == {"cliowner-token": "cliowner"}


# --- Kafka options -----------------------------------------------------------------


def test_kafka_option_is_repeatable() -> None:
    options = parse("--kafka-option", "security.protocol=SASL_SSL",
                    "--kafka-option", " sasl.mechanism = PLAIN ",
                    "--kafka-option", "sasl.jaas.config=a=b;c=d",
                    "--kafka-option", "client.id=",
                    "--kafka", "broker:9093")
    assert options["kafka-options"] == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "PLAIN",
        "sasl.jaas.config": "a=b;c=d",
        "client.id": "",
    }
    assert kafka_config(options) == {**options["kafka-options"], "bootstrap.servers": "broker:9093",
                                     "logger": kafka_logger}


def test_kafka_option_given_twice_keeps_the_last() -> None:
    options = parse("--kafka-option", "acks=1", "--kafka-option", "acks=all")
    assert options["kafka-options"] == {"acks": "all"}


def test_bootstrap_option_wins_over_a_kafka_option() -> None:
    options = parse("--kafka-option", "bootstrap.servers=elsewhere:1", "--kafka", "here:2")
    assert kafka_config(options)["bootstrap.servers"] == "here:2"


def test_kafka_options_from_the_environment_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KAFKA_OPTIONS_VARIABLE, "security.protocol=SSL, ssl.ca.location=/ca.pem,")
    assert parse()["kafka-options"] == {"security.protocol": "SSL", "ssl.ca.location": "/ca.pem"}


def test_kafka_options_from_the_environment_one_a_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KAFKA_OPTIONS_VARIABLE, "sasl.jaas.config=a,b\nsasl.mechanism=PLAIN\n")
    assert parse()["kafka-options"] == {"sasl.jaas.config": "a,b", "sasl.mechanism": "PLAIN"}


def test_kafka_option_on_the_command_line_wins_over_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KAFKA_OPTIONS_VARIABLE, "security.protocol=SSL,client.id=env")
    options = parse("--kafka-option", "client.id=cli")
    assert options["kafka-options"] == {"client.id": "cli"}


@pytest.mark.parametrize("value", ["novalue", "=value", " =value", ""])
def test_bad_kafka_option(value: str) -> None:
    with pytest.raises(usage.UsageError, match="KEY=VALUE"):
        parse("--kafka-option", value)


@pytest.mark.parametrize("value", ["novalue", "a=1,=2", "a=1\nbroken"])
def test_bad_kafka_options_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(KAFKA_OPTIONS_VARIABLE, value)
    with pytest.raises(usage.UsageError):
        parse()


# --- refusals ----------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["nope:1", "tcp:notaport", "tcp:port=abc", "9013x", "unknown"])
def test_bad_api_endpoint(endpoint: str) -> None:
    with pytest.raises(usage.UsageError, match="--api"):
        parse("--api", endpoint)


def test_bad_api_endpoint_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESTCONSUMER_API", "nope:1")
    with pytest.raises(usage.UsageError, match="--api"):
        parse()


@pytest.mark.parametrize("url", ["http://localhost:6379", "localhost:6379", "redis://h/abc",
                                 "redis://h:notaport/0"])
def test_bad_redis_url(url: str) -> None:
    with pytest.raises(usage.UsageError, match="--redis"):
        parse("--redis", url)


def test_bad_redis_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "http://localhost:6379")
    with pytest.raises(usage.UsageError, match="--redis"):
        parse()


@pytest.mark.parametrize("args", [["--api-user", "admin"], ["--api-password", "secret"]])
def test_user_and_password_go_together(args: list[str]) -> None:
    with pytest.raises(usage.UsageError, match="--api-user"):
        parse(*args)


def test_user_from_the_command_line_password_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESTCONSUMER_API_PASSWORD", "secret")
    options = parse("--api-user", "admin")
    assert (options["api-user"], options["api-password"]) == ("admin", "secret")


@pytest.mark.parametrize("fmt", ["xml", "JSON", "Text", "logfmt"])
def test_log_format_is_text_or_json(fmt: str) -> None:
    with pytest.raises(usage.UsageError, match="--log-format"):
        parse("--log-format", fmt)


def test_log_format_from_the_environment_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESTCONSUMER_LOG_FORMAT", "xml")
    with pytest.raises(usage.UsageError, match="--log-format"):
        parse()


def test_missing_jobs_folder(tmp_path: Path) -> None:
    with pytest.raises(usage.UsageError, match="--jobs"):
        parse("--jobs", str(tmp_path / "absent"))


def test_jobs_must_be_a_folder(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    path.write_text("{}", encoding="utf-8")
    with pytest.raises(usage.UsageError, match="--jobs"):
        parse("--jobs", str(path))


def test_missing_jobs_folder_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RESTCONSUMER_JOBS", str(tmp_path / "absent"))
    with pytest.raises(usage.UsageError, match="--jobs"):
        parse()


def test_bad_tokens_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(usage.UsageError, match="tokens file"):
        parse("--tokens", str(path))
    with pytest.raises(usage.UsageError, match="tokens file"):
        parse("--tokens", str(tmp_path / "absent.json"))


def test_tokens_file_that_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(usage.UsageError, match=r"--tokens: cannot read the tokens file .*Is a directory"):
        parse("--tokens", str(tmp_path))


def test_missing_ca_file(tmp_path: Path) -> None:
    with pytest.raises(usage.UsageError, match=r"--ca-file .*No such file"):
        parse("--ca-file", str(tmp_path / "absent.pem"))


def test_ca_file_that_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(usage.UsageError, match=r"--ca-file .*cannot read it: Is a directory"):
        parse("--ca-file", str(tmp_path))


def test_ca_file_without_a_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    for path in (pki.key_file, empty):
        with pytest.raises(usage.UsageError, match=r"--ca-file .*no PEM certificate in it"):
            parse("--ca-file", str(path))


@pytest.mark.parametrize("text", [
    "-----BEGIN CERTIFICATE-----\n",
    "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
])
def test_damaged_ca_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "damaged.pem"
    path.write_text(text, encoding="ascii")
    with pytest.raises(usage.UsageError, match=r"--ca-file .*damaged"):
        parse("--ca-file", str(path))


def test_one_damaged_certificate_spoils_the_bundle(tmp_path: Path) -> None:
    good = make_pki(tmp_path / "pki").ca_file.read_text(encoding="ascii")
    path = tmp_path / "bundle.pem"
    path.write_text(good + good[: len(good) // 2] + "\n-----END CERTIFICATE-----\n", encoding="ascii")
    with pytest.raises(usage.UsageError, match=r"--ca-file .*damaged"):
        parse("--ca-file", str(path))


def test_ca_bundle_of_several_certificates(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    path = tmp_path / "bundle.pem"
    path.write_bytes(pki.ca_file.read_bytes() + pki.cert_file.read_bytes() + pki.key_file.read_bytes())
    assert parse("--ca-file", str(path))["ca-file"] == str(path)


def test_bad_ca_file_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RESTCONSUMER_CA_FILE", str(tmp_path / "absent.pem"))
    with pytest.raises(usage.UsageError, match="--ca-file"):
        parse()


def test_unknown_option() -> None:
    with pytest.raises(usage.UsageError):
        parse("--no-such-option", "x")


# --- ./jobs default ----------------------------------------------------------------


def test_jobs_defaults_to_the_jobs_folder_when_it_exists(clean_environment: Path) -> None:
    assert parse()["jobs"] is None
    (clean_environment / "jobs").mkdir()
    jobs = parse()["jobs"]
    assert jobs is not None
    assert Path(jobs).resolve() == (clean_environment / "jobs").resolve()


def test_a_jobs_file_is_not_the_default_folder(clean_environment: Path) -> None:
    (clean_environment / "jobs").write_text("not a folder", encoding="utf-8")
    assert parse()["jobs"] is None


def test_given_jobs_folder_wins_over_the_default(clean_environment: Path, tmp_path: Path) -> None:
    (clean_environment / "jobs").mkdir()
    other = folder(tmp_path, "other-jobs")
    assert parse("--jobs", other)["jobs"] == other


# --- makeService -------------------------------------------------------------------

JOB = {
    "id": "demo", "owner": "demo", "type": "POST", "topic": "demo.people",
    "datamap": {"id": "$.msg.id"}, "url": "http://127.0.0.1:9/people/{id}",
}


def children(service: IService) -> list[IService]:
    """The direct children of a MultiService."""
    assert isinstance(service, MultiService)
    return list(service)


def test_make_service_builds_the_service_tree(tmp_path: Path) -> None:
    from twisted.internet import reactor

    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "demo.json").write_text(json.dumps(JOB), encoding="utf-8")
    options = parse("--jobs", str(jobs), "--api", "tcp:0:interface=127.0.0.1", "--api-token", "t",
                    "--redis", "redis://127.0.0.1:1/0", "--kafka", "127.0.0.1:1")
    service = makeService(options, reactor)
    assert isinstance(service, MultiService)
    assert not service.running
    kids = children(service)
    kinds = [type(kid) for kid in kids]
    for kind in (JobStore, KafkaProbe, JobsFolder, APIServer):
        assert kinds.count(kind) == 1, kind
    assert not any(kid.running for kid in kids)
    store = next(k for k in kids if isinstance(k, JobStore))
    assert store.address == RedisAddress("127.0.0.1", 1, 0, None, None, False)
    folder_service = next(k for k in kids if isinstance(k, JobsFolder))
    assert folder_service.folder == jobs
    assert [f.name for f in folder_service.files] == ["demo.json"]


def test_make_service_without_jobs_folder() -> None:
    from twisted.internet import reactor

    options = parse("--api", "tcp:0:interface=127.0.0.1")
    service = makeService(options, reactor)
    kinds = [type(kid) for kid in children(service)]
    assert JobsFolder not in kinds
    for kind in (JobStore, KafkaProbe, APIServer):
        assert kinds.count(kind) == 1, kind


@pytest.mark.parametrize("text", ["tcp:0", "tcp:port=0:interface=127.0.0.1", "tcp6:0:interface=\\:\\:1",
                                  "unix:/run/restconsumer.sock"])
def test_the_api_endpoint_is_named_as_written(text: str) -> None:
    """The log and a failure to listen name the endpoint the way the operator wrote it."""
    from twisted.internet import reactor

    service = makeService(parse("--api", text, "--api-token", "t"), reactor)
    server = next(kid for kid in children(service) if isinstance(kid, APIServer))
    assert server.endpoint_name == text


def test_make_service_uses_the_default_reactor() -> None:
    options = parse("--api", "tcp:0:interface=127.0.0.1", "--api-token", "t")
    assert isinstance(tap.makeService(options), MultiService)


@pytest.mark.parametrize("value", ["0", "-1", "soon", "90000"])
def test_reconcile_every_must_be_sensible_seconds(value: str) -> None:
    with pytest.raises(usage.UsageError, match="reconcile-every"):
        parse("--reconcile-every", value)


# --- byte budget and revocation grace ----------------------------------------------


@pytest.mark.parametrize(("value", "mib"), [("16", 16), ("64", 64), (" 512 ", 512), ("4096", 4096)])
def test_max_buffer_mb_is_kept_in_bytes(value: str, mib: int) -> None:
    assert parse("--max-buffer-mb", value)["max-buffer-bytes"] == mib * 1024 * 1024


def test_max_buffer_mb_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESTCONSUMER_MAX_BUFFER_MB", "100")
    assert parse()["max-buffer-bytes"] == 100 * 1024 * 1024
    assert parse("--max-buffer-mb", "32")["max-buffer-bytes"] == 32 * 1024 * 1024


@pytest.mark.parametrize("value", ["15", "0", "-256", "64.5", "1e3", "lots", ""])
def test_max_buffer_mb_is_a_whole_number_of_at_least_16(value: str) -> None:
    with pytest.raises(usage.UsageError, match=r"--max-buffer-mb .*at least 16"):
        parse("--max-buffer-mb", value)


def test_bad_max_buffer_mb_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESTCONSUMER_MAX_BUFFER_MB", "8")
    with pytest.raises(usage.UsageError, match="--max-buffer-mb"):
        parse()


@pytest.mark.parametrize(("value", "seconds"), [("0", 0.0), ("0.25", 0.25), ("10", 10.0), ("600", 600.0)])
def test_revoke_grace_in_seconds(value: str, seconds: float) -> None:
    grace = parse("--revoke-grace", value)["revoke-grace"]
    assert isinstance(grace, float)
    assert grace == seconds


@pytest.mark.parametrize("value", ["-1", "600.5", "nan", "inf", "soon", ""])
def test_revoke_grace_from_0_to_600(value: str) -> None:
    with pytest.raises(usage.UsageError, match=r"--revoke-grace .*0 to 600"):
        parse("--revoke-grace", value)


def test_bad_revoke_grace_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESTCONSUMER_REVOKE_GRACE", "3600")
    with pytest.raises(usage.UsageError, match="--revoke-grace"):
        parse()


def test_option_errors_end_twistd_with_status_1(tmp_path: Path) -> None:
    """A UsageError from these options makes ``twistd restconsumer`` exit 1, the reason printed."""
    done = subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
         "restconsumer", "--max-buffer-mb", "8"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=60)
    assert done.returncode == 1
    assert "--max-buffer-mb takes a whole number of MiB, at least 16, not '8'" in done.stdout


@pytest.mark.parametrize("value", ["", "a b", "x" * 201, "é"])
def test_an_instance_id_must_be_a_plain_name(value: str) -> None:
    with pytest.raises(usage.UsageError, match="instance-id"):
        parse("--instance-id", value)


def test_an_instance_id_makes_every_jobs_membership_static() -> None:
    from twisted.internet import reactor

    service = makeService(parse("--instance-id", "node-a", "--api-token", "t"), reactor)
    [supervisor] = [kid for kid in children(service) if type(kid).__name__ == "Supervisor"]
    assert supervisor._shared.kafka["group.instance.id"] == "node-a"  # type: ignore[attr-defined]
