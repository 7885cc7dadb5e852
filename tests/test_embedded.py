"""``--embedded``: the whole service with no infrastructure, as the README's run command starts it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from restconsumer.jobs.model import validate
from restconsumer.ops.embedded import demo_job, loopback_endpoint, main
from tests.infra.ports import wait_for
from tests.infra.service import REPO, ServiceProcess

SUMMARY = re.compile(r"demo: produced (\d+) people, the demo endpoint got (\d+)")


class EmbeddedProcess(ServiceProcess):
    """``twistd -n --pidfile= restconsumer --embedded``, its ``--api`` as given (no interface)."""

    def __init__(self, workdir: Path, *, api: str | None = None, args: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        super().__init__(workdir, kafka="unused:1", redis="redis://unused:1/0",
                         args=["--embedded", *(args or [])], env=env, token=None)
        self.api = api or f"tcp:{self.port}"

    def command(self) -> list[str]:
        """The test harness's command line, with this ``--api``."""
        command = super().command()
        command[command.index("--api") + 1] = self.api
        return command


def listening_addresses(port: int) -> set[str]:
    """The local addresses on which a socket listens on TCP ``port`` (from /proc/net)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, local_port = fields[1].split(":")
            if int(local_port, 16) != port or fields[3] != "0A":  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            if len(raw) == 4:
                found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
            else:
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


def printed(log: str, pattern: str) -> re.Match[str]:
    """The match of ``pattern`` in the log; fails the test if the line is missing."""
    found = re.search(pattern, log)
    assert found, f"no line matching {pattern!r} in:\n{log}"
    return found


def status_of(service: ServiceProcess, token: str, job_id: str) -> dict:
    """The job's status."""
    answer = service.request("GET", f"/job/{job_id}/status", token=token)
    assert answer.status == 200, answer
    return answer.json


def test_embedded_prints_next_steps_stays_quiet_and_refuses_set_offset(tmp_path: Path) -> None:
    """The run command of the README: next steps printed and working, API on 127.0.0.1 only,
    the demo job created and delivering, one summary line instead of a line per message,
    set_offset answered 501 with no side effect, Ctrl-C ends it all cleanly."""
    service = EmbeddedProcess(tmp_path, args=["--jobs", str(REPO / "jobs")],
                              env={"RESTCONSUMER_DEMO_EVERY": "0.3",
                                   "RESTCONSUMER_DEMO_SUMMARY_EVERY": "3"})
    service.start()
    redis_port = None
    try:
        log = wait_for(lambda: "embedded: produce a message of your own" in (text := service.log())
                       and text, 15, "the next steps")
        assert "EMBEDDED MODE" in log
        token = printed(log, r"generated API token \(shown once\): (\S+)").group(1)
        redis_port = int(printed(log, r"private redis-server at redis://127.0.0.1:(\d+)/0").group(1))

        # --api tcp:PORT named no interface: embedded mode listens on the loopback only.
        assert f"restconsumer API listening on http://127.0.0.1:{service.port} " in log
        assert listening_addresses(service.port) == {"127.0.0.1"}

        bootstrap = printed(log, r"embedded: Kafka bootstrap address (127\.0\.0\.1:\d+) ").group(1)
        link = printed(log, r"embedded: dashboard (\S+)").group(1)
        assert link == f"http://127.0.0.1:{service.port}/ui/#token={token}"
        curl = printed(log, r"embedded: try  (curl .*)").group(1)
        assert curl == f"curl -H 'Authorization: Bearer {token}' http://127.0.0.1:{service.port}/jobs"
        answer = subprocess.run(["bash", "-c", curl + " -s -o /dev/null -w '%{http_code}'"],
                                capture_output=True, text=True, timeout=30)
        assert answer.stdout == "200", answer

        # The demo job is created by embedded mode (the repository's jobs/ holds none).
        listed = wait_for(lambda: service.request("GET", "/jobs", token=token).json, 10, "demo job")
        assert [j["id"] for j in listed] == ["demo-echo"]
        assert listed[0]["token"] == "***"
        assert listed[0]["url"] == f"http://127.0.0.1:{service.port}/embedded/echo/people/{{id}}"
        wait_for(lambda: "the demo endpoint got its first request: POST /embedded/echo/people/person-"
                 in service.log(), 30, "the first demo delivery")

        # A message of one's own, with the printed produce line, through a job of one's own.
        mine = {"id": "mine", "owner": "me", "type": "PUT", "topic": "mine",
                "datamap": {"id": "$.msg.id", "name": "$.msg.name"}, "json_body": ["name"],
                "url": f"http://127.0.0.1:{service.port}/embedded/echo/mine/{{id}}"}
        assert service.request("POST", "/job/mine", mine, token=token).status == 201
        produce = printed(log, r"embedded: produce a message of your own  (.*)").group(1)
        assert produce.endswith(f"produce {bootstrap} demo.people")
        produce = produce.removesuffix("demo.people") + "mine"
        produced = subprocess.run(["bash", "-c", produce], capture_output=True, text=True, timeout=60,
                                  env={**os.environ, "PYTHONPATH": str(REPO)})
        assert produced.returncode == 0, produced
        assert f"produced 1 of 1 messages to mine at {bootstrap}" in produced.stderr
        wait_for(lambda: status_of(service, token, "mine")["counters"]["delivered"] == 1, 60,
                 "my message delivered")

        # Quiet: about 30 demo messages in 10 s, no line for any of them, a summary every 3 s.
        before = len(service.log())
        delivered_before = status_of(service, token, "demo-echo")["counters"]["delivered"]
        time.sleep(10)
        window = service.log()[before:]
        delivered = status_of(service, token, "demo-echo")["counters"]["delivered"] - delivered_before
        assert delivered >= 15, window
        assert not re.search(r"person-\d+|/embedded/echo/", window), window
        summaries = [(int(a), int(b)) for a, b in SUMMARY.findall(window)]
        assert len(summaries) >= 2, window
        assert summaries[-1][0] > summaries[0][0] and summaries[-1][1] > summaries[0][1], window
        assert len(window.splitlines()) < delivered / 2, window

        # set_offset: the mock cluster cannot describe groups; refused up front, job untouched.
        assert status_of(service, token, "demo-echo")["state"] == "running"
        started = service.log().count("job demo-echo: starting")
        refused = service.request("POST", "/job/demo-echo/set_offset/beginning", token=token, timeout=30)
        assert refused.status == 501, refused
        assert refused.json["error"] == "set_offset not supported by this Kafka"
        assert "Nothing was changed" in refused.json["details"][0]
        assert "Required feature not supported by broker" in refused.json["details"][0]
        wait_for(lambda: "job demo-echo: set_offset to beginning not done (501): this Kafka cannot "
                 "describe consumer groups" in service.log(), 5, "the refusal logged")
        counted = status_of(service, token, "demo-echo")["counters"]["delivered"]
        time.sleep(2)
        after = status_of(service, token, "demo-echo")
        assert after["state"] == "running"
        assert after["counters"]["delivered"] > counted
        log = service.log()
        assert log.count("job demo-echo: starting") == started
        assert "job demo-echo: stopped" not in log
        assert "job demo-echo: revoked" not in log

        # Ctrl-C in a terminal signals the whole process group: the service ends cleanly,
        # its redis-server (a session of its own) going last.
        assert service.process is not None
        os.killpg(service.process.pid, signal.SIGINT)
        code = service.process.wait(30)
        service.process = None
    finally:
        if service.process is not None:
            service.stop()
            code = None
    assert code == -signal.SIGINT  # twistd stops everything, then ends by the signal it got
    with socket.socket() as s:
        assert redis_port is not None
        assert s.connect_ex(("127.0.0.1", redis_port)) != 0, "the private redis-server outlived the service"
    log = service.log()
    assert "Traceback" not in log
    assert "the embedded redis-server ended" not in log
    assert "job demo-echo: stopped" in log


def test_embedded_keeps_an_explicit_interface_and_says_so(tmp_path: Path) -> None:
    """``--api tcp:PORT:interface=0.0.0.0`` is kept in embedded mode, with a warning."""
    service = EmbeddedProcess(tmp_path)
    service.api = f"tcp:{service.port}:interface=0.0.0.0"
    service.start()
    try:
        log = wait_for(lambda: "embedded: try  curl" in (text := service.log()) and text, 15,
                       "the next steps")
        assert (f"--embedded: the API listens on 0.0.0.0 as --api tcp:{service.port}:interface=0.0.0.0 "
                f"asks, not only on 127.0.0.1" in log)
        assert listening_addresses(service.port) == {"0.0.0.0"}
        # The printed lines still name an address that works on this machine.
        assert re.search(rf"embedded: try  curl -H '[^']+' http://127\.0\.0\.1:{service.port}/jobs", log)
    finally:
        assert service.stop() in (0, -15)


def test_the_repository_jobs_folder_creates_no_demo_job(services: Callable[..., ServiceProcess]) -> None:
    """Started with this repository's jobs/ against a real Redis, the service creates no job."""
    assert not [p.name for p in (REPO / "jobs").glob("*.json")
                if "/embedded/echo/" in p.read_text()], "a job of jobs/ calls the demo endpoint"
    service = services("--jobs", str(REPO / "jobs"))
    wait_for(lambda: service.request("GET", "/health", token=None).status == 200, 30, "health")
    time.sleep(2)  # the jobs folder is loaded as soon as Redis answers
    log = service.log()
    assert service.request("GET", "/jobs").json == []
    assert service.request("GET", "/job/demo-echo").status == 404
    assert "demo-echo" not in log
    assert "embedded:" not in log and "demo:" not in log
    assert service.request("POST", "/embedded/echo/x", {"a": 1}).status == 404


@pytest.mark.parametrize(("given", "bound", "warned"), [
    ("tcp:9013", "tcp:9013:interface=127.0.0.1", False),
    ("tcp:0:backlog=5", "tcp:0:backlog=5:interface=127.0.0.1", False),
    ("tcp:9013:interface=", "tcp:9013:interface=127.0.0.1", False),
    ("tcp6:9013", r"tcp6:9013:interface=\:\:1", False),
    ("tcp:9013:interface=127.0.0.1", "tcp:9013:interface=127.0.0.1", False),
    ("tcp:9013:interface=0.0.0.0", "tcp:9013:interface=0.0.0.0", True),
    ("tcp:9013:interface=192.0.2.7", "tcp:9013:interface=192.0.2.7", True),
    ("unix:/run/rc.sock", "unix:/run/rc.sock", False),
])
def test_loopback_endpoint(given: str, bound: str, warned: bool) -> None:
    """Embedded mode's API endpoint: the loopback unless an interface was named."""
    endpoint, warning = loopback_endpoint(given)
    assert endpoint == bound
    assert (warning is not None) == warned


def test_demo_job_is_valid_and_calls_the_given_api() -> None:
    """The demo job passes validation and names the API it is given."""
    job = validate(demo_job("http://127.0.0.1:4321"))
    assert job.id == "demo-echo" and job.topics == ["demo.people"]
    assert job.definition["url"] == "http://127.0.0.1:4321/embedded/echo/people/{id}"
    json.dumps(job.definition)


def test_produce_usage(capsys: pytest.CaptureFixture[str]) -> None:
    """``python3 -m restconsumer.ops.embedded`` with wrong arguments says how to use it."""
    assert main(["send", "x"]) == 2
    assert "usage: python3 -m restconsumer.ops.embedded produce BOOTSTRAP TOPIC" in capsys.readouterr().err


def test_readme_set_up_runs_embedded_mode_from_the_repository_root() -> None:
    """The README's Set-up has two commands: the embedded run (no --jobs) and the tests."""
    readme = (REPO / "README.md").read_text()
    set_up = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```sh\n(.*?)```", set_up, re.S)
    assert len(commands) == 2
    assert commands[0].strip().endswith("twistd -n --pidfile= restconsumer --embedded")
    assert commands[1].strip() == "bash tests/run.sh"
