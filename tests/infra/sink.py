"""A real HTTP endpoint on loopback that records every request a job sends it."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit


@dataclass
class Received:
    """One request as the endpoint saw it."""

    method: str
    raw_path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)

    @property
    def path(self) -> str:
        """The path, still percent-encoded."""
        return urlsplit(self.raw_path).path

    @property
    def query(self) -> dict[str, list[str]]:
        """The decoded query parameters."""
        return parse_qs(urlsplit(self.raw_path).query, keep_blank_values=True)


Responder = Callable[[Received], tuple[int, dict[str, str], bytes]]


def ok(_: Received) -> tuple[int, dict[str, str], bytes]:
    """Answer 200 to everything."""
    return 200, {}, b"ok"


class Sink:
    """A threaded HTTP/1.1 server; ``respond`` decides each answer (200 by default)."""

    def __init__(self, respond: Responder = ok, port: int = 0,
                 tls: tuple[Path, Path] | None = None) -> None:
        self.respond = respond
        self.received: list[Received] = []
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as separate writes

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                got = Received(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                               body)
                status, headers, answer = sink.respond(got)
                with sink._lock:
                    sink.received.append(got)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(answer)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            # socketserver's backlog of 5 drops the SYNs of a burst of new connections, which
            # TCP sends again only after a second.
            request_queue_size = 128

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client that vanished (a killed service) is not the test's concern

        self._server = Server(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            self.url = f"https://localhost:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> Sink:
        """Start serving."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def snapshot(self) -> list[Received]:
        """The requests received so far."""
        with self._lock:
            return list(self.received)

    def count(self) -> int:
        """How many requests were received."""
        with self._lock:
            return len(self.received)
