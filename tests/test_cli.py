"""The ``restconsumer`` command (SPEC §9, issue 12 point 4): argument handling and output in-process
over treq's StubTreq and a small fake of the API; then as a subprocess against the real service."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from klein import Klein
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from restconsumer.ops.cli import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, envelope, run
from tests.infra.kafka import KafkaBroker
from tests.infra.kafka_io import produce
from tests.infra.ports import wait_for
from tests.infra.service import ADMIN_TOKEN, REPO, ServiceProcess
from tests.infra.sink import Sink

Start = Callable[..., ServiceProcess]


# -- a fake of the API, served to the CLI through StubTreq ------------------------------------


def _answer(request: IRequest, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(body).encode()


class FakeAPI:
    """Just enough of the API: jobs in a dict, every request recorded, canned answers elsewhere."""

    app = Klein()

    def __init__(self, *, jobs_status: bool = True) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.stopped: set[str] = set()
        self.requests: list[dict[str, Any]] = []
        self.jobs_status = jobs_status
        self.preview_results: list[dict[str, Any]] = []
        self.deadletters: list[dict[str, Any]] = []
        self.replaying = False

    def _record(self, request: IRequest) -> Any:
        raw = request.content.read()
        body = json.loads(raw) if raw else None
        self.requests.append({
            "method": request.method.decode(), "path": request.path.decode(),
            "args": {k.decode(): [v.decode() for v in vs] for k, vs in request.args.items()},
            "authorization": (request.getHeader(b"Authorization") or b"").decode(), "body": body})
        return body

    def _job(self, request: IRequest, job_id: str) -> dict[str, Any]:
        if job_id not in self.jobs:
            raise LookupError(job_id)
        return self.jobs[job_id]

    @app.handle_errors(LookupError)
    def _missing(self, request: IRequest, failure: Failure) -> bytes:
        return _answer(request, 404, {"error": "no such job", "details": [str(failure.value.args[0])]})

    @app.route("/jobs", methods=["GET"])
    def list_jobs(self, request: IRequest) -> bytes:
        self._record(request)
        return _answer(request, 200, list(self.jobs.values()))

    @app.route("/jobs/status", methods=["GET"])
    def jobs_status_route(self, request: IRequest) -> bytes:
        self._record(request)
        if not self.jobs_status:
            return _answer(request, 200, [])  # what /jobs/<owner> answers for an owner "status"
        return _answer(request, 200, [{"id": i, "state": "stopped" if i in self.stopped else "running"}
                                      for i in self.jobs])

    @app.route("/jobs/<owner>", methods=["GET"])
    def owner_jobs(self, request: IRequest, owner: str) -> bytes:
        self._record(request)
        return _answer(request, 200, [j for j in self.jobs.values() if j.get("owner") == owner])

    @app.route("/job/<job_id>", methods=["GET"])
    def get_job(self, request: IRequest, job_id: str) -> bytes:
        self._record(request)
        return _answer(request, 200, self._job(request, job_id))

    @app.route("/job/<job_id>", methods=["POST"])
    def post_job(self, request: IRequest, job_id: str) -> bytes:
        body = self._record(request)
        problems = [{"field": name, "reason": "is required"}
                    for name in ("owner", "url") if name not in body]
        if "datamap" in body and not isinstance(body["datamap"], dict):
            problems.append({"field": "datamap", "reason": "must be an object"})
        if problems:
            return _answer(request, 400, {"error": "invalid job", "details": problems})
        if body.get("owner") == "someone-else":
            return _answer(request, 403, {"error": "forbidden", "details": [f"job {job_id} is not yours"]})
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        created = job_id not in self.jobs
        self.jobs[job_id] = {**body, "modified": "2024-01-01T00:00:00Z", "hash": digest}
        return _answer(request, 201 if created else 200, self.jobs[job_id])

    @app.route("/job/<job_id>", methods=["DELETE"])
    def delete_job(self, request: IRequest, job_id: str) -> bytes:
        self._record(request)
        self._job(request, job_id)
        del self.jobs[job_id]
        return _answer(request, 200, {"id": job_id, "deleted": True})

    @app.route("/job/<job_id>/<action>", methods=["POST"])
    def run_state(self, request: IRequest, job_id: str, action: str) -> bytes:
        self._record(request)
        self._job(request, job_id)
        if action == "preview":
            return _answer(request, 200, {"results": self.preview_results})
        if action not in ("start", "stop"):
            return _answer(request, 404, {"error": "not found", "details": [request.path.decode()]})
        (self.stopped.add if action == "stop" else self.stopped.discard)(job_id)
        return _answer(request, 200, {"id": job_id, "state": "stopped" if action == "stop" else "running"})

    @app.route("/job/<job_id>/set_offset/<offset>", methods=["POST"])
    def set_offset(self, request: IRequest, job_id: str, offset: str) -> bytes:
        self._record(request)
        self._job(request, job_id)
        if offset not in ("beginning", "end") and not offset.isdigit():
            return _answer(request, 400, {"error": "bad set_offset",
                                          "details": [f"offset must be a number, not {offset!r}"]})
        return _answer(request, 200, {"id": job_id, "offsets": [
            {"topic": "people", "partition": 0, "offset": 0},
            {"topic": "people", "partition": 1, "offset": 12}]})

    @app.route("/job/<job_id>/status", methods=["GET"])
    def status(self, request: IRequest, job_id: str) -> bytes:
        self._record(request)
        self._job(request, job_id)
        return _answer(request, 200, {
            "id": job_id, "state": "stopped" if job_id in self.stopped else "running",
            "counters": {"consumed": 7, "delivered": 6, "retried": 1, "dead_lettered": 1, "filtered": 0},
            "lag": {"people:0": 3}, "total_lag": 3, "rate": 1.5, "bytes_held": 0, "last_error": None,
            "circuit": {"state": "closed", "since": None, "reason": None},
            "instances": [{"instance": "host-1", "partitions": ["people:0"], "rate": 1.5}]})

    @app.route("/preview", methods=["POST"])
    def preview(self, request: IRequest) -> bytes:
        body = self._record(request)
        if "owner" not in body["job"]:
            return _answer(request, 400, {"error": "invalid job",
                                          "details": [{"field": "owner", "reason": "is required"}]})
        return _answer(request, 200, {"results": self.preview_results})

    @app.route("/job/<job_id>/deadletters", methods=["GET"])
    def deadletters(self, request: IRequest, job_id: str) -> bytes:
        self._record(request)
        self._job(request, job_id)
        return _answer(request, 200, {"deadletters": self.deadletters})

    @app.route("/job/<job_id>/deadletters/replay", methods=["POST"])
    def replay(self, request: IRequest, job_id: str) -> bytes:
        self._record(request)
        self._job(request, job_id)
        if self.replaying:
            return _answer(request, 409, {"error": "conflict", "details": [f"a replay of {job_id} runs"]})
        self.replaying = True
        return _answer(request, 202, {"replay": {"partitions": {"0": [3, 9], "1": [0, 2]}}})


def job(job_id: str, **more: Any) -> dict[str, Any]:
    """A job definition the fake accepts."""
    return {"id": job_id, "owner": "alice", "type": "POST", "topic": ["people"],
            "datamap": {"id": "$.msg.id"}, "url": "http://crm.example/api/{id}", **more}


def cli(api: FakeAPI, *argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run one command line against the fake; (exit code, stdout, stderr)."""
    stub = StubTreq(api.app.resource())
    out, err = io.StringIO(), io.StringIO()
    done: list[Any] = []
    Deferred.fromCoroutine(run(list(argv), stub, out=out, err=err, env=env or {}, timeout=None)
                           ).addBoth(done.append)
    for _ in range(100):
        if done:
            break
        stub.flush()
    assert done, "the command never finished"
    if isinstance(done[0], Failure):
        done[0].raiseException()
    return done[0], out.getvalue(), err.getvalue()


def write(path: Path, content: Any) -> Path:
    """Write ``content`` as JSON (or as it is, when text) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


# -- in-process: arguments and output -----------------------------------------------------------


def test_apply_reports_created_unchanged_updated(tmp_path: Path) -> None:
    """A folder of one-job and list files: created, then unchanged (same hash), then updated."""
    api = FakeAPI()
    write(tmp_path / "jobs" / "a.json", job("a"))
    write(tmp_path / "jobs" / "more.json", [job("b"), {**job("c"), "ID": "c", "id": None}])
    write(tmp_path / "jobs" / "notes.txt", "not a job")
    code, out, err = cli(api, "apply", "-f", str(tmp_path / "jobs"))
    assert (code, err) == (EXIT_OK, "")
    assert out.splitlines() == ["a: created", "b: created", "c: created"]
    assert cli(api, "apply", "-f", str(tmp_path / "jobs"))[1].splitlines() == \
        ["a: unchanged", "b: unchanged", "c: unchanged"]
    write(tmp_path / "jobs" / "a.json", job("a", ratelimit=1))
    assert cli(api, "apply", "-f", str(tmp_path / "jobs" / "a.json"))[1] == "a: updated\n"
    # Each job is read first, then posted; nothing else is asked.
    assert [(r["method"], r["path"]) for r in api.requests[-2:]] == [("GET", "/job/a"), ("POST", "/job/a")]


def test_apply_prints_every_problem_and_exits_1(tmp_path: Path) -> None:
    """Problems as '<job id>: <field>: <reason>' on stderr; the valid jobs are still applied."""
    api = FakeAPI()
    write(tmp_path / "a.json", job("good"))
    write(tmp_path / "b.json", [{"id": "bad", "datamap": "$.x"}, {"owner": "x"}, "text"])
    write(tmp_path / "c.json", "{not json")
    write(tmp_path / "d.json", job("mine", owner="someone-else"))
    code, out, err = cli(api, "apply", "-f", str(tmp_path))
    assert code == EXIT_FAILED
    assert out == "good: created\n"
    lines = err.splitlines()
    assert "bad: owner: is required" in lines
    assert "bad: url: is required" in lines
    assert "bad: datamap: must be an object" in lines
    assert "b.json[1]: id: is required" in lines
    assert "b.json[2]: id: a job must be a JSON object" in lines
    assert any(line.startswith(f"{tmp_path / 'c.json'}: not a JSON file") for line in lines)
    assert "mine: error: forbidden (HTTP 403): job mine is not yours" in lines
    assert set(api.jobs) == {"good"}


def test_apply_refuses_an_id_defined_twice_and_empty_or_missing_folders(tmp_path: Path) -> None:
    """A duplicate id is applied from neither file; no *.json or no such path exits 1."""
    api = FakeAPI()
    write(tmp_path / "one" / "a.json", job("twice"))
    write(tmp_path / "one" / "b.json", job("twice", ratelimit=2))
    code, _, err = cli(api, "apply", "-f", str(tmp_path / "one"))
    assert code == EXIT_FAILED and "twice: id: defined more than once" in err
    assert api.jobs == {}
    (tmp_path / "empty").mkdir()
    code, _, err = cli(api, "apply", "-f", str(tmp_path / "empty"))
    assert code == EXIT_FAILED and "no *.json files" in err
    code, _, err = cli(api, "apply", "-f", str(tmp_path / "nowhere"))
    assert code == EXIT_FAILED and "no such file or folder" in err


def test_apply_json_output(tmp_path: Path) -> None:
    """--json prints one list of results, each with the stored job or the API's problems."""
    api = FakeAPI()
    write(tmp_path / "jobs.json", [job("a"), {"id": "bad"}])
    code, out, _ = cli(api, "--json", "apply", "-f", str(tmp_path / "jobs.json"))
    assert code == EXIT_FAILED
    results = json.loads(out)
    assert [(r["id"], r["result"]) for r in results] == [("a", "created"), ("bad", "invalid")]
    assert results[0]["job"]["hash"] == api.jobs["a"]["hash"]
    assert {"field": "owner", "reason": "is required"} in results[1]["details"]


def test_list_table_with_states_and_by_owner() -> None:
    """Aligned columns, states from /jobs/status, --owner asks /jobs/{owner}, --json as the API says."""
    api = FakeAPI()
    api.jobs = {"a": job("a"), "long-name": job("long-name", owner="bob", topic="t1")}
    api.stopped = {"long-name"}
    code, out, _ = cli(api, "list")
    assert code == EXIT_OK
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "OWNER", "STATE", "TOPICS", "TYPE", "URL"]
    assert lines[1].split() == ["a", "alice", "running", "people", "POST", "http://crm.example/api/{id}"]
    assert lines[2].split() == ["long-name", "bob", "stopped", "t1", "POST", "http://crm.example/api/{id}"]
    assert lines[0].index("OWNER") == lines[1].index("alice") == lines[2].index("bob")
    assert lines[0].index("URL") == lines[1].index("http") == lines[2].index("http")
    assert cli(api, "list", "--owner", "bob")[1].splitlines()[1].startswith("long-name")
    assert api.requests[-2]["path"] == "/jobs/bob"
    code, out, _ = cli(api, "list", "--json")
    assert json.loads(out) == list(api.jobs.values())


def test_list_without_states_and_empty() -> None:
    """A service without /jobs/status shows no state column; no jobs says so."""
    api = FakeAPI(jobs_status=False)
    assert cli(api, "list") == (EXIT_OK, "no jobs\n", "")
    api.jobs = {"a": job("a")}
    assert cli(api, "list")[1].splitlines()[0].split() == ["ID", "OWNER", "TOPICS", "TYPE", "URL"]


def test_get_status_start_stop_delete() -> None:
    """get as indented JSON; status as aligned lines; start/stop/delete one line each."""
    api = FakeAPI()
    api.jobs = {"a": job("a")}
    code, out, _ = cli(api, "get", "a")
    assert code == EXIT_OK and json.loads(out) == api.jobs["a"] and out.startswith("{\n  ")
    assert json.loads(cli(api, "get", "a", "--json")[1]) == api.jobs["a"]
    code, out, _ = cli(api, "status", "a")
    lines = out.splitlines()
    assert code == EXIT_OK
    assert lines[0].split() == ["id", "a"] and lines[1].split() == ["state", "running"]
    assert "counters    consumed=7 delivered=6 retried=1 dead_lettered=1 filtered=0" in lines
    assert "circuit     state=closed since=- reason=-" in lines
    assert "instances   instance=host-1 partitions=[people:0] rate=1.5" in lines
    assert cli(api, "stop", "a") == (EXIT_OK, "a: stopped\n", "")
    assert json.loads(cli(api, "status", "a", "--json")[1])["state"] == "stopped"
    assert cli(api, "start", "a") == (EXIT_OK, "a: running\n", "")
    assert cli(api, "delete", "a") == (EXIT_OK, "a: deleted\n", "")
    assert api.jobs == {}


def test_errors_print_the_api_error_and_details_and_exit_1() -> None:
    """A 404 prints error and details on stderr; --json prints the API's error body there."""
    api = FakeAPI()
    for command in ("get", "status", "start", "stop", "delete"):
        assert cli(api, command, "ghost") == (EXIT_FAILED, "", "error: no such job (HTTP 404)\n  ghost\n")
    code, out, err = cli(api, "--json", "get", "ghost")
    assert (code, out) == (EXIT_FAILED, "")
    assert json.loads(err) == {"error": "no such job", "details": ["ghost"]}


def test_set_offset_arguments_and_table() -> None:
    """OFFSET in the path, --topic/--partition as query; a table of the new offsets."""
    api = FakeAPI()
    api.jobs = {"a": job("a")}
    code, out, _ = cli(api, "set-offset", "a", "beginning", "--topic", "people", "--partition", "1")
    assert code == EXIT_OK
    assert api.requests[-1]["path"] == "/job/a/set_offset/beginning"
    assert api.requests[-1]["args"] == {"topic": ["people"], "partition": ["1"]}
    assert [line.split() for line in out.splitlines()] == [
        ["TOPIC", "PARTITION", "OFFSET"], ["people", "0", "0"], ["people", "1", "12"]]
    cli(api, "set-offset", "a", "end")
    assert api.requests[-1]["args"] == {}
    assert cli(api, "set-offset", "a", "soon") == (
        EXIT_FAILED, "", "error: bad set_offset (HTTP 400)\n  offset must be a number, not 'soon'\n")


def test_authentication_options_and_environment() -> None:
    """--token or RESTCONSUMER_API_TOKEN as Bearer; --user/--password or their variables as Basic."""
    api = FakeAPI()
    basic = "Basic " + base64.b64encode(b"ops:pw 1").decode()
    for argv, env, expected in [
        (["--token", "t1"], {}, "Bearer t1"),
        ([], {"RESTCONSUMER_API_TOKEN": "t2"}, "Bearer t2"),
        (["--user", "ops", "--password", "pw 1"], {"RESTCONSUMER_API_TOKEN": "t2"}, basic),
        ([], {"RESTCONSUMER_API_USER": "ops", "RESTCONSUMER_API_PASSWORD": "pw 1"}, basic),
        (["list", "--token", "after"], {}, "Bearer after"),
        ([], {}, ""),
    ]:
        assert cli(api, *argv, *([] if "list" in argv else ["list"]), env=env)[0] == EXIT_OK
        assert api.requests[0]["authorization"] == expected, argv
        api.requests.clear()


def test_url_option_and_environment() -> None:
    """--url wins over RESTCONSUMER_URL, which wins over the default; ids are percent-encoded."""
    seen: list[str] = []

    class Refusing:
        async def request(self, method: str, url: str, **_: Any) -> Any:
            seen.append(url)
            raise ConnectionRefusedError()

    for argv, env in [(["--url", "http://a:1/"], {"RESTCONSUMER_URL": "http://b:2"}),
                      ([], {"RESTCONSUMER_URL": "http://b:2"}), ([], {})]:
        err = io.StringIO()
        done: list[Any] = []
        Deferred.fromCoroutine(run([*argv, "get", "x y"], Refusing(), err=err, env=env, timeout=None)
                               ).addBoth(done.append)
        assert done == [EXIT_UNREACHABLE]
        assert "connection refused" in err.getvalue()
    assert seen == ["http://a:1/job/x%20y", "http://b:2/job/x%20y", "http://127.0.0.1:9013/job/x%20y"]


def test_preview_of_a_file_and_of_a_stored_job(tmp_path: Path) -> None:
    """FILE → POST /preview with the job; ID → POST /job/{id}/preview; envelopes per SPEC §9."""
    api = FakeAPI()
    api.jobs = {"stored": job("stored")}
    api.preview_results = [
        {"message": 0, "record": 0, "request": {
            "method": "POST", "url": "http://crm.example/api/1",
            "headers": {"Authorization": "Bearer ***", "Content-Type": "application/json"},
            "body": "{\"id\": 1}"}},
        {"message": 1, "record": 0, "filtered": True}]
    avro = tmp_path / "m.avro"
    avro.write_bytes(b"Obj\x01\xff\x00")
    envelope_file = write(tmp_path / "env.json", {"base64": "aGk=", "key": "k"})
    path = write(tmp_path / "job.json", job("from-file"))
    code, out, err = cli(api, "preview", str(path), "--message", '{"id": 1}', "-m", "[1, 2]",
                         "-m", '{"value": {"id": 2}, "key": "k2", "partition": 3}',
                         "-m", f"@{avro}", "-m", f"@{envelope_file}")
    assert (code, err) == (EXIT_OK, "")
    sent = api.requests[-1]
    assert sent["path"] == "/preview"
    assert sent["body"] == {"job": job("from-file"), "messages": [
        {"value": {"id": 1}}, {"value": [1, 2]}, {"value": {"id": 2}, "key": "k2", "partition": 3},
        {"base64": base64.b64encode(b"Obj\x01\xff\x00").decode()}, {"base64": "aGk=", "key": "k"}]}
    assert out.splitlines() == [
        "message 0 record 0: POST http://crm.example/api/1",
        "    Authorization: Bearer ***", "    Content-Type: application/json", '    {"id": 1}',
        "message 1 record 0: filtered", "2 records ok, 0 with errors"]

    api.preview_results.append({"message": 2, "record": 0, "error": "no value for URL key id"})
    code, out, _ = cli(api, "preview", "stored", "-m", "{}")
    assert code == EXIT_FAILED, "a record that would fail is a failed preview"
    assert api.requests[-1]["path"] == "/job/stored/preview"
    assert api.requests[-1]["body"] == {"messages": [{"value": {}}]}
    assert "message 2 record 0: error: no value for URL key id" in out.splitlines()
    code, out, _ = cli(api, "preview", "stored", "-m", "{}", "--json")
    assert json.loads(out) == {"results": api.preview_results}


def test_preview_problems() -> None:
    """An invalid job prints its problems; a missing file, bad JSON or missing job exit 1."""
    api = FakeAPI()
    api.jobs = {"stored": job("stored")}
    with pytest.raises(SystemExit) as usage:
        cli(api, "preview", "stored")
    assert usage.value.code == 2
    assert cli(api, "preview", "stored", "-m", "{oops")[0] == EXIT_FAILED
    assert "not JSON" in cli(api, "preview", "stored", "-m", "{oops")[2]
    assert cli(api, "preview", "nowhere/job.json", "-m", "1")[2] == "error: no such file: nowhere/job.json\n"
    assert cli(api, "preview", "ghost", "-m", "1") == (
        EXIT_FAILED, "", "error: no such job (HTTP 404)\n  ghost\n")


def test_preview_invalid_job_file(tmp_path: Path) -> None:
    """A 400 from POST /preview prints '<job id>: <field>: <reason>'."""
    path = write(tmp_path / "job.json", {"id": "x", "url": "http://h/"})
    assert cli(FakeAPI(), "preview", str(path), "-m", "1") == (EXIT_FAILED, "", "x: owner: is required\n")


def test_envelope() -> None:
    """An object with value or base64 is an envelope; anything else is wrapped."""
    assert envelope({"value": 1, "key": "k"}) == {"value": 1, "key": "k"}
    assert envelope({"base64": "AA=="}) == {"base64": "AA=="}
    assert envelope({"id": 1}) == {"value": {"id": 1}}
    assert envelope("text") == {"value": "text"}
    assert envelope(None) == {"value": None}


def test_deadletters_table_and_replay() -> None:
    """A table of letters (ms times as ISO, bytes marked), --limit as query; --replay's spans."""
    api = FakeAPI()
    api.jobs = {"a": job("a")}
    api.deadletters = [
        {"partition": 0, "offset": 5, "timestamp": 1700000000123,
         "source": {"topic": "people", "partition": 2, "offset": 41}, "reason": "HTTP 400 Bad Request",
         "status": 400, "attempts": 1, "key": "k1", "value": "{\"id\": 1}"},
        {"partition": 0, "offset": 6, "timestamp": 1700000001000,
         "source": {"topic": "people", "partition": 0, "offset": 7}, "reason": "not JSON " * 20,
         "status": None, "attempts": 0, "key": None, "value": {"base64": "AAEC"}}]
    code, out, _ = cli(api, "deadletters", "a", "--limit", "5")
    assert code == EXIT_OK
    assert api.requests[-1]["args"] == {"limit": ["5"]}
    lines = out.splitlines()
    assert lines[0].split() == ["PARTITION", "OFFSET", "TIME", "SOURCE", "STATUS", "ATTEMPTS",
                                "REASON", "KEY", "VALUE"]
    assert lines[1].split()[:6] == ["0", "5", "2023-11-14T22:13:20.123Z", "people[2]@41", "400", "1"]
    assert lines[1].split()[-3:] == ["k1", '{"id":', "1}"]
    assert "base64:AAEC" in lines[2] and "…" in lines[2]
    assert json.loads(cli(api, "deadletters", "a", "--json")[1]) == {"deadletters": api.deadletters}
    api.deadletters = []
    assert cli(api, "deadletters", "a")[1] == "a: no dead letters\n"

    code, out, _ = cli(api, "deadletters", "a", "--replay")
    assert code == EXIT_OK
    assert (api.requests[-1]["method"], api.requests[-1]["path"]) == ("POST", "/job/a/deadletters/replay")
    assert [line.split() for line in out.splitlines()] == [
        ["a:", "replay", "started"], ["PARTITION", "FROM", "TO"], ["0", "3", "9"], ["1", "0", "2"]]
    assert cli(api, "deadletters", "a", "--replay") == (
        EXIT_FAILED, "", "error: conflict (HTTP 409)\n  a replay of a runs\n")


def test_an_answer_that_is_not_json() -> None:
    """A proxy's HTML error page still gives a clear error and exit 1."""
    app = Klein()

    @app.route("/jobs")
    def broken(request: IRequest) -> bytes:
        request.setResponseCode(502)
        return b"<html>Bad Gateway</html>"

    stub = StubTreq(app.resource())
    err = io.StringIO()
    done: list[Any] = []
    Deferred.fromCoroutine(run(["list"], stub, out=io.StringIO(), err=err, env={}, timeout=None)
                           ).addBoth(done.append)
    stub.flush()
    assert done == [EXIT_FAILED]
    assert err.getvalue() == "error: HTTP 502 (HTTP 502)\n  <html>Bad Gateway</html>\n"


# -- the command itself, as a subprocess -----------------------------------------------------------


def command(*argv: str, url: str | None = None, token: str | None = ADMIN_TOKEN,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python3 -m restconsumer.ops.cli [--url URL] ARGV`` with the admin token in the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESTCONSUMER_")}
    env["PYTHONPATH"] = str(REPO)
    if token is not None:
        env["RESTCONSUMER_API_TOKEN"] = token
    prefix = ["--url", url] if url else []
    return subprocess.run([sys.executable, "-m", "restconsumer.ops.cli", *prefix, *argv], env=env,
                          cwd=cwd or REPO, capture_output=True, text=True, timeout=180)


def test_help_usage_and_connection_refused() -> None:
    """--help exits 0 for the command and each subcommand; a wrong line 2; no service 2, clearly."""
    done = command("--help")
    assert done.returncode == 0
    for name in ("apply", "list", "get", "delete", "status", "start", "stop", "set-offset", "preview",
                 "deadletters"):
        assert name in done.stdout
        assert command(name, "--help").returncode == 0
    assert command("frobnicate").returncode == 2
    assert command("get").returncode == 2
    refused = command("list", url="http://127.0.0.1:1")
    assert refused.returncode == EXIT_UNREACHABLE
    assert "connection refused" in refused.stderr and "http://127.0.0.1:1" in refused.stderr


# -- against the running service -------------------------------------------------------------------


def sink_job(job_id: str, topic: str, sink: Sink, **more: Any) -> dict[str, Any]:
    """A job posting each message's id to the sink."""
    return {"id": job_id, "owner": "ops", "type": "POST", "topic": topic,
            "datamap": {"id": "$.msg.id"}, "url": f"{sink.url}/{job_id}/{{id}}",
            "basic_auth": {"user": "crm", "pw": "cli-secret-99"}, **more}


def test_apply_against_the_service(services: Start, topic: Callable[..., str], sink: Sink,
                                   tmp_path: Path) -> None:
    """An invalid job: exit 1, each problem with its field, nothing stored; valid jobs: created,
    unchanged on a second run, updated after a change."""
    service = services()
    name = topic()
    bad = {"id": "cli-bad", "type": "FETCH", "topic": name, "datamap": {"x": "$.[["},
           "url": "ftp://nowhere/", "colour": "red"}
    expected = service.request("POST", "/job/cli-bad", bad)
    assert expected.status == 400, expected
    problems = [f"cli-bad: {p['field']}: {p['reason']}" for p in expected.json["details"]]
    assert len(problems) >= 4
    write(tmp_path / "bad" / "one.json", sink_job("cli-ok", name, sink))
    write(tmp_path / "bad" / "two.json", [bad])
    done = command("apply", "-f", str(tmp_path / "bad"), url=service.url)
    assert done.returncode == 1, done
    for problem in problems:
        assert problem in done.stderr.splitlines(), (problem, done.stderr)
    assert service.request("GET", "/job/cli-bad").status == 404

    write(tmp_path / "good" / "a.json", sink_job("cli-a", name, sink))
    write(tmp_path / "good" / "b.json", [sink_job("cli-b", name, sink), sink_job("cli-c", name, sink)])
    done = command("apply", "-f", str(tmp_path / "good"), url=service.url)
    assert (done.returncode, done.stdout, done.stderr) == (
        0, "cli-a: created\ncli-b: created\ncli-c: created\n", "")
    done = command("apply", "-f", str(tmp_path / "good"), url=service.url)
    assert (done.returncode, done.stdout) == (0, "cli-a: unchanged\ncli-b: unchanged\ncli-c: unchanged\n")
    # A job read back (secrets as ***) and applied again is unchanged, its secret kept.
    shown = service.request("GET", "/job/cli-a").json
    write(tmp_path / "good" / "a.json", {k: v for k, v in shown.items() if k not in ("modified", "hash")})
    assert command("apply", "-f", str(tmp_path / "good" / "a.json"), url=service.url).stdout == \
        "cli-a: unchanged\n"
    write(tmp_path / "good" / "a.json", sink_job("cli-a", name, sink, ratelimit=0.5))
    done = command("apply", "-f", str(tmp_path / "good"), url=service.url)
    assert (done.returncode, done.stdout) == (0, "cli-a: updated\ncli-b: unchanged\ncli-c: unchanged\n")
    assert service.request("GET", "/job/cli-a").json["ratelimit"] == 0.5
    done = command("--json", "apply", "-f", str(tmp_path / "good"), url=service.url)
    results = json.loads(done.stdout)
    assert [r["result"] for r in results] == ["unchanged"] * 3
    assert results[0]["job"] == service.request("GET", "/job/cli-a").json


def test_list_get_status_start_stop_delete_against_the_service(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink, tmp_path: Path) -> None:
    """Each command against the real service; a missing job exits non-zero; a wrong token exits 1."""
    service = services()
    name = topic()
    for job_id, owner in (("cli-x", "ops"), ("cli-y", "team")):
        answer = service.request("POST", f"/job/{job_id}", sink_job(job_id, name, sink, owner=owner))
        assert answer.status == 201, answer

    done = command("list", url=service.url)
    assert done.returncode == 0, done
    lines = done.stdout.splitlines()
    assert lines[0].split()[:2] == ["ID", "OWNER"] and "URL" in lines[0].split()
    assert [line.split()[:2] for line in lines[1:]] == [["cli-x", "ops"], ["cli-y", "team"]]
    assert name in lines[1] and f"{sink.url}/cli-x/{{id}}" in lines[1]
    done = command("list", "--owner", "team", url=service.url)
    assert [line.split()[0] for line in done.stdout.splitlines()[1:]] == ["cli-y"]
    listed = json.loads(command("list", "--json", url=service.url).stdout)
    assert listed == service.request("GET", "/jobs").json

    done = command("get", "cli-x", url=service.url)
    assert done.returncode == 0
    assert json.loads(done.stdout) == service.request("GET", "/job/cli-x").json
    assert "cli-secret-99" not in done.stdout and '"pw": "***"' in done.stdout
    missing = command("get", "cli-missing", url=service.url)
    assert missing.returncode != 0
    assert missing.stdout == "" and "no such job" in missing.stderr and "cli-missing" in missing.stderr

    produce(kafka.bootstrap, name, [json.dumps({"id": f"m{i}"}).encode() for i in range(5)])
    wait_for(lambda: sink.count() >= 10, 30, "both jobs delivering")
    wait_for(lambda: json.loads(command("status", "--json", "cli-x", url=service.url).stdout)
             ["counters"]["delivered"] == 5, 20, "5 delivered in the status")
    done = command("status", "cli-x", url=service.url)
    assert done.returncode == 0
    fields = {line.split()[0]: line.split(maxsplit=1)[1] for line in done.stdout.splitlines()
              if line.strip() and not line.startswith(" ")}
    assert fields["id"] == "cli-x" and fields["state"] in ("running", "starting")
    assert "delivered=5" in fields["counters"]

    assert command("stop", "cli-x", url=service.url).stdout == "cli-x: stopped\n"
    wait_for(lambda: service.request("GET", "/job/cli-x/status").json["state"] == "stopped", 10, "stopped")
    assert json.loads(command("status", "cli-x", "--json", url=service.url).stdout)["state"] == "stopped"
    assert command("start", "cli-x", url=service.url).stdout == "cli-x: running\n"
    wait_for(lambda: service.request("GET", "/job/cli-x/status").json["state"] == "running", 20, "running")

    wrong = command("list", url=service.url, token="not-the-token")
    assert wrong.returncode == 1 and "authentication required" in wrong.stderr
    anonymous = command("list", url=service.url, token=None)
    assert anonymous.returncode == 1 and "(HTTP 401)" in anonymous.stderr

    done = command("delete", "cli-y", url=service.url)
    assert (done.returncode, done.stdout) == (0, "cli-y: deleted\n")
    assert service.request("GET", "/job/cli-y").status == 404
    assert command("delete", "cli-y", url=service.url).returncode == 1


def test_set_offset_against_the_service(services: Start, kafka: KafkaBroker, topic: Callable[..., str],
                                        sink: Sink) -> None:
    """set-offset beginning sends everything again; --topic/--partition name one partition; a bad
    offset exits 1 with the service's reason."""
    service = services()
    name = topic(2)
    assert service.request("POST", "/job/cli-rewind", sink_job("cli-rewind", name, sink)).status == 201
    produce(kafka.bootstrap, name, [json.dumps({"id": f"m{i}"}).encode() for i in range(10)], partitions=2)
    wait_for(lambda: sink.count() == 10, 30, "the first 10")

    done = command("set-offset", "cli-rewind", "beginning", url=service.url)
    assert done.returncode == 0, done
    assert [line.split() for line in done.stdout.splitlines()] == [
        ["TOPIC", "PARTITION", "OFFSET"], [name, "0", "0"], [name, "1", "0"]]
    wait_for(lambda: sink.count() == 20, 30, "the 10 again")

    done = command("--json", "set-offset", "cli-rewind", "3", "--topic", name, "--partition", "1",
                   url=service.url)
    assert done.returncode == 0, done
    assert json.loads(done.stdout)["offsets"] == [{"topic": name, "partition": 1, "offset": 3}]
    wait_for(lambda: sink.count() == 22, 30, "partition 1 from offset 3")

    bad = command("set-offset", "cli-rewind", "soon", url=service.url)
    assert bad.returncode == 1 and "error: bad set_offset (HTTP 400)" in bad.stderr
    assert command("set-offset", "cli-ghost", "end", url=service.url).returncode == 1


# -- against the running service: the dry-run and dead-letter routes --------------------------------


def avro_container(records: list[dict[str, Any]]) -> bytes:
    """An Avro Object Container File of ``records``, as Aether writes one per Kafka message."""
    import fastavro

    schema = {"type": "record", "name": "Person",
              "fields": [{"name": "id", "type": "string"}, {"name": "name", "type": "string"}]}
    buffer = io.BytesIO()
    fastavro.writer(buffer, fastavro.parse_schema(schema), records)
    return buffer.getvalue()


def test_preview_against_the_service(services: Start, topic: Callable[..., str], sink: Sink,
                                     tmp_path: Path) -> None:
    """A job file with a JSON message, one without the URL's key and an Avro container of two
    records: 3 requests and 1 error (exit 1), secrets as ***, nothing sent or stored; a stored
    job by its id; an invalid job file prints each problem with its field."""
    service = services()
    name = topic()
    definition = sink_job("cli-preview", name, sink, json_body=["id"])
    path = write(tmp_path / "job.json", definition)
    avro = tmp_path / "people.avro"
    avro.write_bytes(avro_container([{"id": "a1", "name": "Ann"}, {"id": "a2", "name": "Bo"}]))
    done = command("preview", str(path), "-m", '{"id": "p1"}', "-m", '{"other": 1}', "-m", f"@{avro}",
                   url=service.url)
    assert done.returncode == 1, done
    lines = done.stdout.splitlines()
    assert f"message 0 record 0: POST {sink.url}/cli-preview/p1" in lines
    assert any(line.startswith("message 1 record 0: error: ") for line in lines), lines
    assert f"message 2 record 0: POST {sink.url}/cli-preview/a1" in lines
    assert f"message 2 record 1: POST {sink.url}/cli-preview/a2" in lines
    assert "    Authorization: Basic ***" in lines
    assert "cli-secret-99" not in done.stdout
    assert lines[-1] == "3 records ok, 1 with errors"
    results = json.loads(command("--json", "preview", str(path), "-m", '{"id": "p1"}',
                                 url=service.url).stdout)["results"]
    assert [r["request"]["url"] for r in results] == [f"{sink.url}/cli-preview/p1"]
    assert json.loads(results[0]["request"]["body"]) == {"id": "p1"}
    assert service.request("GET", "/job/cli-preview").status == 404

    assert service.request("POST", "/job/cli-stored", sink_job("cli-stored", name, sink)).status == 201
    done = command("preview", "cli-stored", "-m", '{"value": {"id": "s1"}, "key": "k1"}', url=service.url)
    assert done.returncode == 0, done
    assert done.stdout.splitlines()[0] == f"message 0 record 0: POST {sink.url}/cli-stored/s1"
    assert command("preview", "cli-ghost", "-m", "{}", url=service.url).returncode == 1

    bad = write(tmp_path / "bad.json", {"id": "cli-bad", "type": "FETCH", "topic": name,
                                        "datamap": {"id": "$.msg.id"}, "url": "ftp://x/"})
    done = command("preview", str(bad), "-m", "{}", url=service.url)
    assert done.returncode == 1
    assert {"cli-bad: owner: is required", "cli-bad: url: must start with http:// or https://"} <= \
        set(done.stderr.splitlines()), done.stderr
    assert sink.count() == 0, "a preview sent a request"


def test_deadletters_and_replay_against_the_service(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink) -> None:
    """Two of six messages refused with 400: `deadletters` lists exactly those two with their source;
    after the endpoint is fixed `deadletters --replay` sends them once, a second replay nothing."""
    refused = {"/cli-dlq/m1", "/cli-dlq/m4"}
    sink.respond = lambda got: (400, {}, b"refused") if got.path in refused else (200, {}, b"ok")
    service = services()
    name = topic()
    assert service.request("POST", "/job/cli-dlq", sink_job("cli-dlq", name, sink)).status == 201
    produce(kafka.bootstrap, name, [json.dumps({"id": f"m{i}"}).encode() for i in range(6)])
    wait_for(lambda: service.request("GET", "/job/cli-dlq/status").json["counters"]["dead_lettered"] == 2,
             30, "two dead letters")

    def letters() -> list[dict[str, Any]]:
        done = command("--json", "deadletters", "cli-dlq", url=service.url)
        assert done.returncode == 0, done
        return json.loads(done.stdout)["deadletters"]

    wait_for(lambda: len(letters()) == 2, 30, "two dead letters listed")
    listed = letters()
    assert [(d["source"]["topic"], d["source"]["partition"], d["source"]["offset"]) for d in listed] == \
        [(name, 0, 1), (name, 0, 4)]
    assert [d["status"] for d in listed] == [400, 400]
    done = command("deadletters", "cli-dlq", url=service.url)
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert lines[0].split()[:4] == ["PARTITION", "OFFSET", "TIME", "SOURCE"] and len(lines) == 3
    assert f"{name}[0]@1" in lines[1] and f"{name}[0]@4" in lines[2]
    assert len(json.loads(command("--json", "deadletters", "cli-dlq", "--limit", "1",
                                  url=service.url).stdout)["deadletters"]) == 1

    sink.respond = lambda got: (200, {}, b"ok")
    before = sink.count()
    done = command("deadletters", "cli-dlq", "--replay", url=service.url)
    assert done.returncode == 0, done
    assert done.stdout.startswith("cli-dlq: replay started")
    wait_for(lambda: sink.count() == before + 2, 30, "the two replayed")
    assert sorted(got.path for got in sink.snapshot()[before:]) == sorted(refused)

    def replay() -> dict[str, Any]:
        return service.request("GET", "/job/cli-dlq/status").json.get("replay", {})

    wait_for(lambda: replay().get("state") == "done", 30, "the first replay done")
    first = replay()

    def second_replay() -> bool:
        again = command("deadletters", "cli-dlq", "--replay", url=service.url)
        return again.returncode == 0  # 409 (exit 1) while the first one's mark is held

    wait_for(second_replay, 30, "a second replay")
    second = wait_for(lambda: (now := replay()).get("started") != first["started"]
                      and now.get("state") == "done" and now, 30, "the second replay done")
    assert isinstance(second, dict)
    assert (second["replayed"], second["delivered"], second["dead_lettered"]) == (0, 0, 0), second
    assert sink.count() == before + 2, "a second replay sent again"
    assert command("deadletters", "cli-ghost", url=service.url).returncode == 1
