"""Start-up failures end the process (SPEC §9): a non-zero exit within seconds, the reason logged.

The real service is run as ``twistd -n restconsumer``; the API server's two ways of failing
(before the reactor runs, and once it runs) are also checked in-process.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.web.resource import Resource

from restconsumer.api.server import APIServer, DrainingSite, StartupError
from tests.infra.certs import make_pki
from tests.infra.service import REPO, ServiceProcess

Start = Callable[..., ServiceProcess]

#: how soon a process that cannot start must have ended
WITHIN = 10.0


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port some other program listens on."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    yield holder.getsockname()[1]
    holder.close()


def ended(service: ServiceProcess) -> tuple[int, float]:
    """Wait (at most WITHIN seconds) for the process to end: its exit code and how long it ran."""
    assert service.process is not None
    began = time.monotonic()
    try:
        code = service.process.wait(WITHIN)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {WITHIN} s:\n{service.log()}")
    return code, time.monotonic() - began


# --- the real process ---------------------------------------------------------------


def test_api_port_in_use_ends_the_process(services: Start, busy_port: int) -> None:
    """Exit code 1 within seconds, the endpoint and the reason in the log, nothing started."""
    endpoint = f"tcp:{busy_port}:interface=127.0.0.1"
    service = services("--api", endpoint, wait=False)
    code, _ = ended(service)
    log = service.log()
    assert code == 1, log
    assert f"cannot listen on the API endpoint {endpoint}" in log, log
    assert "Address already in use" in log
    assert "Traceback" not in log, "a start-up failure reads like a bug"
    # It failed before any part started: no job control, no API announced.
    assert "listening on" not in log


class WithoutAPIOption(ServiceProcess):
    """The service started without ``--api``, so that RESTCONSUMER_API decides."""

    def command(self) -> list[str]:
        """The usual command line less its ``--api`` option."""
        cmd = super().command()
        at = cmd.index("--api")
        return cmd[:at] + cmd[at + 2:]


def test_api_port_in_use_from_the_environment(tmp_path: Path, busy_port: int) -> None:
    """The same when the endpoint comes from RESTCONSUMER_API."""
    endpoint = f"tcp:{busy_port}:interface=127.0.0.1"
    service = WithoutAPIOption(tmp_path / "service", kafka="127.0.0.1:1", redis="redis://127.0.0.1:1/0",
                               env={"RESTCONSUMER_API": endpoint})
    service.start(wait=False)
    try:
        code, _ = ended(service)
    finally:
        service.stop()
    assert code == 1
    assert f"cannot listen on the API endpoint {endpoint}" in service.log()


def _not_json(folder: Path) -> Path:
    path = folder / "tokens.json"
    path.write_text("{not json", encoding="utf-8")
    return path


def _a_list(folder: Path) -> Path:
    path = folder / "tokens.json"
    path.write_text(json.dumps(["token"]), encoding="utf-8")
    return path


@pytest.mark.parametrize(("make", "reason"), [
    (lambda folder: folder / "absent.json", "No such file or directory"),
    (lambda folder: folder, "Is a directory"),
    (_not_json, "cannot read the tokens file"),
    (_a_list, "must be a JSON object"),
], ids=["missing", "a-folder", "not-json", "not-an-object"])
def test_bad_tokens_file_ends_the_process(
        services: Start, tmp_path: Path, make: Callable[[Path], Path], reason: str) -> None:
    """An unreadable or invalid --tokens file: a non-zero exit, the option and reason said."""
    path = make(tmp_path)
    service = services("--tokens", str(path), wait=False)
    code, _ = ended(service)
    log = service.log()
    assert code != 0, log
    assert "--tokens: " in log and str(path) in log and reason in log, log


def _key_only(folder: Path) -> Path:
    return make_pki(folder / "pki").key_file


def _damaged(folder: Path) -> Path:
    pem = make_pki(folder / "pki").ca_file.read_text(encoding="ascii")
    path = folder / "damaged.pem"
    path.write_text(pem[: len(pem) // 2] + "\n-----END CERTIFICATE-----\n", encoding="ascii")
    return path


@pytest.mark.parametrize(("make", "reason"), [
    (lambda folder: folder / "absent.pem", "cannot read it: No such file or directory"),
    (lambda folder: folder, "cannot read it: Is a directory"),
    (_key_only, "no PEM certificate in it"),
    (_damaged, "a certificate in it is damaged"),
], ids=["missing", "a-folder", "a-key-not-a-certificate", "damaged"])
def test_bad_ca_file_ends_the_process(
        services: Start, tmp_path: Path, make: Callable[[Path], Path], reason: str) -> None:
    """An unreadable --ca-file, or one without a valid certificate: a non-zero exit, the reason said."""
    path = make(tmp_path)
    service = services(wait=False, env={"RESTCONSUMER_CA_FILE": str(path)})
    code, _ = ended(service)
    log = service.log()
    assert code != 0, log
    assert f"--ca-file {path}: {reason}" in log, log


def test_good_tokens_and_ca_files_start(services: Start, tmp_path: Path) -> None:
    """The checks refuse only what is wrong: a valid bundle and tokens file start the service."""
    pki = make_pki(tmp_path / "pki")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki.ca_file.read_bytes() + pki.cert_file.read_bytes())
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"alice-token": "alice"}), encoding="utf-8")
    service = services("--ca-file", str(bundle), "--tokens", str(tokens))
    assert service.request("GET", "/jobs", token="alice-token").status == 200


def test_end_process_stops_the_services_then_exits_non_zero(tmp_path: Path) -> None:
    """A failure found once the reactor runs: the services stop in order, then exit status 1."""
    stopped = tmp_path / "stopped"
    script = textwrap.dedent(f"""
        from twisted.application.service import Service
        from twisted.internet import reactor
        from restconsumer.base.process import end_process

        class Recorder(Service):
            def stopService(self):
                open({str(stopped)!r}, "w").write("stopped")

        service = Recorder()
        service.startService()
        reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
        reactor.callWhenRunning(end_process, reactor, 3)
        reactor.run()
        print("the reactor stopped")
    """)
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          timeout=WITHIN, text=True)
    assert done.returncode == 3, done.stderr
    assert time.monotonic() - began < WITHIN
    assert stopped.read_text() == "stopped"
    assert "the reactor stopped" in done.stdout, "what came after the reactor was cut off"


# --- the API server in-process ------------------------------------------------------


class Endpoint:
    """A server endpoint whose ``listen`` answers what the test says."""

    def __init__(self, result: Deferred[Any]) -> None:
        self.result = result
        self.calls = 0

    def listen(self, factory: Any) -> Deferred[Any]:
        self.calls += 1
        return self.result


class Port:
    """What a bound endpoint gives back."""

    stopped = False

    def getHost(self) -> Any:
        return type("Address", (), {"host": "127.0.0.1", "port": 4242})()

    def stopListening(self) -> None:
        self.stopped = True


def server(endpoint: Any, **more: Any) -> APIServer:
    """An API server on ``endpoint`` with an empty site and a fake clock."""
    return APIServer(endpoint, DrainingSite(Resource()), Clock(), endpoint_name="tcp:4242", **more)


def messages(events: Any) -> list[str]:
    """The text of captured log events."""
    return [formatEvent(e) for e in events]


def refused() -> Deferred[Any]:
    return fail(CannotListenError("127.0.0.1", 4242, OSError(98, "Address already in use")))


def test_a_port_that_cannot_be_bound_raises_before_anything_runs() -> None:
    """twistd binds in privilegedStartService: a failure raises there, logged as critical."""
    fatal: list[bool] = []
    api = server(Endpoint(refused()), on_fatal=lambda: fatal.append(True))
    with capturedLogs() as events, pytest.raises(StartupError, match=r"tcp:4242.*already in use"):
        api.privilegedStartService()
    assert any("cannot listen on the API endpoint tcp:4242" in m for m in messages(events))
    assert fatal == [], "the reactor is not running yet: raising is how twistd fails a start"


def test_started_without_twistd_it_raises_as_well() -> None:
    """Started directly (no privileged step), a synchronous failure raises from startService."""
    api = server(Endpoint(refused()))
    with pytest.raises(StartupError, match="tcp:4242"):
        api.startService()


def test_a_failure_once_running_ends_the_process() -> None:
    """An endpoint that fails after the reactor runs calls on_fatal, the endpoint in the log."""
    pending: Deferred[Any] = Deferred()
    fatal: list[bool] = []
    api = server(Endpoint(pending), on_fatal=lambda: fatal.append(True))
    api.privilegedStartService()
    api.startService()
    with capturedLogs() as events:
        pending.errback(CannotListenError("127.0.0.1", 4242, OSError(13, "Permission denied")))
    assert fatal == [True]
    assert any("cannot listen on the API endpoint tcp:4242" in m and "Permission denied" in m
               for m in messages(events))
    assert api.address is None


def test_stopped_before_it_was_bound_is_no_failure() -> None:
    """A stop while the endpoint is still binding cancels it; that does not end the process."""
    pending: Deferred[Any] = Deferred()
    fatal: list[bool] = []
    api = server(Endpoint(pending), on_fatal=lambda: fatal.append(True))
    api.startService()
    api.stopService()
    assert pending.called
    assert fatal == []


def test_bound_it_says_where() -> None:
    """Bound in the privileged step, it announces the address once started, and stops the port."""
    port = Port()
    endpoint = Endpoint(succeed(port))
    api = server(endpoint, token_note="the generated token")
    api.privilegedStartService()
    assert api.address is None
    with capturedLogs() as events:
        api.startService()
    assert endpoint.calls == 1, "bound twice"
    assert api.address == "http://127.0.0.1:4242"
    assert any("the generated token" in m for m in messages(events))
    api.stopService()
    assert port.stopped


def test_a_late_bind_is_announced() -> None:
    """An endpoint that binds once the reactor runs is announced when it does."""
    pending: Deferred[Any] = Deferred()
    api = server(Endpoint(pending))
    api.startService()
    assert api.address is None
    pending.callback(Port())
    assert api.address == "http://127.0.0.1:4242"
