"""``max_in_flight: "auto"`` beside fixed numbers (issue 23, "What it must show" 2), one run.

Real Kafka, real Redis, one real ``twistd -n restconsumer`` process per contestant, driven
through its HTTP API; the endpoint runs in a process of its own (asyncio, HTTP/1.1
keep-alive). Each contestant reads a backlog of its own (``--messages``, 6,000, over 4
partitions, ``ordering: "none"``), produced before its job is created. The endpoints:

- ``queue16``: serves 16 requests at a time, 20 ms each, and queues the rest (target:
  ``"auto"`` >= 0.9 x the best of 4, 16 and 64 in requests/s, its p50 time per request at the
  endpoint, queueing included, <= 30 ms);
- ``fast``: answers after 1 ms (target: ``"auto"`` >= 0.95 x 64);
- ``rate300``: allows 300 requests per second (a window that starts afresh each second)
  and answers 429 with ``Retry-After: 1`` beyond (target: ``"auto"`` >= 255 requests/s, <= 5 %
  of its requests answered 429, no dead letter; a fixed 64 beside it).

Requests/s are the endpoint's 2xx answers from the first request to the last; figures, not
tests: each is printed beside its target.

    python3 bench/concurrency.py [--messages 6000] [--only queue16,fast,rate300] [--limits]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Infra, infra, start_service, stop_service
from tests.infra.kafka_io import produce
from tests.infra.ports import free_port, wait_for


class Endpoint:
    """What one endpoint process does (see the module docstring), and what it counted."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.slots = asyncio.Semaphore(16)
        self.ok = 0
        self.throttled = 0
        self.first = 0.0
        self.last = 0.0
        self.times: list[float] = []
        self.window = (0, 0)  # (second, requests in it)

    async def answer(self) -> tuple[int, bytes]:
        began = time.monotonic()
        self.first = self.first or began
        if self.mode == "queue16":
            async with self.slots:
                await asyncio.sleep(0.02)
        elif self.mode == "rate300":
            second = int(began)
            count = self.window[1] + 1 if self.window[0] == second else 1
            self.window = (second, count)
            if count > 300:
                self.throttled += 1
                return 429, b"Retry-After: 1\r\n"
            await asyncio.sleep(0.001)
        else:
            await asyncio.sleep(0.001)
        self.ok += 1
        self.last = time.monotonic()
        self.times.append(self.last - began)
        return 200, b""

    def stats(self) -> dict[str, Any]:
        span = max(self.last - self.first, 1e-9)
        return {"ok": self.ok, "throttled": self.throttled, "rate": self.ok / span if self.ok > 1 else 0.0,
                "p50_ms": 1000 * statistics.median(self.times) if self.times else 0.0}


async def serve(mode: str, port: int) -> None:
    """Serve ``mode`` on ``port``: POST answers as the mode says, GET /stats the counts, /reset."""
    endpoint = Endpoint(mode)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal endpoint
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                if head.startswith(b"GET /stats"):
                    status, extra, body = 200, b"", json.dumps(endpoint.stats()).encode()
                elif head.startswith(b"GET /reset"):
                    endpoint = Endpoint(mode)
                    status, extra, body = 200, b"", b"{}"
                else:
                    status, extra = await endpoint.answer()
                    body = b"ok"
                writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n%s\r\n%s"
                             % (status, len(body), extra, body))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def get(port: int, path: str) -> dict[str, Any]:
    """GET a JSON answer from the endpoint."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())  # type: ignore[no-any-return]
    finally:
        conn.close()


def contestant(env: Infra, mode: str, port: int, setting: Any, messages: int, n: int) -> dict[str, Any]:
    """One job with ``max_in_flight: setting`` (None: left out, so "auto") on a fresh backlog."""
    topic = f"c{n}-{mode}"
    env.kafka.create_topic(topic, 4)
    produce(env.kafka.bootstrap, topic, [json.dumps({"n": i}).encode() for i in range(messages)],
            partitions=4)
    get(port, "/reset")
    service = start_service(env, f"svc{n}", redis_db=n % 16)
    assert not isinstance(service, str), service
    try:
        job: dict[str, Any] = {"id": f"j{n}", "owner": "ops", "type": "POST", "topic": topic,
                               "ordering": "none", "datamap": {"n": "$.msg.n"},
                               "url": f"http://127.0.0.1:{port}/x/{{n}}", "json_body": ["n"],
                               "retry": {"max_attempts": 2, "initial_wait": 0.2, "max_wait": 1}}
        if setting is not None:
            job["max_in_flight"] = setting
        assert service.request("POST", f"/job/j{n}", job).status == 201
        limits: list[int] = []

        def done() -> bool:
            s = service.request("GET", f"/job/j{n}/status").json
            limits.append(s["in_flight_limit"])
            c = s["counters"]
            return bool(c["delivered"] + c["dead_lettered"] >= messages)

        wait_for(done, 600, "the backlog done", every=0.2)
        status = service.request("GET", f"/job/j{n}/status").json
    finally:
        stop_service(service)
    figures = get(port, "/stats")
    figures["dead_lettered"] = status["counters"]["dead_lettered"]
    figures["limit"] = statistics.median(limits[len(limits) // 2:]) if limits else 0
    figures["limits"] = limits
    figures["share_429"] = figures["throttled"] / max(1, figures["ok"] + figures["throttled"])
    return figures


def main() -> None:
    """Run the scenarios and print the figures beside the targets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=6000)
    parser.add_argument("--only", default="queue16,fast,rate300")
    parser.add_argument("--limits", action="store_true", help="print each run's limits as polled")
    parser.add_argument("--serve", nargs=2, metavar=("MODE", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve[0], int(args.serve[1])))
        return
    plans = {"queue16": ["auto", 4, 16, 64], "fast": ["auto", 64], "rate300": ["auto", 64]}
    results: dict[str, dict[Any, dict[str, Any]]] = {}
    n = 0
    with infra("rc-concurrency-") as env:
        for mode in args.only.split(","):
            port = free_port()
            server = subprocess.Popen([sys.executable, __file__, "--serve", mode, str(port)])
            try:
                wait_for(lambda port=port: get(port, "/stats") is not None, 20, "the endpoint")
                for setting in plans[mode]:
                    n += 1
                    r = contestant(env, mode, port, None if setting == "auto" else setting, args.messages, n)
                    results.setdefault(mode, {})[setting] = r
                    print(f"{mode:8} max_in_flight {setting!s:>4}: {r['rate']:7.0f} requests/s, p50 "
                          f"{r['p50_ms']:5.1f} ms at the endpoint, {100 * r['share_429']:4.1f} % answered "
                          f"429, {r['dead_lettered']} dead-lettered, limit ~{r['limit']}", flush=True)
                    if args.limits:
                        print(f"  limits every 0.2 s: {r['limits']}", flush=True)
            finally:
                server.terminate()
                server.wait(10)
    print()
    if "queue16" in results:
        q = results["queue16"]
        best = max(q[s]["rate"] for s in (4, 16, 64))
        print(f"queue16: auto / best fixed = {q['auto']['rate'] / best:.2f} (target 0.90), "
              f"auto p50 {q['auto']['p50_ms']:.1f} ms (target <= 30; 64 in flight: {q[64]['p50_ms']:.1f} ms)")
    if "fast" in results:
        f = results["fast"]
        print(f"fast:    auto / 64 = {f['auto']['rate'] / f[64]['rate']:.2f} (target 0.95)")
    if "rate300" in results:
        limited = results["rate300"]
        auto, fixed = limited["auto"], limited[64]
        print(f"rate300: auto {auto['rate']:.0f}/s (target >= 255), {100 * auto['share_429']:.1f} % 429 "
              f"(target <= 5), {auto['dead_lettered']} dead letters (target 0); fixed 64: "
              f"{fixed['rate']:.0f}/s, {100 * fixed['share_429']:.1f} % 429, "
              f"{fixed['dead_lettered']} dead letters")


if __name__ == "__main__":
    main()
