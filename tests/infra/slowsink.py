"""A loopback HTTP endpoint that can hold chosen requests, and sees when a client gives up.

Every request is recorded as a :class:`Call`: when it started (its headers and body were
read), when it ended, and how — ``"answered"`` (the answer was written) or ``"closed"``
(the client closed or reset its connection while the answer was held back). A held request
watches its socket with ``select``, so a cancelled request (the client aborts its
connection) is seen to end at once, not when the hold would have run out.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Call:
    """One request as the endpoint saw it; ``ended`` is None while it is under way."""

    path: str
    body: dict[str, Any]
    started: float
    ended: float | None = None
    outcome: str | None = None  # "answered" or "closed"
    status: int | None = None

    @property
    def entity(self) -> str:
        """The last path segment (the job's ``{id}``)."""
        return self.path.rsplit("/", 1)[1]

    def open_at(self, moment: float) -> bool:
        """Whether the request was under way at ``moment``."""
        return self.started <= moment and (self.ended is None or self.ended > moment)


#: Decides how long to hold a request before answering (0: at once).
Hold = Callable[[Call], float]


def no_hold(_: Call) -> float:
    """Answer everything at once."""
    return 0.0


class SlowSink:
    """A threaded HTTP/1.1 server answering 200, after ``hold(call)`` seconds.

    :meth:`release` ends every hold now and makes later requests answer at once.
    """

    def __init__(self, hold: Hold = no_hold) -> None:
        self.hold = hold
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._released = threading.Event()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    body = {"raw": raw.decode(errors="replace")}
                call = Call(self.path, body if isinstance(body, dict) else {"value": body},
                            time.monotonic())
                with sink._lock:
                    sink.calls.append(call)
                wait = 0.0 if sink._released.is_set() else sink.hold(call)
                if wait > 0 and not sink._wait(self.connection, wait):
                    with sink._lock:
                        call.ended, call.outcome = time.monotonic(), "closed"
                    self.close_connection = True
                    return
                with sink._lock:
                    call.ended, call.outcome, call.status = time.monotonic(), "answered", 200
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(b"ok")
                except OSError:
                    self.close_connection = True

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client that vanished is what some tests are about

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _wait(self, connection: socket.socket, seconds: float) -> bool:
        """Hold for ``seconds`` (or until released); False if the client went away first."""
        deadline = time.monotonic() + seconds
        while not self._released.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            readable, _, _ = select.select([connection], [], [], min(left, 0.05))
            if readable:
                try:
                    peeked = connection.recv(1, socket.MSG_PEEK)
                except OSError:  # reset: an aborted connection
                    return False
                if not peeked:  # orderly close
                    return False
                time.sleep(0.01)  # a pipelined request; it waits its turn
        return True

    def start(self) -> SlowSink:
        """Start serving."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """End every hold and stop serving."""
        self._released.set()
        self._server.shutdown()
        self._server.server_close()

    def release(self) -> None:
        """Answer every held request now, and every later one at once."""
        self._released.set()

    def snapshot(self) -> list[Call]:
        """Copies of the calls so far, in the order they started."""
        with self._lock:
            return [Call(c.path, c.body, c.started, c.ended, c.outcome, c.status) for c in self.calls]
