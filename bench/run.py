"""Delivery throughput of one service process against a bare Twisted Agent loop, same run.

Real Kafka (as in the tests), real Redis, nginx answering 200 on loopback. Produces
100,000 JSON messages over 4 partitions, measures how fast one ``twistd restconsumer``
process delivers them (one request per message, 5 datamap paths, ``json_body``), and
beside it the ceiling: a bare ``Agent`` loop posting the same bodies to the same nginx
with the same concurrency (one request at a time per partition). Prints both and their
ratio; the target is 0.7.

    python bench/run.py [--messages N] [--baseline-requests N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.infra.kafka import KafkaBroker  # noqa: E402
from tests.infra.kafka_io import committed, produce  # noqa: E402
from tests.infra.ports import free_port, wait_for  # noqa: E402
from tests.infra.redis import RedisServer  # noqa: E402
from tests.infra.service import ServiceProcess  # noqa: E402

PARTITIONS = 4
NGINX = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def message(i: int) -> dict[str, object]:
    """One test message: a person as Aether might send it."""
    return {"id": f"person-{i}", "name": f"Person {i}", "age": 20 + i % 60,
            "household": {"id": f"hh-{i // 4}", "size": 1 + i % 5}, "active": i % 3 != 0}


def body(msg: dict[str, object]) -> dict[str, object]:
    """The JSON body the job makes of a message."""
    return {"id": msg["id"], "name": msg["name"], "age": msg["age"],
            "household": msg["household"]["id"], "active": msg["active"]}  # type: ignore[index]


def start_nginx(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """nginx on a free loopback port, answering 200 to everything."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx-light"], check=True)
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX.format(dir=workdir, port=port))
    process = subprocess.Popen([binary, "-c", str(conf), "-p", str(workdir)])
    import urllib.request

    wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/").status == 200, 10, "nginx")
    return process, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--baseline-requests", type=int, default=20_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="restconsumer-bench-"))
    kafka = KafkaBroker(work / "kafka")
    redis = RedisServer(work / "redis")
    nginx = None
    service = None
    try:
        kafka.start()
        redis.start()
        nginx, port = start_nginx(work / "nginx")
        sink = f"http://127.0.0.1:{port}"

        bodies = work / "bodies.jsonl"
        with bodies.open("w") as f:
            for i in range(args.baseline_requests):
                m = message(i)
                f.write(json.dumps({"id": m["id"], "body": body(m)}) + "\n")
        def ceiling_runs(count: int) -> list[dict[str, float]]:
            runs = [json.loads(subprocess.run(
                [sys.executable, str(REPO / "bench" / "agent_baseline.py"), f"{sink}/people/",
                 str(bodies), str(PARTITIONS)], check=True, capture_output=True, text=True).stdout)
                for _ in range(count)]
            assert all(run["failures"] == 0 for run in runs)
            return runs

        service = ServiceProcess(work / "service", kafka=kafka.bootstrap, redis=redis.url).start()
        access_log = work / "nginx" / "access.log"

        def deliver_all(name: str) -> tuple[float, int, int]:
            """Produce the messages to a new topic, run a job on it: rate, produced, requests."""
            topic = f"bench.{name}"
            kafka.create_topic(topic, PARTITIONS)
            produced = produce(kafka.bootstrap, topic,
                               (json.dumps(message(i)).encode() for i in range(args.messages)),
                               partitions=PARTITIONS)
            before = sum(1 for _ in access_log.open()) if access_log.exists() else 0
            job = {"id": name, "owner": "bench", "type": "POST", "topic": topic,
                   "datamap": {"id": "$.msg.id", "name": "$.msg.name", "age": "$.msg.age",
                               "household": "$.msg.household.id", "active": "$.msg.active"},
                   "url": f"{sink}/people/{{id}}",
                   "json_body": ["id", "name", "age", "household", "active"]}
            assert service.request("POST", f"/job/{name}", job).status == 201

            def done_so_far() -> int:
                offsets = committed(kafka.bootstrap, f"restconsumer.{name}", topic, PARTITIONS)
                return sum(max(o, 0) for o in offsets)

            first = wait_for(lambda: (n := done_so_far()) > 0 and (n, time.perf_counter()), 60,
                             "first commits", every=0.05)
            start_count, started = first  # type: ignore[misc]
            wait_for(lambda: done_so_far() >= produced, 600, "every message delivered", every=0.2)
            rate = (produced - start_count) / (time.perf_counter() - started)
            assert service.request("POST", f"/job/{name}/stop").status == 200
            return rate, produced, sum(1 for _ in access_log.open()) - before

        # Noise on a shared machine only ever lowers a run, so both sides are the best of
        # several, taken in turns: ceiling, service, ceiling, service, ceiling.
        runs = ceiling_runs(2)
        first_run = deliver_all("first")
        runs += ceiling_runs(2)
        second_run = deliver_all("second")
        runs += ceiling_runs(2)
        baseline = max(runs, key=lambda run: run["per_second"])
        rate, produced, _ = max(first_run, second_run)
        ratio = rate / baseline["per_second"]
        print(f"bare Agent loop (ceiling): {baseline['per_second']:8.0f} requests/s "
              f"(best of {', '.join(str(round(run['per_second'])) for run in runs)}; "
              f"{baseline['requests']} requests each, concurrency {PARTITIONS})")
        print(f"restconsumer, one process: {rate:8.0f} messages/s "
              f"(best of {first_run[0]:.0f}, {second_run[0]:.0f}; {produced} JSON messages over "
              f"{PARTITIONS} partitions, 5 datamap paths, json_body)")
        print(f"requests nginx received:   {first_run[2]:8d}, {second_run[2]} (for {produced} messages each)")
        verdict = "MET" if ratio >= 0.7 else "MISSED"
        print(f"ratio to the ceiling:      {ratio:8.2f} (target 0.70) -> {verdict}")
    finally:
        if service is not None:
            service.stop()
        if nginx is not None:
            nginx.terminate()
            nginx.wait()
        redis.stop()
        kafka.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
