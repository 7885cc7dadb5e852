"""The ceiling: a bare Twisted ``Agent`` loop posting pre-built bodies, as fast as one process can.

Run by ``bench/run.py``: ``python bench/agent_baseline.py URL_PREFIX BODIES_FILE CONCURRENCY``;
prints the requests per second as JSON.
"""

from __future__ import annotations

import json
import sys
import time

from twisted.internet import defer, task
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer


@implementer(IBodyProducer)
class Body:
    """Bytes written in one go, as the service does (FileBodyProducer adds a cooperator hop)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: object) -> defer.Deferred[None]:
        consumer.write(self.data)  # type: ignore[attr-defined]
        return defer.succeed(None)

    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def stopProducing(self) -> None: ...


async def main(reactor: object, prefix: str, bodies_file: str, concurrency: str) -> None:
    with open(bodies_file, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    work = [((prefix + item["id"]).encode(), json.dumps(item["body"]).encode()) for item in lines]
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = int(concurrency)
    agent = Agent(reactor, pool=pool)
    headers = {b"Content-Type": [b"application/json"]}
    failures = 0

    async def loop(start: int) -> None:
        nonlocal failures
        for i in range(start, len(work), int(concurrency)):
            url, body = work[i]
            response = await agent.request(b"POST", url, Headers(headers), Body(body))
            await readBody(response)
            failures += response.code != 200

    began = time.perf_counter()
    await defer.gatherResults([defer.Deferred.fromCoroutine(loop(k)) for k in range(int(concurrency))])
    took = time.perf_counter() - began
    await pool.closeCachedConnections()
    print(json.dumps({"requests": len(work), "seconds": took, "per_second": len(work) / took,
                      "failures": failures}))


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, *sys.argv[1:])))
