"""The real service, run as ``twistd -n restconsumer`` in a child process."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.infra.ports import free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "test-admin-token-5f1c9e"


class Response:
    """What the API answered."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:300]!r}>"


class ServiceProcess:
    """One restconsumer process, its log in ``workdir/service-N.log``."""

    count = 0

    def __init__(self, workdir: Path, *, kafka: str, redis: str, args: list[str] | None = None,
                 env: dict[str, str] | None = None, token: str | None = ADMIN_TOKEN) -> None:
        ServiceProcess.count += 1
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.kafka = kafka
        self.redis = redis
        self.args = list(args or [])
        self.env = dict(env or {})
        self.token = token
        self.log_path = workdir / f"service-{ServiceProcess.count}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """The command line that runs the service."""
        cmd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
               "-n", "--pidfile=", "restconsumer", "--api", f"tcp:{self.port}:interface=127.0.0.1",
               "--kafka", self.kafka, "--redis", self.redis]
        return cmd + self.args

    def start(self, wait: bool = True) -> ServiceProcess:
        """Start the process; with ``wait``, return once its API answers."""
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **self.env}
        if self.token is not None:
            env.setdefault("RESTCONSUMER_API_TOKEN", self.token)
        self.process = subprocess.Popen(self.command(), cwd=self.workdir, env=env,
                                        stdout=open(self.log_path, "ab"),  # noqa: SIM115
                                        stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            wait_for(self._answers, 30, f"service on port {self.port}")
        return self

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"the service exited with {self.process.returncode}:\n{self.log()}")
        self.request("GET", "/health", token=None)
        return True

    def request(self, method: str, path: str, body: Any = None, *, token: str | bool | None = True,
                headers: dict[str, str] | None = None, raw: bytes | None = None,
                timeout: float = 10) -> Response:
        """Send one API request; ``token=True`` uses the admin token, None sends none."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        sent = dict(headers or {})
        if token is True:
            token = self.token
        if token:
            sent["Authorization"] = f"Bearer {token}"
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=data, headers=sent)
            answer = conn.getresponse()
            return Response(answer.status, dict(answer.getheaders()), answer.read())
        finally:
            conn.close()

    def log(self) -> str:
        """Everything the service has logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Send ``sig`` and wait for the process to end; its exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        finally:
            self.process = None
        return code
