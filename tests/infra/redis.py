"""A real redis-server on a free loopback port."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import redis

from tests.infra.ports import free_port, wait_for


class RedisServer:
    """A redis-server child started and stopped by the tests; with ``persist``, what it holds
    survives a restart (an append-only file in ``workdir``), as a production Redis would."""

    def __init__(self, workdir: Path, port: int | None = None, *, persist: bool = False) -> None:
        self.workdir = workdir
        self.persist = persist
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.persist else "no", "--appendfsync", "always",
             "--dir", str(self.workdir)],
            stdout=open(self.workdir / "redis.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: self.client().ping(), 20, "redis-server")

    def client(self) -> redis.Redis:
        """A plain (synchronous) Redis client for checking what the service wrote."""
        return redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=5)

    def stop(self) -> None:
        """Stop the server."""
        if self.process is None:
            return
        self.process.terminate()
        self.process.wait(20)
        self.process = None
