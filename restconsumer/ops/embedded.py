"""``--embedded``: an in-process Kafka (librdkafka's mock cluster) and a private redis-server.

For trying the service out only: the mock cluster keeps everything in memory and the
Redis child saves nothing; both vanish when the service stops. Embedded mode also brings
its demo: a feed of made-up people on ``demo.people``, the demo job ``demo-echo`` (created
at start-up, never from the jobs folder) and the demo endpoint ``/embedded/echo/`` it
calls. It binds the API to 127.0.0.1 and, once started, prints what to do next: the Kafka
bootstrap address, the dashboard link, a ready ``curl`` line and a ``produce`` line.

``python3 -m restconsumer.ops.embedded produce BOOTSTRAP TOPIC`` sends each line of its
standard input as one message to a Kafka topic (the embedded one or any other).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import socket
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from confluent_kafka import KafkaError, Message, Producer
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from restconsumer.api.auth import Authenticator
from restconsumer.api.server import APIServer, DrainingSite
from restconsumer.control.store import JobStore, StoreUnavailable
from restconsumer.jobs.model import InvalidJob, validate

__all__ = ["DEMO_JOB_ID", "DEMO_TOPIC", "DemoFeed", "DemoSink", "EmbeddedGuide", "EmbeddedKafka",
           "EmbeddedRedis", "EmbeddedSite", "demo_job", "free_port", "loopback_endpoint", "main"]

#: the topic the demo feed writes to
DEMO_TOPIC = "demo.people"
#: the id of the demo job that embedded mode creates at start-up
DEMO_JOB_ID = "demo-echo"
#: seconds between two demo messages (``RESTCONSUMER_DEMO_EVERY`` changes it)
DEMO_EVERY = 3.0
#: seconds between two demo summary lines (``RESTCONSUMER_DEMO_SUMMARY_EVERY`` changes it)
DEMO_SUMMARY_EVERY = 30.0

log = Logger()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_seconds(variable: str, default: float) -> float:
    """A positive number of seconds from the environment, else ``default``."""
    try:
        value = float(os.environ.get(variable, ""))
    except ValueError:
        return default
    return value if 0 < value < 86400 else default


def loopback_endpoint(description: str) -> tuple[str, str | None]:
    """The API endpoint string bound to the loopback interface, and a warning if it cannot be.

    A ``tcp``/``ssl``/``tcp6`` endpoint that names no interface gets ``interface=127.0.0.1``
    (``::1`` for ``tcp6``); one that names another interface is kept as given, with a
    warning to log; other kinds (``unix:…``) are kept as they are.
    """
    parts = re.split(r"(?<!\\):", description)
    kind = parts[0].strip().lower()
    interface = next((p.split("=", 1)[1].replace("\\:", ":") for p in parts[1:]
                      if p.startswith("interface=")), None)
    if kind not in ("tcp", "ssl", "tcp6"):
        return description, None
    if interface is None or interface == "":
        loopback = r"\:\:1" if kind == "tcp6" else "127.0.0.1"
        kept = [p for p in parts if not p.startswith("interface=")]
        return ":".join([*kept, f"interface={loopback}"]), None
    if interface in ("127.0.0.1", "::1", "localhost") or interface.startswith("127."):
        return description, None
    return description, (f"--embedded: the API listens on {interface} as --api {description} asks, "
                         f"not only on 127.0.0.1: other machines may reach it")


def demo_job(api: str) -> dict[str, Any]:
    """The demo job: every person of the demo feed POSTed to the demo endpoint at ``api``."""
    return {
        "id": DEMO_JOB_ID,
        "owner": "demo",
        "type": "POST",
        "topic": [DEMO_TOPIC],
        "datamap": {
            "id": "$.msg.id",
            "name": "$.msg.name",
            "age": "$.msg.age",
            "source": "$.constant.source",
            "offset": "$.meta.offset",
        },
        "constant": {"source": "restconsumer-demo"},
        "url": f"{api}/embedded/echo/people/{{id}}",
        "query_params": ["source"],
        "json_body": ["id", "name", "age", "offset"],
        # A secret, to show how the API hides it ("***").
        "token": "change-me",
    }


class EmbeddedKafka(Service):
    """librdkafka's mock cluster, living as long as the client that created it."""

    log = Logger()

    def __init__(self, brokers: int = 1) -> None:
        # The cluster is created here, before the reactor runs, so its address is known
        # when the rest of the service is built.
        self._client: Producer | None = Producer({"test.mock.num.brokers": brokers,
                                                  "log_level": 3})
        metadata = self._client.list_topics(timeout=10)
        broker = next(iter(metadata.brokers.values()))
        self.bootstrap = f"{broker.host}:{broker.port}"

    def stopService(self) -> None:
        """Let the mock cluster go."""
        super().stopService()
        if self._client is not None:
            self._client.flush(1)
            self._client = None


class _RedisChild(ProcessProtocol):
    log = Logger()

    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()
        self.stopping = False

    def processEnded(self, reason: Failure) -> None:
        if not self.stopping:
            self.log.error("the embedded redis-server ended: {reason}", reason=reason.value)
        self.ended.callback(None)


class EmbeddedRedis(Service):
    """A private ``redis-server`` child on a free loopback port that saves nothing."""

    log = Logger()

    def __init__(self, reactor: IReactorProcess, port: int | None = None) -> None:
        self._reactor = reactor
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._child: _RedisChild | None = None
        self._process: Any = None

    @staticmethod
    def binary() -> str | None:
        """Where ``redis-server`` is, or None."""
        return shutil.which("redis-server")

    def startService(self) -> None:
        """Start the redis-server child."""
        super().startService()
        binary = self.binary()
        if binary is None:
            raise RuntimeError("--embedded needs redis-server (apt-get install redis-server)")
        self._child = _RedisChild()
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--protected-mode", "yes", "--loglevel", "warning"]
        # In a session of its own, Ctrl-C in a terminal (SIGINT to the whole foreground
        # process group) does not end it before the jobs that need it have stopped; the
        # service stops it last. setsid execs in place (the child is no group leader).
        setsid = shutil.which("setsid")
        command = [setsid, *args] if setsid else args
        self._process = self._reactor.spawnProcess(self._child, command[0], command, env=None)

    def stopService(self) -> Deferred[None]:
        """Stop the child; fires when it has ended."""
        super().stopService()
        child, self._child = self._child, None
        if child is None or child.ended.called:
            return succeed(None)
        child.stopping = True
        try:
            self._process.signalProcess("TERM")
        except Exception:  # already gone
            return succeed(None)
        return child.ended


class DemoSink:
    """What the demo endpoint of the API got: counted, and only the first request logged."""

    log = Logger()

    def __init__(self) -> None:
        self.received = 0

    def __call__(self, method: str, uri: str, body: bytes) -> None:
        """One request to ``/embedded/echo/…``."""
        self.received += 1
        if self.received == 1:
            self.log.info("demo: the demo endpoint got its first request: {method} {uri} {body} "
                          "(from now on, a summary line every so often)", method=method, uri=uri,
                          body=body.decode("utf-8", "replace")[:500])


class EmbeddedSite(DrainingSite):
    """The API's site in embedded mode: no access-log line for the demo endpoint's requests.

    The demo job calls that endpoint for every demo message; :class:`DemoFeed` sums them up.
    """

    def log(self, request: Any) -> None:
        """Write the access-log line of ``request``, unless it went to the demo endpoint."""
        if not request.path.startswith(b"/embedded/echo/"):
            super().log(request)


class DemoFeed(Service):
    """Produces a made-up person to ``demo.people`` every few seconds, for the demo job.

    It logs no line per message: a summary line every ``summary_every`` seconds says how
    many people it produced and how many requests the demo endpoint (``sink``) got.
    """

    log = Logger()
    names = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Tony")

    def __init__(self, reactor: Any, bootstrap: str, sink: DemoSink | None = None, *,
                 topic: str = DEMO_TOPIC, every: float | None = None,
                 summary_every: float | None = None) -> None:
        self._producer = Producer({"bootstrap.servers": bootstrap, "log_level": 3})
        self._topic = topic
        self._every = every or _env_seconds("RESTCONSUMER_DEMO_EVERY", DEMO_EVERY)
        self._summary_every = summary_every or _env_seconds("RESTCONSUMER_DEMO_SUMMARY_EVERY",
                                                            DEMO_SUMMARY_EVERY)
        self._sink = sink
        self._count = itertools.count(1)
        self.produced = 0
        self._timer = LoopingCall(self._produce)
        self._timer.clock = reactor
        self._summary = LoopingCall(self._summarize)
        self._summary.clock = reactor

    def startService(self) -> None:
        """Start producing (the first person at once, so that the topic exists)."""
        super().startService()
        self.log.info("demo: a made-up person to {topic} every {every:g} s; a summary line every "
                      "{summary:g} s", topic=self._topic, every=self._every, summary=self._summary_every)
        self._timer.start(self._every, now=True)
        self._summary.start(self._summary_every, now=False)

    def stopService(self) -> None:
        """Stop producing."""
        super().stopService()
        for timer in (self._timer, self._summary):
            if timer.running:
                timer.stop()

    def _produce(self) -> None:
        n = next(self._count)
        person = {"id": f"person-{n}", "name": self.names[n % len(self.names)], "age": 20 + n % 50}
        # produce() only queues the message and poll(0) never waits: fine on the reactor.
        self._producer.produce(self._topic, json.dumps(person).encode())
        self._producer.poll(0)
        self.produced += 1

    def _summarize(self) -> None:
        got = self._sink.received if self._sink is not None else 0
        self.log.info("demo: produced {produced} people, the demo endpoint got {got}",
                      produced=self.produced, got=got)


def _python() -> str:
    """How to name this interpreter in a command line: ``python3`` when that is this one."""
    found = shutil.which("python3")
    try:
        if found and os.path.samefile(found, sys.executable):
            return "python3"
    except OSError:
        pass
    return shlex.quote(sys.executable)


class EmbeddedGuide(Service):
    """Once the API listens: prints the next steps and creates the demo job.

    Started after the API server, so its address is known; the demo job is written as
    soon as the private Redis answers.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, store: JobStore, server: APIServer, auth: Authenticator,
                 bootstrap: str, *, allow_hosts: frozenset[str] | None = None,
                 retry_every: float = 0.5) -> None:
        self._clock = clock
        self._store = store
        self._server = server
        self._auth = auth
        self.bootstrap = bootstrap
        self._allow_hosts = allow_hosts
        self._retry_every = retry_every
        self.api: str | None = None
        self.done: Deferred[None] | None = None

    def startService(self) -> None:
        """Print the next steps; create the demo job once Redis answers."""
        super().startService()
        self.api = self._api_url()
        self._print()
        if self.api is not None:
            self.done = Deferred.fromCoroutine(self._create_demo_job(self.api))
            self.done.addErrback(lambda f: self.log.failure("embedded: the demo job was not created", f))

    def _api_url(self) -> str | None:
        """The API's base URL as a client on this machine reaches it, or None (unix socket)."""
        address = self._server.address or ""
        host, _, port = address.removeprefix("http://").rpartition(":")
        if not port.isdigit():
            return None
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if self._server.endpoint_name.startswith("ssl:") else "http"
        return f"{scheme}://{host}:{port}"

    def _print(self) -> None:
        say = self.log.info
        say("embedded: Kafka bootstrap address {kafka} (topic {topic} gets a made-up person "
            "every few seconds)", kafka=self.bootstrap, topic=DEMO_TOPIC)
        if self.api is None:
            say("embedded: the API listens on {endpoint}", endpoint=self._server.endpoint_name)
            return
        token = self._auth.token
        if token:
            say("embedded: dashboard {link}", link=f"{self.api}/ui/#token={quote(token, safe='')}")
            auth = "-H " + shlex.quote(f"Authorization: Bearer {token}")
        else:
            say("embedded: dashboard {link}", link=f"{self.api}/ui/")
            auth = "-u " + shlex.quote(self._auth.user or "USER")
        say("embedded: try  {curl}", curl=f"curl {auth} {self.api}/jobs")
        sample = json.dumps({"id": "me", "name": "Me", "age": 42})
        say("embedded: produce a message of your own  {command}",
            command=f"echo {shlex.quote(sample)} | {_python()} -m restconsumer.ops.embedded produce "
                    f"{self.bootstrap} {DEMO_TOPIC}")

    async def _create_demo_job(self, api: str) -> None:
        try:
            job = validate(demo_job(api), allow_hosts=self._allow_hosts)
        except InvalidJob as e:
            self.log.warn("embedded: no demo job: {reason}", reason=str(e))
            return
        while self.running:
            try:
                created = await self._store.create(job)
            except StoreUnavailable:
                await deferLater(self._clock, self._retry_every, lambda: None)
                continue
            if created:
                self.log.info("embedded: demo job {job_id} created: each message of {topic} is "
                              "POSTed to {url}", job_id=job.id, topic=DEMO_TOPIC, url=job.definition["url"])
            return


def _produce(bootstrap: str, topic: str, lines: Sequence[str]) -> int:
    """Send each non-blank line as one message; the number of messages that failed."""
    producer = Producer({"bootstrap.servers": bootstrap, "log_level": 3})
    failed: list[KafkaError] = []

    def delivered(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            failed.append(error)

    sent = 0
    for line in lines:
        if line.strip():
            producer.produce(topic, line.rstrip("\n").encode("utf-8"), on_delivery=delivered)
            producer.poll(0)
            sent += 1
    left = producer.flush(15)
    missing = len(failed) + left
    print(f"produced {sent - missing} of {sent} messages to {topic} at {bootstrap}"
          + (f"; failed: {failed[0].str() if failed else 'no answer within 15 s'}" if missing else ""),
          file=sys.stderr)
    return missing


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 -m restconsumer.ops.embedded produce BOOTSTRAP TOPIC`` (messages on stdin, one a line)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3 or args[0] != "produce":
        print("usage: python3 -m restconsumer.ops.embedded produce BOOTSTRAP TOPIC  "
              "(each line of standard input is one message)", file=sys.stderr)
        return 2
    return 1 if _produce(args[1], args[2], sys.stdin.readlines()) else 0


if __name__ == "__main__":
    sys.exit(main())
