"""The jobs folder preload, on a real service process with real Redis and Kafka."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tests.infra.ports import wait_for
from tests.infra.redis import RedisServer
from tests.infra.service import ServiceProcess


def job(job_id: str, **changes: object) -> dict[str, object]:
    """A small valid job."""
    return {"id": job_id, "owner": "folder", "type": "POST", "topic": "people",
            "datamap": {"id": "$.msg.id"}, "url": "http://127.0.0.1:9/{id}", **changes}


def test_folder_creates_jobs_once_and_reports_bad_files(
        tmp_path: Path, services: Callable[..., ServiceProcess], redis_db: RedisServer) -> None:
    """New jobs are created, stored ones left alone, broken files named, the rest still load."""
    folder = tmp_path / "jobs"
    folder.mkdir()
    (folder / "a-single.json").write_text(json.dumps(job("single")))
    (folder / "b-list.json").write_text(json.dumps([job("first"), job("second")]))
    (folder / "c-broken.json").write_text('{"id": "broken", ')
    (folder / "d-invalid.json").write_text(json.dumps(job("invalid", type="FETCH")))
    (folder / "e-existing.json").write_text(json.dumps(job("existing", owner="from-folder")))
    (folder / "notes.txt").write_text("not a job")
    client = redis_db.client()
    kept = {**job("existing", owner="from-redis"), "modified": "2020-01-01T00:00:00.000Z", "hash": "x"}
    client.set("job:existing", json.dumps(kept))
    client.sadd("list_jobs", "existing")

    service = services("--jobs", str(folder))
    wait_for(lambda: client.scard("list_jobs") == 4, 10, "jobs from the folder")
    assert client.smembers("list_jobs") == {"single", "first", "second", "existing"}
    assert json.loads(client.get("job:existing")) == kept
    listed = {j["id"]: j for j in service.request("GET", "/jobs").json}
    assert listed["single"]["owner"] == "folder"
    assert listed["single"]["hash"]

    wait_for(lambda: "d-invalid.json" in service.log(), 5, "the invalid file reported")
    log = service.log()
    assert "c-broken.json" in log and "cannot be read as JSON" in log
    assert "d-invalid.json" in log and "type" in log
    assert "notes.txt" not in log

    # A second start leaves jobs changed in Redis since alone.
    client.set("job:single", json.dumps({**job("single", owner="changed"), "modified": "x", "hash": "y"}))
    service.stop()
    services("--jobs", str(folder))
    assert json.loads(client.get("job:single"))["owner"] == "changed"
