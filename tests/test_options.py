"""Unit tests of restconsumer.tap: command-line options, their environment variables, makeService."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from twisted.application.service import IService, MultiService
from twisted.python import usage

from restconsumer import tap
from restconsumer.health import KafkaProbe
from restconsumer.jobsdir import JobsFolder
from restconsumer.store import JobStore, RedisAddress
from restconsumer.tap import ENVIRONMENT, APIServer, Options, kafka_config, makeService

KAFKA_OPTIONS_VARIABLE = "RESTCONSUMER_KAFKA_OPTIONS"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No restconsumer variable set, and an empty working folder (so no ./jobs)."""
    for variable, _ in ENVIRONMENT.values():
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv(KAFKA_OPTIONS_VARIABLE, raising=False)
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
    """A file standing for a CA bundle (only its existence is checked)."""
    path = tmp_path / f"{name}.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\n", encoding="utf-8")
    return str(path)


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
}

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
    assert options["kafka-options"] == {}
    assert not options["embedded"]
    assert kafka_config(options) == {"bootstrap.servers": "localhost:9092"}


@pytest.mark.parametrize("name", sorted(ENVIRONMENT))
def test_option_read_from_its_environment_variable(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env_value, _ = VALUES[name](tmp_path)
    monkeypatch.setenv(ENVIRONMENT[name][0], env_value)
    if name in COMPANIONS:
        other, value = COMPANIONS[name]
        monkeypatch.setenv(ENVIRONMENT[other][0], value)
    assert parse()[name] == env_value


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
    assert parse(f"--{name}", cli_value)[name] == cli_value


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
    assert kafka_config(options) == {**options["kafka-options"], "bootstrap.servers": "broker:9093"}


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


def test_missing_ca_file(tmp_path: Path) -> None:
    with pytest.raises(usage.UsageError, match="--ca-file"):
        parse("--ca-file", str(tmp_path / "absent.pem"))


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


def test_make_service_uses_the_default_reactor() -> None:
    options = parse("--api", "tcp:0:interface=127.0.0.1", "--api-token", "t")
    assert isinstance(tap.makeService(options), MultiService)


@pytest.mark.parametrize("value", ["0", "-1", "soon", "90000"])
def test_reconcile_every_must_be_sensible_seconds(value: str) -> None:
    with pytest.raises(usage.UsageError, match="reconcile-every"):
        parse("--reconcile-every", value)
