"""``twistd restconsumer``: its options (each also read from the environment) and service tree."""

from __future__ import annotations

import gc
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IService, Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.server import Site

from restconsumer import __version__
from restconsumer.api.auth import Authenticator, load_token_file
from restconsumer.api.routes import API, MAX_PREVIEW_BODY
from restconsumer.api.server import APIServer, DrainingSite, OrderedServices
from restconsumer.base.pem import read_certificates
from restconsumer.control.channel import JobControl
from restconsumer.control.jobsdir import JobsFolder
from restconsumer.control.offsets import OffsetMover
from restconsumer.control.redis import RedisAddress
from restconsumer.control.status import StatusReporter
from restconsumer.control.store import JobStore
from restconsumer.control.supervisor import Supervisor
from restconsumer.control.watch import DependencyWatch
from restconsumer.delivery.budget import ByteBudget
from restconsumer.delivery.deadletters import DeadLetterReader, DeadLetters
from restconsumer.delivery.metrics import MULTIPROC_ENV, Metrics, MetricsFlusher, MetricsResource
from restconsumer.delivery.registry import OPTIONS as REGISTRY_OPTIONS
from restconsumer.delivery.registry import SchemaRegistry, check_url, parse_option, registry_headers
from restconsumer.delivery.replay import Replays
from restconsumer.delivery.runner import Shared
from restconsumer.delivery.sender import HTTPSender
from restconsumer.jobs.model import Policy
from restconsumer.jobs.secrets import ENV_PREFIX, SecretKey
from restconsumer.kafka.health import KafkaProbe
from restconsumer.ops.embedded import (
    DemoFeed,
    DemoSink,
    EmbeddedGuide,
    EmbeddedKafka,
    EmbeddedRedis,
    EmbeddedSite,
    loopback_endpoint,
)
from restconsumer.ops.logs import LEVELS, kafka_logger
from restconsumer.ops.logs import configure as configure_logs
from restconsumer.ops.workers import ParentWatch, WorkerPool, worker_environment

__all__ = ["APIServer", "Options", "kafka_config", "makeService"]

log = Logger()

#: option name → (environment variable, default)
ENVIRONMENT: dict[str, tuple[str, str | None]] = {
    "api": ("RESTCONSUMER_API", "tcp:9013"),
    "kafka": ("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092"),
    "redis": ("REDIS_URL", "redis://localhost:6379/0"),
    "jobs": ("RESTCONSUMER_JOBS", None),
    "api-token": ("RESTCONSUMER_API_TOKEN", None),
    "api-user": ("RESTCONSUMER_API_USER", None),
    "api-password": ("RESTCONSUMER_API_PASSWORD", None),
    "tokens": ("RESTCONSUMER_TOKENS", None),
    "allow-hosts": ("RESTCONSUMER_ALLOW_HOSTS", None),
    "ca-file": ("RESTCONSUMER_CA_FILE", None),
    "log-format": ("RESTCONSUMER_LOG_FORMAT", "text"),
    "log-level": ("RESTCONSUMER_LOG_LEVEL", "info"),
    "metrics": ("RESTCONSUMER_METRICS", None),
    "reconcile-every": ("RESTCONSUMER_RECONCILE_EVERY", "30"),
    "max-buffer-mb": ("RESTCONSUMER_MAX_BUFFER_MB", "256"),
    "revoke-grace": ("RESTCONSUMER_REVOKE_GRACE", "10"),
    "workers": ("RESTCONSUMER_WORKERS", "1"),
    "schema-registry": ("RESTCONSUMER_SCHEMA_REGISTRY", None),
    "instance-id": ("RESTCONSUMER_INSTANCE_ID", None),
}

#: the secret options (SPEC §8): option name → environment variable; no defaults
SECRET_ENVIRONMENT: dict[str, str] = {
    "secret-key": "RESTCONSUMER_SECRET_KEY_FILE",
    "secrets-dir": "RESTCONSUMER_SECRETS_DIR",
}

#: the smallest byte budget, in MiB: below it one large message would pause everything
MIN_BUFFER_MB = 16
#: the longest a revoked partition's requests may run on, in seconds
MAX_REVOKE_GRACE = 600.0


def _endpoint(description: str) -> IStreamServerEndpoint:
    """A server endpoint from its string, as ``makeService`` will make it (checked early, so
    that a mistake is a usage error); nothing listens yet."""
    from twisted.internet import reactor  # the installed one: twistd installs it before options

    return endpoints.serverFromString(reactor, description)


def _check_ca_file(path: str) -> None:
    """Refuse a CA bundle that cannot be read or holds no PEM certificate."""
    try:
        pem = Path(path).read_bytes()
    except OSError as e:
        raise usage.UsageError(f"--ca-file {path}: cannot read it: {e.strerror or e}") from e
    try:
        read_certificates(pem)
    except ValueError as e:
        raise usage.UsageError(f"--ca-file {path}: {e}") from None


def _parse_kafka_option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise usage.UsageError(f"--kafka-option takes KEY=VALUE, not {text!r}")
    return key.strip(), value.strip()


def _parse_registry_option(text: str) -> tuple[str, str]:
    try:
        return parse_option(text)
    except ValueError as e:
        raise usage.UsageError(f"--schema-registry-option {e}") from None


def _option_items(text: str, keys: Iterable[str] | None = None) -> list[str]:
    """The KEY=VALUE items of an options variable: lines, or comma-separated when it has no
    line break. With ``keys``, only a comma followed by one of them separates (a password
    may hold a comma)."""
    if "\n" in text:
        items = text.splitlines()
    elif keys is not None:
        items = re.split(r",(?=\s*(?:" + "|".join(re.escape(k) for k in keys) + r")=)", text)
    else:
        items = text.split(",")
    return [i for i in items if i.strip()]


class Options(usage.Options):
    """The command line of ``twistd restconsumer``; an option given wins over its variable."""

    synopsis = "[options]"
    longdesc = ("Reads Kafka topics and turns every message into a REST request, as declared "
                "by jobs kept in Redis and managed over an HTTP API. Every option can also be "
                "set through the environment variable named in its help.")
    optFlags = [
        ["embedded", None, "Try it out: an in-process Kafka (librdkafka's mock cluster) and a "
                           "private redis-server, both gone on exit. Not for production."],
        ["worker", None, "(internal) Run as a worker process of --workers: jobs only, no API."],
    ]
    optParameters = [
        ["api", None, None, "API endpoint, a Twisted endpoint string "
                            "[RESTCONSUMER_API, default tcp:9013]"],
        ["kafka", None, None, "Kafka bootstrap servers "
                              "[KAFKA_BOOTSTRAP_SERVERS, default localhost:9092]"],
        ["redis", None, None, "Redis URL, redis[s]://[:password@]host[:port][/db] or, behind Sentinel, "
                              "redis[s]+sentinel://[:password@]HOST:PORT[,HOST:PORT...]/MASTER[/DB]"
                              "[?sentinel_password=...] "
                              "[REDIS_URL, default redis://localhost:6379/0]"],
        ["jobs", None, None, "Folder of *.json job files loaded at start-up "
                             "[RESTCONSUMER_JOBS, default ./jobs when it exists]"],
        ["api-token", None, None, "Admin token for the API (Authorization: Bearer) "
                                  "[RESTCONSUMER_API_TOKEN]"],
        ["api-user", None, None, "Admin user for the API (Basic auth) [RESTCONSUMER_API_USER]"],
        ["api-password", None, None, "Password of --api-user [RESTCONSUMER_API_PASSWORD]"],
        ["tokens", None, None, "JSON file of owner-scoped API tokens, {token: owner} "
                               "[RESTCONSUMER_TOKENS]"],
        ["instance-id", None, None, "A stable name of this instance: static group membership "
                                    "(group.instance.id), a restart within the session timeout "
                                    "moves nothing [RESTCONSUMER_INSTANCE_ID]"],
        ["allow-hosts", None, None, "Comma-separated hosts that job URLs may name "
                                    "[RESTCONSUMER_ALLOW_HOSTS, default any host]"],
        ["ca-file", None, None, "PEM bundle of CAs for HTTPS endpoints "
                                "[RESTCONSUMER_CA_FILE, default the system's CAs]"],
        ["secret-key", None, None, "File of Fernet keys, one a line, the first encrypting: job "
                                   "secrets are stored encrypted in Redis "
                                   "[RESTCONSUMER_SECRET_KEY_FILE, default: stored as they are]"],
        ["secrets-dir", None, None, "Folder whose files jobs may name as ${file:NAME} secrets "
                                    "[RESTCONSUMER_SECRETS_DIR, default none]"],
        ["log-format", None, None, "text or json [RESTCONSUMER_LOG_FORMAT, default text]"],
        ["log-level", None, None, "debug, info, warn or error [RESTCONSUMER_LOG_LEVEL, default info]"],
        ["metrics", None, None, "Serve GET /metrics without auth on a listener of its own, a "
                                "Twisted endpoint string [RESTCONSUMER_METRICS, default: only "
                                "on the API, with auth]"],
        ["reconcile-every", None, None, "Seconds between two full comparisons of the running jobs "
                                        "with Redis [RESTCONSUMER_RECONCILE_EVERY, default 30]"],
        ["max-buffer-mb", None, None, "MiB this process may hold of messages fetched but not "
                                      "finished, librdkafka's pre-fetch included; at least 16 "
                                      "[RESTCONSUMER_MAX_BUFFER_MB, default 256]"],
        ["workers", None, None, "Processes that run the jobs on this machine, 1 to 64 "
                                "[RESTCONSUMER_WORKERS, default 1]"],
        ["revoke-grace", None, None, "Seconds a revoked partition's requests under way may run "
                                     "on before they are cancelled, 0 to 600 "
                                     "[RESTCONSUMER_REVOKE_GRACE, default 10]"],
        ["schema-registry", None, None, "Confluent Schema Registry URL, http(s)://host[:port][/path]: "
                                        "wire-format messages are decoded with its schemas "
                                        "[RESTCONSUMER_SCHEMA_REGISTRY, default none]"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["kafka-options"] = {}
        self._kafka_options_given = False
        self["schema-registry-options"] = {}
        self._registry_options_given = False

    def opt_kafka_option(self, value: str) -> None:
        """Any librdkafka property as KEY=VALUE, repeatable [RESTCONSUMER_KAFKA_OPTIONS]"""
        key, val = _parse_kafka_option(value)
        self["kafka-options"][key] = val
        self._kafka_options_given = True

    def opt_schema_registry_option(self, value: str) -> None:
        """basic.auth.user.info=USER:PASSWORD or bearer.auth.token=TOKEN for the Schema Registry
        [RESTCONSUMER_SCHEMA_REGISTRY_OPTIONS]"""
        key, val = _parse_registry_option(value)
        self["schema-registry-options"][key] = val
        self._registry_options_given = True

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"restconsumer {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        """Fill what was not given from the environment, then check it all."""
        self._from_environment()
        self._check_schema_registry()
        self._check_places()
        self._check_credentials()
        self._check_numbers()
        self._check_instance_id()
        self._check_logs()
        if self["embedded"] and EmbeddedRedis.binary() is None:
            raise usage.UsageError("--embedded needs redis-server on the PATH "
                                   "(apt-get install redis-server)")

    def _from_environment(self) -> None:
        env = os.environ
        for name, (variable, default) in ENVIRONMENT.items():
            if self[name] is None:
                self[name] = env.get(variable) or default
        if not self._kafka_options_given and env.get("RESTCONSUMER_KAFKA_OPTIONS"):
            text = env["RESTCONSUMER_KAFKA_OPTIONS"]
            self["kafka-options"] = dict(_parse_kafka_option(i) for i in _option_items(text))
        if not self._registry_options_given and env.get("RESTCONSUMER_SCHEMA_REGISTRY_OPTIONS"):
            text = env["RESTCONSUMER_SCHEMA_REGISTRY_OPTIONS"]
            self["schema-registry-options"] = dict(_parse_registry_option(i)
                                                   for i in _option_items(text, REGISTRY_OPTIONS))

    def _check_places(self) -> None:
        """Folders, endpoints, Redis, hosts and CAs."""
        if self["jobs"] is None and Path("jobs").is_dir():
            self["jobs"] = "jobs"
        if self["jobs"] is not None and not Path(self["jobs"]).is_dir():
            raise usage.UsageError(f"--jobs {self['jobs']}: no such folder")

        try:
            _endpoint(self["api"])
        except Exception as e:
            raise usage.UsageError(f"--api {self['api']!r} is not an endpoint string: {e}") from e
        if self["metrics"]:
            try:
                _endpoint(self["metrics"])
            except Exception as e:
                raise usage.UsageError(f"--metrics {self['metrics']!r} is not an endpoint string: "
                                       f"{e}") from e
        try:
            self["redis-address"] = RedisAddress.from_url(self["redis"])
        except ValueError as e:
            raise usage.UsageError(f"--redis: {e}") from e
        hosts = [h.strip().lower() for h in (self["allow-hosts"] or "").split(",") if h.strip()]
        self["allowed-hosts"] = frozenset(hosts) if hosts else None

        if self["ca-file"]:
            _check_ca_file(self["ca-file"])

    def _check_credentials(self) -> None:
        """The API's credentials, the tenants' tokens, the secret key."""
        if bool(self["api-user"]) != bool(self["api-password"]):
            raise usage.UsageError("--api-user and --api-password go together")
        for name, variable in SECRET_ENVIRONMENT.items():
            if self[name] is None:
                self[name] = os.environ.get(variable) or None
        self["scoped-tokens"] = {}
        self["topic-limits"] = {}
        self["destinations"] = {}
        if self["tokens"]:
            try:
                tokens = load_token_file(self["tokens"])
            except ValueError as e:
                raise usage.UsageError(f"--tokens: {e}") from e
            self["scoped-tokens"], self["topic-limits"] = tokens.owners, tokens.topic_limits
            self["destinations"] = tokens.destinations
        self["secret-keys"] = None
        if self["secret-key"]:
            try:
                self["secret-keys"] = SecretKey.from_file(self["secret-key"])
            except ValueError as e:
                raise usage.UsageError(f"--secret-key: {e}") from e
        if self["secrets-dir"] and not Path(self["secrets-dir"]).is_dir():
            raise usage.UsageError(f"--secrets-dir {self['secrets-dir']}: no such folder")

    def _check_numbers(self) -> None:
        try:
            self["reconcile-seconds"] = float(self["reconcile-every"])
            if not 0.1 <= self["reconcile-seconds"] <= 86400:
                raise ValueError
        except ValueError:
            raise usage.UsageError("--reconcile-every takes seconds, from 0.1 to 86400") from None

        try:
            megabytes = int(self["max-buffer-mb"])
            if megabytes < MIN_BUFFER_MB:
                raise ValueError
        except ValueError:
            raise usage.UsageError(f"--max-buffer-mb takes a whole number of MiB, at least "
                                   f"{MIN_BUFFER_MB}, not {self['max-buffer-mb']!r}") from None
        self["max-buffer-bytes"] = megabytes * 1024 * 1024

        try:
            self["revoke-grace"] = float(self["revoke-grace"])
            if not 0 <= self["revoke-grace"] <= MAX_REVOKE_GRACE:
                raise ValueError
        except ValueError:
            raise usage.UsageError(f"--revoke-grace takes seconds, from 0 to {MAX_REVOKE_GRACE:g}, "
                                   f"not {self['revoke-grace']!r}") from None

        try:
            self["worker-count"] = int(self["workers"])
            if not 1 <= self["worker-count"] <= 64:
                raise ValueError
        except ValueError:
            raise usage.UsageError(f"--workers takes a whole number from 1 to 64, "
                                   f"not {self['workers']!r}") from None
        if self["worker-count"] > 1 and self["embedded"]:
            raise usage.UsageError("--workers is for a real Kafka; --embedded runs one process")

    def _check_instance_id(self) -> None:
        """A stable name for static membership: Kafka's group.instance.id of every job."""
        name = self["instance-id"]
        if name is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", name):
            raise usage.UsageError("--instance-id takes 1 to 200 letters, digits, '.', '_' or '-'")

    def _check_logs(self) -> None:
        """Log format and level (the logs are configured here, for what follows)."""
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError("--log-format is text or json")
        self["log-level"] = self["log-level"].lower()
        if self["log-level"] not in LEVELS:
            raise usage.UsageError("--log-level is debug, info, warn or error")
        configure_logs(self["log-level"], self["log-format"])
        if self.parent is not None and not self.parent.get("logger"):
            # twistd reads its log observer (a dotted name) after our options are parsed.
            self.parent["logger"] = "restconsumer.ops.logs.observer"

    def _check_schema_registry(self) -> None:
        if not self["schema-registry"]:
            if self["schema-registry-options"]:
                raise usage.UsageError("--schema-registry-option needs --schema-registry")
            return
        try:
            self["schema-registry"] = check_url(self["schema-registry"])
        except ValueError as e:
            raise usage.UsageError(f"--schema-registry: {e}") from None
        try:
            registry_headers(self["schema-registry-options"])
        except ValueError as e:
            raise usage.UsageError(f"--schema-registry-option: {e}") from None


class Drain(Service):
    """What SIGTERM does first (SPEC §6): ``/health/ready`` answers 503 at once (``/health/live``
    stays 200), then every job drains — nothing new taken, half-full batches sent, requests
    under way finish within ``--revoke-grace`` or are cancelled, what waits is released
    uncommitted, finished offsets committed, consumers leave — while the API still answers;
    only then does the API stop."""

    def __init__(self, api: API, supervisor: Supervisor, workers: IService | None = None) -> None:
        self._api = api
        self._supervisor = supervisor
        self._workers = workers

    def stopService(self) -> Deferred[Any]:
        """Say not ready, and drain the jobs — the workers' too, at the same time."""
        super().stopService()
        self._api.draining = True
        log.info("draining: /health/ready answers 503; the jobs finish what is under way")
        draining = [self._supervisor.stopService()]
        if self._workers is not None:
            draining.append(self._workers.stopService())  # SIGTERM: each drains as this one
        return gatherResults(draining, consumeErrors=True)


class _RemoveOnStop(Service):
    """Removes a folder of the process's when the service stops."""

    def __init__(self, folder: str) -> None:
        self._folder = folder

    def stopService(self) -> None:
        """Remove the folder."""
        super().stopService()
        shutil.rmtree(self._folder, ignore_errors=True)


def kafka_config(options: Options) -> dict[str, Any]:
    """The librdkafka settings every Kafka client of the service starts from."""
    # librdkafka's own messages go through the service's log.
    return {"logger": kafka_logger, **options["kafka-options"], "bootstrap.servers": options["kafka"]}


def policy(options: Options, *, hosts: bool = True) -> Policy:
    """What jobs must respect besides their own rules (SPEC §8); ``hosts``: the allowlist too
    (when a job starts, the sender enforces it at send time instead)."""
    key: SecretKey | None = options["secret-keys"]
    return Policy(allow_hosts=options["allowed-hosts"] if hosts else None,
                  topic_limits=options["topic-limits"],
                  files_allowed=options["secrets-dir"] is not None,
                  secret_digest=key.digest if key is not None else None,
                  destinations=options["destinations"])


def secret_environment(options: Options) -> dict[str, str]:
    """What a worker of ``--workers`` needs besides :func:`worker_environment`: the secret
    variables jobs may reference, the key file, the secrets folder, the tokens file (topic
    limits are checked again when a job starts)."""
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
    for name, variable in (*SECRET_ENVIRONMENT.items(), ("tokens", "RESTCONSUMER_TOKENS")):
        env.pop(variable, None)
        if options[name]:
            env[variable] = os.path.abspath(options[name])
    return env


def _share_metrics(top: OrderedServices) -> None:
    """Make a folder where every process of ``--workers`` writes its metrics (``/metrics``
    adds them up), named in the environment the workers inherit; removed on stop."""
    folder = tempfile.mkdtemp(prefix="restconsumer-metrics-")
    os.environ[MULTIPROC_ENV] = folder
    top.addService(_RemoveOnStop(folder))


def tune_interpreter() -> None:
    """Tune the interpreter for this service's threads and objects (the plugin calls it before
    :func:`makeService`; tests that build the service in their own process do not)."""
    # The reactor answers every request of every job; the jobs' Kafka threads decode in
    # Python while it waits for the GIL. A thread asking for it gets it within 1 ms, not
    # Python's default 5 ms: batch mode went from 17,000 to 21,000 records/s.
    sys.setswitchinterval(0.001)
    # Records held while under way are many small objects that live long enough to reach
    # the oldest generation: with the default thresholds a full collection (40-120 ms,
    # both threads stopped) ran twice a second in batch mode, 13 % of the time. Young
    # collections every 50,000 allocations and a full one after 20 x 20 of them: 17 full
    # collections in a 200,000-record run became 2-6 (bench/throughput.py).
    gc.set_threshold(50_000, 20, 20)
    gc.freeze()  # what start-up made (modules, classes) is never garbage: not scanned again


def _embedded(options: Options, reactor: Any, top: OrderedServices) -> RedisAddress:
    """``--embedded``: librdkafka's mock cluster and a private redis-server, the API on loopback."""
    embedded_kafka = EmbeddedKafka()
    embedded_kafka.setServiceParent(top)
    embedded_redis = EmbeddedRedis(reactor)
    embedded_redis.setServiceParent(top)
    options["kafka"] = embedded_kafka.bootstrap
    redis_address = RedisAddress.from_url(embedded_redis.url)
    log.warn("*** EMBEDDED MODE: for trying restconsumer out only. Kafka is librdkafka's "
             "in-memory mock cluster at {kafka}, Redis a private redis-server at {redis}; "
             "everything is lost on exit. ***", kafka=options["kafka"], redis=str(redis_address))
    options["api"], api_warning = loopback_endpoint(options["api"])
    if api_warning:
        log.warn(api_warning)
    return redis_address


@dataclass
class _Parts:
    """What the API and job control are built on."""

    store: JobStore
    kafka: dict[str, Any]
    shared: Shared
    metrics: Metrics
    registry: SchemaRegistry | None
    supervisor: Supervisor
    reporter: StatusReporter
    mover: OffsetMover


def _jobs(options: Options, reactor: Any, top: OrderedServices, redis_address: RedisAddress) -> _Parts:
    """The store, what every job shares to deliver, and job control."""
    store = JobStore(redis_address, secret_key=options["secret-keys"])
    store.setServiceParent(top)
    kafka = kafka_config(options)
    sender = HTTPSender(reactor, ca_file=options["ca-file"], allow_hosts=options["allowed-hosts"])
    sender.setServiceParent(top)
    dead_letters = DeadLetters(reactor, kafka)
    dead_letters.setServiceParent(top)
    budget = ByteBudget(options["max-buffer-bytes"])
    if options["worker-count"] > 1 and not options["worker"]:
        _share_metrics(top)
    metrics = Metrics()
    registry = None
    if options["schema-registry"]:
        # Stops after the jobs: a job may be decoding on its thread until then.
        registry = SchemaRegistry(reactor, options["schema-registry"], options["schema-registry-options"],
                                  tls=sender.tls_policy)
        registry.setServiceParent(top)
        log.info("schema registry at {url}", url=registry.url)
    jobs_kafka = kafka
    if options["instance-id"]:
        # Static membership (SPEC §6): one id per process; each job is its own group.
        jobs_kafka = {**kafka, "group.instance.id": options["instance-id"]}
    shared = Shared(reactor, jobs_kafka, sender, dead_letters, budget,
                    revoke_grace=options["revoke-grace"], metrics=metrics, registry=registry,
                    destinations=options["destinations"])
    supervisor = Supervisor(store, shared, policy=policy(options, hosts=False),
                            secrets_dir=options["secrets-dir"])
    TimerService(2.0, lambda: metrics.refresh(supervisor.runners, budget.held)).setServiceParent(top)
    # Stops after the jobs, so that their last counts are written.
    MetricsFlusher(metrics).setServiceParent(top)
    # The reporter stops after the jobs, so that their last counts reach Redis.
    reporter = StatusReporter(store, supervisor, reactor)
    reporter.setServiceParent(top)
    supervisor.setServiceParent(top)
    mover = OffsetMover(reactor, reactor, kafka, store)
    mover.setServiceParent(top)
    JobControl(reactor, redis_address, supervisor,
               every=options["reconcile-seconds"]).setServiceParent(top)
    return _Parts(store, kafka, shared, metrics, registry, supervisor, reporter, mover)


def _api(options: Options, reactor: Any, top: OrderedServices, parts: _Parts,
         redis_address: RedisAddress) -> None:
    """The jobs folder, the health probes, the API (and its dashboard), the workers, /metrics."""
    store, supervisor, reporter = parts.store, parts.supervisor, parts.reporter
    if options["jobs"]:
        JobsFolder(options["jobs"], store, reactor,
                   policy=policy(options)).setServiceParent(top)

    probe = KafkaProbe(reactor, reactor, parts.kafka)
    probe.setServiceParent(top)
    DependencyWatch(store.ping, probe.check).setServiceParent(top)

    auth = Authenticator.configure(options["api-token"], options["api-user"],
                                   options["api-password"], options["scoped-tokens"])
    token_note = None
    if auth.generated:
        # Printed this once only: it is the one way to learn the generated token.
        token_note = (f"No API credentials configured: generated API token (shown once): "
                      f"{auth.token}  -- use: Authorization: Bearer <token>")
    demo_sink = None
    if options["embedded"]:
        demo_sink = DemoSink()
        DemoFeed(reactor, options["kafka"], demo_sink).setServiceParent(top)
    reader = DeadLetterReader(reactor, parts.kafka)
    reader.setServiceParent(top)
    replays = Replays(reader, parts.shared, runnable=supervisor.runnable, runner_of=supervisor.runners.get,
                      store=store, owner=reporter.instance)
    api = API(store, auth, probe.check, supervisor=supervisor, reporter=reporter, mover=parts.mover,
              metrics=parts.metrics, reader=reader, replays=replays,
              clock=reactor, allow_hosts=options["allowed-hosts"], policy=policy(options),
              demo_sink=demo_sink, registry=parts.registry)
    workers: IService | None = None
    if options["worker-count"] > 1:
        environment = {**worker_environment(options), **secret_environment(options)}
        workers = WorkerPool(reactor, options["worker-count"] - 1, environment,
                             on_ended=Metrics.process_ended)
        workers.setServiceParent(top)
    if options["metrics"]:
        metrics_site = Site(MetricsResource(parts.metrics))
        StreamServerEndpointService(endpoints.serverFromString(reactor, options["metrics"]),
                                    metrics_site).setServiceParent(top)
    endpoint = endpoints.serverFromString(reactor, options["api"])
    site_type = EmbeddedSite if options["embedded"] else DrainingSite
    server = APIServer(endpoint, site_type(api.app.resource(), max_body=MAX_PREVIEW_BODY), reactor,
                       endpoint_name=options["api"], token_note=token_note,
                       description=f"Kafka {options['kafka']}, Redis {redis_address}")
    server.setServiceParent(top)
    # Stopped first: readiness says 503 at once, and the jobs drain while the API answers.
    Drain(api, supervisor, workers).setServiceParent(top)
    if options["embedded"]:
        EmbeddedGuide(reactor, store, server, auth, options["kafka"],
                      allow_hosts=options["allowed-hosts"]).setServiceParent(top)


def makeService(options: Options, reactor: Any = None) -> IService:
    """The whole service: embedded parts if asked, store, delivery, job control, API.

    Children stop in the reverse order: the API first, then job control, the jobs (which
    commit what they finished), the dead letters (flushed), the HTTP pool, the store.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    top = OrderedServices()
    redis_address = _embedded(options, reactor, top) if options["embedded"] else options["redis-address"]
    parts = _jobs(options, reactor, top, redis_address)
    if options["worker"]:
        # A worker of --workers: jobs only; the main process answers the API.
        ParentWatch(reactor).setServiceParent(top)
    else:
        _api(options, reactor, top, parts, redis_address)
    return top
