"""The ceiling through treq: the bare ``Agent`` loop of ``agent_baseline.py``, each request sent
with ``treq.client.HTTPClient`` over the same ``Agent`` and pool.

Same bodies, same concurrency (one request at a time per loop), same pool settings, and the
same body producer (bytes written in one go), so that the difference from the bare loop is
treq's own work per request: parsing the URL (hyperlink), building ``Headers`` from a dict,
and wrapping the agent (cookies, redirects, gzip decoding) and the response. With
``file-body``, bodies go through treq's default producer instead (``FileBodyProducer``, one
cooperator hop per request), as a plain ``client.post(url, data=...)`` caller gets.

Run by ``bench/run.py``: ``python bench/treq_baseline.py URL_PREFIX BODIES_FILE CONCURRENCY
[file-body]``; prints the same JSON figures as ``agent_baseline.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from treq.client import HTTPClient
from twisted.internet import defer, task
from twisted.web.iweb import IBodyProducer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from agent_baseline import HEADERS, Body, load_work, make_agent, run_loops


async def main(reactor: Any, prefix: str, bodies_file: str, concurrency: str,
               producer: str = "raw-body") -> None:
    """Post every body through treq over the pooled ``Agent``; print the figures as JSON."""
    if producer not in ("raw-body", "file-body"):
        raise SystemExit(f"the body producer is raw-body or file-body, not {producer!r}")
    work = load_work(prefix, bodies_file)
    pool, agent = make_agent(reactor, int(concurrency))
    client = HTTPClient(agent, data_to_body_producer=Body if producer == "raw-body" else IBodyProducer)
    headers = {k.decode(): [v.decode() for v in values] for k, values in HEADERS.items()}

    async def send(url: str, body: bytes) -> int:
        response = await client.post(url, data=body, headers=headers)
        await response.content()
        return response.code

    figures = await run_loops(work, int(concurrency), send)
    await pool.closeCachedConnections()
    print(json.dumps(figures))


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, *sys.argv[1:])))
