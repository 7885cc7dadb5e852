"""The ceiling: a bare Twisted ``Agent`` loop posting pre-built bodies, as fast as one process can.

Run by ``bench/run.py``: ``python bench/agent_baseline.py URL_PREFIX BODIES_FILE CONCURRENCY``;
prints the requests per second (and the CPU seconds the loop used) as JSON.

``bench/treq_baseline.py`` runs the same loop with the same pool and ``Agent``, each request
through treq instead; what the two share (the body producer, the pool, the loop and its
figures) is here.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from twisted.internet import defer, task
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

#: how a URL is given: bytes to the bare Agent, text to treq (as its callers would)
URL = TypeVar("URL", str, bytes)

HEADERS = {b"Content-Type": [b"application/json"]}


@implementer(IBodyProducer)
class Body:
    """Bytes written in one go, as the service does (FileBodyProducer adds a cooperator hop)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: object) -> defer.Deferred[None]:
        """Write the whole body at once."""
        consumer.write(self.data)  # type: ignore[attr-defined]
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        """Nothing to pause: everything was written at once."""

    def resumeProducing(self) -> None:
        """Nothing to resume."""

    def stopProducing(self) -> None:
        """Nothing to stop."""


def load_work(prefix: str, bodies_file: str) -> list[tuple[str, bytes]]:
    """The requests to send, pre-built: (URL, encoded JSON body), one per line of the file."""
    with open(bodies_file, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    return [(prefix + item["id"], json.dumps(item["body"]).encode()) for item in lines]


def make_agent(reactor: Any, concurrency: int) -> tuple[HTTPConnectionPool, Agent]:
    """The persistent pool (one connection per concurrent loop) and the ``Agent`` over it."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = concurrency
    return pool, Agent(reactor, pool=pool)


async def run_loops(work: Sequence[tuple[URL, bytes]], concurrency: int,
                    send: Callable[[URL, bytes], Awaitable[int]]) -> dict[str, Any]:
    """Send ``work`` with ``concurrency`` loops, each one request at a time, ``send`` making one
    request (URL, JSON body) and giving its status once the answer's body is read; the figures:
    requests, seconds, per_second, cpu_seconds (of this process while the loops ran), failures."""
    failures = 0

    async def loop(start: int) -> None:
        nonlocal failures
        for i in range(start, len(work), concurrency):
            url, body = work[i]
            failures += await send(url, body) != 200

    began, cpu_began = time.perf_counter(), time.process_time()
    await defer.gatherResults([defer.Deferred.fromCoroutine(loop(k)) for k in range(concurrency)])
    took, cpu = time.perf_counter() - began, time.process_time() - cpu_began
    return {"requests": len(work), "seconds": took, "per_second": len(work) / took,
            "cpu_seconds": cpu, "failures": failures}


async def main(reactor: Any, prefix: str, bodies_file: str, concurrency: str) -> None:
    """Post every body through the bare ``Agent``; print the figures as JSON."""
    work = [(url.encode(), body) for url, body in load_work(prefix, bodies_file)]
    pool, agent = make_agent(reactor, int(concurrency))

    async def send(url: bytes, body: bytes) -> int:
        response = await agent.request(b"POST", url, Headers(HEADERS), Body(body))
        await readBody(response)
        return response.code

    figures = await run_loops(work, int(concurrency), send)
    await pool.closeCachedConnections()
    print(json.dumps(figures))


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, *sys.argv[1:])))
