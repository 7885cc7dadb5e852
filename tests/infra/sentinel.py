"""Redis behind Sentinel, all real: a master, a replica and three sentinels on loopback.

Everything is ``redis-server`` from Debian's package (``--sentinel`` for the sentinels). The
master and the replica ask for a password, and so do the sentinels (their own), so that the
service's URL form with both is what the tests drive.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import redis

from tests.infra.certs import PKI
from tests.infra.ports import ended, free_port, wait_for

MASTER_NAME = "main"
PASSWORD = "redis-pw"
SENTINEL_PASSWORD = "sentinel-pw"


def _binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    return binary


class _Node:
    """One redis-server process (a data node or a sentinel) with its own directory."""

    def __init__(self, workdir: Path, args: list[str], config: str | None = None, *,
                 tls: bool = False) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.args = args
        self.config = config
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [_binary()]
        if self.config is not None:
            # A sentinel rewrites its configuration file: each keeps its own, written once.
            path = self.workdir / "sentinel.conf"
            if not path.exists():
                path.write_text(self.config.format(port=self.port))
            command += [str(path), "--sentinel"]
        elif self.tls:
            command += ["--port", "0", "--tls-port", str(self.port)]
        else:
            command += ["--port", str(self.port)]
        self.process = subprocess.Popen(
            [*command, "--bind", "127.0.0.1", "--dir", str(self.workdir), *self.args],
            stdout=open(self.workdir / "log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            ended(self.process, 10)
            self.process = None


class SentinelRedis:
    """A master, one replica and three sentinels (quorum 2, a master down after 1 s); with
    ``tls``, every one of them speaks TLS only (a certificate for localhost and 127.0.0.1)."""

    def __init__(self, workdir: Path, tls: PKI | None = None) -> None:
        self.pki = tls
        files = [] if tls is None else [
            "--tls-cert-file", str(tls.cert_file), "--tls-key-file", str(tls.key_file),
            "--tls-ca-cert-file", str(tls.ca_file), "--tls-auth-clients", "no", "--tls-replication", "yes"]
        data = ["--save", "", "--appendonly", "no", "--requirepass", PASSWORD, "--masterauth", PASSWORD,
                *files]
        self.master = _Node(workdir / "master", data, tls=tls is not None)
        self.replica = _Node(workdir / "replica", [*data, "--replicaof", "127.0.0.1", str(self.master.port)],
                             tls=tls is not None)
        listen = ["port {port}"] if tls is None else [
            "port 0", "tls-port {port}", f"tls-cert-file {tls.cert_file}", f"tls-key-file {tls.key_file}",
            f"tls-ca-cert-file {tls.ca_file}", "tls-auth-clients no", "tls-replication yes"]
        config = "\n".join([
            *listen,
            f"requirepass {SENTINEL_PASSWORD}",
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} 2",
            f"sentinel auth-pass {MASTER_NAME} {PASSWORD}",
            f"sentinel down-after-milliseconds {MASTER_NAME} 1000",
            f"sentinel failover-timeout {MASTER_NAME} 10000",
            f"sentinel parallel-syncs {MASTER_NAME} 1",
            "",
        ])
        self.sentinels = [_Node(workdir / f"sentinel-{i}", [], config) for i in range(3)]
        self.nodes = [self.master, self.replica]

    @property
    def url(self) -> str:
        """The service's ``--redis``: master credentials, the sentinels, their password."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        scheme = "redis" if self.pki is None else "rediss"
        return f"{scheme}+sentinel://:{PASSWORD}@{hosts}/{MASTER_NAME}/0?sentinel_password={SENTINEL_PASSWORD}"

    def start(self) -> None:
        """Start everything; return once the sentinels agree on the master and see the replica."""
        self.master.start()
        wait_for(lambda: self.client(self.master).ping(), 20, "the Redis master")
        self.replica.start()
        wait_for(lambda: self.client(self.replica).info("replication")["master_link_status"] == "up",
                 30, "the replica in sync")
        for sentinel in self.sentinels:
            sentinel.start()
        wait_for(self._settled, 30, "three sentinels that know the master and the replica")

    def _settled(self) -> bool:
        for sentinel in self.sentinels:
            state = self.sentinel_client(sentinel).sentinel_master(MASTER_NAME)
            if int(state["num-other-sentinels"]) < 2 or int(state["num-slaves"]) < 1:
                return False
        return True

    def client(self, node: _Node) -> redis.Redis:
        """A plain client of one data node."""
        return redis.Redis(host="127.0.0.1", port=node.port, password=PASSWORD, decode_responses=True,
                           socket_timeout=5, **self._tls())

    def sentinel_client(self, sentinel: _Node) -> redis.Redis:
        """A plain client of one sentinel."""
        return redis.Redis(host="127.0.0.1", port=sentinel.port, password=SENTINEL_PASSWORD,
                           decode_responses=True, socket_timeout=5, **self._tls())

    def _tls(self) -> dict[str, object]:
        return {} if self.pki is None else {"ssl": True, "ssl_ca_certs": str(self.pki.ca_file)}

    def master_port(self) -> int | None:
        """The master's port as every sentinel names it (None while they disagree)."""
        ports = set()
        for sentinel in self.sentinels:
            try:
                ports.add(int(self.sentinel_client(sentinel).sentinel_get_master_addr_by_name(MASTER_NAME)[1]))
            except (redis.RedisError, TypeError):
                return None
        return ports.pop() if len(ports) == 1 else None

    def node_at(self, port: int) -> _Node:
        """The data node listening on ``port``."""
        return next(n for n in self.nodes if n.port == port)

    def stop(self) -> None:
        """Stop every process."""
        for node in [*self.sentinels, *self.nodes]:
            node.stop()
