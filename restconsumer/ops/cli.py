"""The ``restconsumer`` command (SPEC §9): a client of the service's HTTP API, built on treq.

``restconsumer [--url URL] [--token T | --user U --password P] [--json] COMMAND ...``; tables
for people, ``--json`` for scripts (the API's JSON as it is). Exit codes: 0 success, 1 the
service refused or answered an error (any non-2xx, an invalid job, a preview record that
would fail), 2 the service could not be reached (or the command line is wrong).
"""

from __future__ import annotations

import argparse
import base64
import getpass
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, ConnectionRefusedError, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.web.client import RequestTransmissionFailed, ResponseFailed, ResponseNeverReceived

__all__ = ["DEFAULT_URL", "EXIT_FAILED", "EXIT_OK", "EXIT_UNREACHABLE", "Answer", "Client",
           "Unreachable", "build_parser", "envelope", "main", "run"]

#: Where the service is when neither ``--url`` nor ``RESTCONSUMER_URL`` says otherwise.
DEFAULT_URL = "http://127.0.0.1:9013"
#: Exit code of a command that did what it was asked.
EXIT_OK = 0
#: Exit code when the service answered with an error, or a job or message was refused.
EXIT_FAILED = 1
#: Exit code when the service could not be reached at all (or the command line is wrong).
EXIT_UNREACHABLE = 2
#: Seconds one API request may take (``set-offset`` waits for consumers to let go).
DEFAULT_TIMEOUT = 120.0

_NO_BODY = object()


class Unreachable(Exception):
    """The service could not be reached: connection refused, unknown host, no answer in time."""


class UsageError(Exception):
    """The command's input is unusable (a file that is not JSON, a message that is not JSON)."""


@dataclass
class Answer:
    """One API answer: status code, the body parsed as JSON (None if it is not JSON) and its text."""

    status: int
    body: Any
    text: str

    @property
    def ok(self) -> bool:
        """Whether the status is 2xx."""
        return 200 <= self.status < 300

    @property
    def error(self) -> str:
        """The API's ``error``, or the bare status when the body has none."""
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), str):
            return self.body["error"]
        return f"HTTP {self.status}"

    @property
    def details(self) -> list[Any]:
        """The API's ``details``; the start of a body that is not the API's JSON."""
        if isinstance(self.body, dict) and "error" in self.body:
            details = self.body.get("details")
            return details if isinstance(details, list) else [] if details is None else [details]
        text = self.text.strip()
        return [text[:300]] if text else []


class Client:
    """Sends API requests through ``http``: the treq module, or a ``treq.testing.StubTreq``."""

    def __init__(self, url: str, *, http: Any, authorization: str | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self.http = http
        self.authorization = authorization
        self.timeout = timeout

    async def call(self, method: str, path: str, body: Any = _NO_BODY,
                   params: Mapping[str, str] | None = None) -> Answer:
        """Send one request; its answer, whatever the status. Raises Unreachable."""
        headers = {"Accept": ["application/json"], "User-Agent": ["restconsumer-cli"]}
        if self.authorization:
            headers["Authorization"] = [self.authorization]
        kwargs: dict[str, Any] = {"headers": headers}
        if body is not _NO_BODY:
            kwargs["json"] = body
        if params:
            kwargs["params"] = dict(params)
        if self.timeout:
            kwargs["timeout"] = self.timeout
        try:
            response = await self.http.request(method, self.url + path, **kwargs)
            data = await self.http.content(response)
        except ConnectionRefusedError as e:
            raise Unreachable(f"cannot connect to {self.url}: connection refused "
                              "(is the service running? see --url or RESTCONSUMER_URL)") from e
        except DNSLookupError as e:
            raise Unreachable(f"cannot connect to {self.url}: unknown host") from e
        except (CancelledError, ConnectTimeout) as e:
            raise Unreachable(f"no answer from {self.url} within {self.timeout:g} s") from e
        except ConnectError as e:
            raise Unreachable(f"cannot connect to {self.url}: {e}") from e
        except (ResponseNeverReceived, RequestTransmissionFailed, ResponseFailed) as e:
            reasons = getattr(e, "reasons", [])
            if any(r.check(CancelledError) for r in reasons):
                raise Unreachable(f"no answer from {self.url} within {self.timeout:g} s") from e
            why = "; ".join(r.getErrorMessage() for r in reasons) or type(e).__name__
            raise Unreachable(f"the connection to {self.url} failed: {why}") from e
        text = data.decode("utf-8", "replace")
        try:
            parsed = json.loads(text) if text.strip() else None
        except ValueError:
            parsed = None
        return Answer(response.code, parsed, text)


# -- output ------------------------------------------------------------------------------


@dataclass
class Context:
    """What a command works with: the client, its arguments and the two output streams."""

    client: Client
    args: argparse.Namespace
    out: TextIO
    err: TextIO
    as_json: bool = field(default=False)

    def say(self, text: str = "") -> None:
        """A line on standard output."""
        print(text, file=self.out)

    def warn(self, text: str) -> None:
        """A line on standard error."""
        print(text, file=self.err)

    def emit(self, body: Any) -> None:
        """The API's JSON on standard output, for scripts."""
        self.say(json.dumps(body, ensure_ascii=False))

    def fail(self, answer: Answer, job_id: str | None = None) -> int:
        """Print an error answer on standard error; EXIT_FAILED."""
        if self.as_json and answer.body is not None:
            self.warn(json.dumps(answer.body, ensure_ascii=False))
        elif job_id is not None and answer.status == 400 and _problems(answer):
            for line in _problems(answer):
                self.warn(f"{job_id}: {line}")
        else:
            self.warn(f"error: {answer.error} (HTTP {answer.status})")
            for detail in answer.details:
                self.warn(f"  {_detail(detail)}")
        return EXIT_FAILED


def _detail(detail: Any) -> str:
    if isinstance(detail, dict) and "field" in detail and "reason" in detail:
        return f"{detail['field']}: {detail['reason']}"
    if isinstance(detail, str):
        return detail
    return json.dumps(detail, ensure_ascii=False)


def _problems(answer: Answer) -> list[str]:
    """``field: reason`` of each problem of a 400 invalid-job answer."""
    return [_detail(d) for d in answer.details]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return ",".join(str(v) for v in value)
    return json.dumps(value, ensure_ascii=False)


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Rows as lines of left-aligned columns under upper-case headers."""
    cells = [[h.upper() for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]


def _flat(value: Any) -> str:
    """A status field on one line: ``k=v k=v`` for objects, ``-`` for nothing."""
    if isinstance(value, dict):
        if not value:
            return "-"
        return " ".join(f"{k}={_flat(v) if isinstance(v, dict | list) else _cell(v)}"
                        for k, v in value.items())
    if isinstance(value, list):
        return "[" + ", ".join(_flat(v) for v in value) + "]" if value else "-"
    return _cell(value)


def describe(body: Mapping[str, Any]) -> list[str]:
    """An object as aligned ``key  value`` lines; a list of objects gets one line per item."""
    width = max((len(k) for k in body), default=0)
    lines = []
    for key, value in body.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines.append(f"{key.ljust(width)}  {_flat(value[0])}")
            lines += [f"{''.ljust(width)}  {_flat(v)}" for v in value[1:]]
        else:
            lines.append(f"{key.ljust(width)}  {_flat(value)}")
    return lines


def _time(value: Any) -> Any:
    """A timestamp in milliseconds as ISO 8601 UTC; anything else as it is."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 1e11:
        moment = datetime.fromtimestamp(value / 1000, UTC)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return value


def _data(value: Any, width: int) -> str:
    """A dead letter's key or value: text shortened, ``{"base64": …}`` marked as bytes."""
    if isinstance(value, dict) and isinstance(value.get("base64"), str):
        return _short("base64:" + value["base64"], width)
    if value is None:
        return "-"
    return _short(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False), width)


# -- input -------------------------------------------------------------------------------


def _job_id(job: Mapping[str, Any]) -> str | None:
    """The job's ``id`` (keys are read case-insensitively, as the API does)."""
    for key, value in job.items():
        if key.lower() == "id" and isinstance(value, str) and value:
            return value
    return None


def job_files(target: Path) -> list[Path]:
    """The ``*.json`` files of a folder (sorted), or the file itself."""
    if target.is_dir():
        return sorted(p for p in target.glob("*.json") if p.is_file())
    if target.is_file():
        return [target]
    raise UsageError(f"no such file or folder: {target}")


def read_jobs(path: Path) -> list[Any]:
    """The jobs of one file: a job, or a list of jobs."""
    try:
        content = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"{path}: not a JSON file: {e}") from e
    if isinstance(content, dict):
        return [content]
    if isinstance(content, list):
        return content
    raise UsageError(f"{path}: holds neither a job (an object) nor a list of jobs")


def envelope(message: Any) -> dict[str, Any]:
    """A preview message envelope (SPEC §9): an object with ``value`` or ``base64`` as it is,
    anything else wrapped as ``{"value": …}``."""
    if isinstance(message, dict) and ("value" in message or "base64" in message):
        return message
    return {"value": message}


def read_message(spec: str, stdin: Any = None) -> dict[str, Any]:
    """One ``--message``: inline JSON, or ``@file`` (``@-``: standard input) whose bytes are the
    message: JSON as JSON, anything else (an Avro container, text) sent as ``{"base64": …}``."""
    if spec.startswith("@"):
        name = spec[1:]
        try:
            data = (stdin or sys.stdin.buffer).read() if name == "-" else Path(name).read_bytes()
        except OSError as e:
            raise UsageError(f"--message {spec}: {e.strerror or e}") from e
        try:
            return envelope(json.loads(data.decode("utf-8")))
        except (UnicodeDecodeError, ValueError):
            return {"base64": base64.b64encode(data).decode("ascii")}
    try:
        return envelope(json.loads(spec))
    except ValueError as e:
        raise UsageError(f"--message is not JSON ({e}): {spec[:80]} "
                         "(use @FILE for a file's bytes)") from e


def _path(*parts: str) -> str:
    return "/" + "/".join(quote(p, safe="") for p in parts)


# -- commands ----------------------------------------------------------------------------


async def cmd_apply(ctx: Context) -> int:
    """Create or update every job of a file or folder; GET first, then POST, then compare hashes."""
    problems = 0
    results: list[dict[str, Any]] = []
    jobs: list[tuple[str, str, Any]] = []  # (label, file, definition)
    files = job_files(Path(ctx.args.file))
    if not files:
        raise UsageError(f"no *.json files in {ctx.args.file}")
    for path in files:
        try:
            content = read_jobs(path)
        except UsageError as e:
            problems += 1
            ctx.warn(str(e))
            results.append({"file": str(path), "result": "invalid", "error": str(e)})
            continue
        for index, job in enumerate(content):
            label = path.name if len(content) == 1 else f"{path.name}[{index}]"
            jobs.append((label, str(path), job))

    seen: dict[str, list[str]] = {}
    for _label, file, job in jobs:
        job_id = _job_id(job) if isinstance(job, dict) else None
        if job_id is not None:
            seen.setdefault(job_id, []).append(file)

    for label, file, job in jobs:
        job_id = _job_id(job) if isinstance(job, dict) else None
        if not isinstance(job, dict) or job_id is None:
            problems += 1
            reason = "is required" if isinstance(job, dict) else "a job must be a JSON object"
            ctx.warn(f"{label}: id: {reason}")
            results.append({"file": file, "result": "invalid",
                            "details": [{"field": "id", "reason": reason}]})
            continue
        if len(seen[job_id]) > 1:
            problems += 1
            reason = f"defined more than once ({', '.join(seen[job_id])}); none of them applied"
            ctx.warn(f"{job_id}: id: {reason}")
            results.append({"id": job_id, "file": file, "result": "invalid",
                            "details": [{"field": "id", "reason": reason}]})
            continue
        before = await ctx.client.call("GET", _path("job", job_id))
        previous = before.body.get("hash") if before.ok and isinstance(before.body, dict) else None
        answer = await ctx.client.call("POST", _path("job", job_id), job)
        if not answer.ok:
            problems += 1
            results.append({"id": job_id, "file": file, "result": "invalid" if answer.status == 400
                            else "error", "status": answer.status, "error": answer.error,
                            "details": answer.details})
            if answer.status == 400:
                for line in _problems(answer) or [f"{answer.error}"]:
                    ctx.warn(f"{job_id}: {line}")
            else:
                reasons = ", ".join(_detail(d) for d in answer.details)
                ctx.warn(f"{job_id}: error: {answer.error} (HTTP {answer.status})"
                         + (f": {reasons}" if reasons else ""))
            continue
        stored = answer.body if isinstance(answer.body, dict) else {}
        if answer.status == 201:
            result = "created"
        elif previous is not None and stored.get("hash") == previous:
            result = "unchanged"
        else:
            result = "updated"
        results.append({"id": job_id, "file": file, "result": result, "job": answer.body})
        if not ctx.as_json:
            ctx.say(f"{job_id}: {result}")
    if ctx.as_json:
        ctx.emit(results)
    return EXIT_FAILED if problems else EXIT_OK


async def _states(ctx: Context) -> dict[str, str]:
    """Each job's state from ``GET /jobs/status`` where the service has it; empty otherwise."""
    try:
        answer = await ctx.client.call("GET", "/jobs/status")
    except Unreachable:
        return {}
    if not answer.ok:
        return {}
    body = answer.body
    if isinstance(body, dict):
        body = body.get("jobs", list(body.values()))
    if isinstance(body, dict):
        body = list(body.values())
    states = {}
    for item in body if isinstance(body, list) else []:
        if isinstance(item, dict) and isinstance(item.get("id"), str) and isinstance(item.get("state"), str):
            states[item["id"]] = item["state"]
    return states


async def cmd_list(ctx: Context) -> int:
    """Every job, or those of one owner."""
    path = _path("jobs", ctx.args.owner) if ctx.args.owner else "/jobs"
    answer = await ctx.client.call("GET", path)
    if not answer.ok or not isinstance(answer.body, list):
        return ctx.fail(answer)
    if ctx.as_json:
        ctx.emit(answer.body)
        return EXIT_OK
    if not answer.body:
        ctx.say("no jobs")
        return EXIT_OK
    jobs = [j for j in answer.body if isinstance(j, dict)]
    states = await _states(ctx)
    headers = ["id", "owner", *(["state"] if states else []), "topics", "type", "url"]
    rows = []
    for job in sorted(jobs, key=lambda j: str(j.get("id"))):
        topics = job.get("topic")
        job_id = job.get("id")
        state = states.get(job_id) if isinstance(job_id, str) else None
        rows.append([job_id, job.get("owner"), *([state] if states else []),
                     topics if isinstance(topics, list) else [topics], job.get("type"), job.get("url")])
    for line in table(headers, rows):
        ctx.say(line)
    return EXIT_OK


async def cmd_get(ctx: Context) -> int:
    """One job, secrets shown as ``***``."""
    answer = await ctx.client.call("GET", _path("job", ctx.args.id))
    if not answer.ok:
        return ctx.fail(answer)
    if ctx.as_json:
        ctx.emit(answer.body)
    else:
        ctx.say(json.dumps(answer.body, indent=2, ensure_ascii=False))
    return EXIT_OK


async def cmd_delete(ctx: Context) -> int:
    """Stop and remove a job."""
    answer = await ctx.client.call("DELETE", _path("job", ctx.args.id))
    if not answer.ok:
        return ctx.fail(answer)
    if ctx.as_json:
        ctx.emit(answer.body)
    else:
        ctx.say(f"{ctx.args.id}: deleted")
    return EXIT_OK


async def cmd_status(ctx: Context) -> int:
    """State, counters, lag, rate, circuit and last error of a job."""
    answer = await ctx.client.call("GET", _path("job", ctx.args.id, "status"))
    if not answer.ok:
        return ctx.fail(answer)
    if ctx.as_json:
        ctx.emit(answer.body)
    else:
        for line in describe(answer.body if isinstance(answer.body, dict) else {"status": answer.body}):
            ctx.say(line)
    return EXIT_OK


async def _run_state(ctx: Context, action: str) -> int:
    answer = await ctx.client.call("POST", _path("job", ctx.args.id, action))
    if not answer.ok:
        return ctx.fail(answer)
    if ctx.as_json:
        ctx.emit(answer.body)
    else:
        state = answer.body.get("state") if isinstance(answer.body, dict) else None
        ctx.say(f"{ctx.args.id}: {state or action}")
    return EXIT_OK


async def cmd_start(ctx: Context) -> int:
    """Run a stopped job again."""
    return await _run_state(ctx, "start")


async def cmd_stop(ctx: Context) -> int:
    """Stop a job on every instance."""
    return await _run_state(ctx, "stop")


async def cmd_set_offset(ctx: Context) -> int:
    """Move a job's committed offsets: a number, ``beginning`` or ``end``."""
    params = {}
    if ctx.args.topic is not None:
        params["topic"] = ctx.args.topic
    if ctx.args.partition is not None:
        params["partition"] = str(ctx.args.partition)
    answer = await ctx.client.call("POST", _path("job", ctx.args.id, "set_offset", ctx.args.offset),
                                   params=params)
    if not answer.ok:
        return ctx.fail(answer)
    if ctx.as_json:
        ctx.emit(answer.body)
        return EXIT_OK
    offsets = answer.body.get("offsets") if isinstance(answer.body, dict) else None
    rows = [[o.get("topic"), o.get("partition"), o.get("offset")]
            for o in offsets or [] if isinstance(o, dict)]
    for line in table(["topic", "partition", "offset"], rows):
        ctx.say(line)
    return EXIT_OK


def _preview_target(target: str) -> tuple[str | None, dict[str, Any] | None]:
    """(job id, None) for a stored job, (None, definition) for a job file."""
    path = Path(target)
    if path.is_file():
        jobs = read_jobs(path)
        if len(jobs) != 1 or not isinstance(jobs[0], dict):
            raise UsageError(f"{path}: preview takes one job, the file holds {len(jobs)}")
        return None, jobs[0]
    if target.endswith(".json") or os.sep in target:
        raise UsageError(f"no such file: {target}")
    return target, None


def _show_request(ctx: Context, head: str, request: Mapping[str, Any]) -> None:
    ctx.say(f"{head}: {request.get('method')} {request.get('url')}")
    headers = request.get("headers") or {}
    pairs = headers.items() if isinstance(headers, dict) else headers
    for pair in pairs:
        if isinstance(pair, list | tuple) and len(pair) == 2:
            ctx.say(f"    {pair[0]}: {pair[1]}")
    body = request.get("body")
    if body is not None and body != "":
        text = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
        for line in text.splitlines() or [""]:
            ctx.say(f"    {line}")


async def cmd_preview(ctx: Context) -> int:
    """Dry run: the requests a job would send for the given messages; nothing is sent."""
    job_id, definition = _preview_target(ctx.args.target)
    messages = [read_message(m) for m in ctx.args.message]
    if definition is not None:
        label = _job_id(definition) or ctx.args.target
        answer = await ctx.client.call("POST", "/preview", {"job": definition, "messages": messages})
    else:
        label = job_id or ctx.args.target
        answer = await ctx.client.call("POST", _path("job", label, "preview"), {"messages": messages})
    if not answer.ok:
        return ctx.fail(answer, job_id=label)
    results = answer.body.get("results") if isinstance(answer.body, dict) else None
    results = [r for r in results or [] if isinstance(r, dict)]
    failed = [r for r in results if "error" in r]
    if ctx.as_json:
        ctx.emit(answer.body)
    else:
        for result in results:
            head = f"message {result.get('message')} record {result.get('record')}"
            if "error" in result:
                ctx.say(f"{head}: error: {result['error']}")
            elif result.get("filtered"):
                ctx.say(f"{head}: filtered")
            elif isinstance(result.get("request"), dict):
                _show_request(ctx, head, result["request"])
            else:
                ctx.say(f"{head}: {json.dumps(result, ensure_ascii=False)}")
        if not results:
            ctx.say("no records")
        ctx.say(f"{len(results) - len(failed)} records ok, {len(failed)} with errors")
    return EXIT_FAILED if failed else EXIT_OK


async def cmd_deadletters(ctx: Context) -> int:
    """A job's dead letters, newest last; or ``--replay`` them through the job."""
    if ctx.args.replay:
        answer = await ctx.client.call("POST", _path("job", ctx.args.id, "deadletters", "replay"))
        if not answer.ok:
            return ctx.fail(answer)
        if ctx.as_json:
            ctx.emit(answer.body)
            return EXIT_OK
        replay = answer.body.get("replay") if isinstance(answer.body, dict) else None
        partitions = replay.get("partitions") if isinstance(replay, dict) else None
        if not partitions:
            ctx.say(f"{ctx.args.id}: replay started; no dead letters to replay")
            return EXIT_OK
        ctx.say(f"{ctx.args.id}: replay started")
        rows = []
        for partition, span in sorted(partitions.items(), key=lambda kv: int(kv[0])
                                      if str(kv[0]).isdigit() else 0):
            low, high = [*span, None, None][:2] if isinstance(span, list) else (span, None)
            rows.append([partition, low, high])
        for line in table(["partition", "from", "to"], rows):
            ctx.say(line)
        return EXIT_OK
    params = {"limit": str(ctx.args.limit)} if ctx.args.limit is not None else None
    answer = await ctx.client.call("GET", _path("job", ctx.args.id, "deadletters"), params=params)
    if not answer.ok:
        return ctx.fail(answer)
    if ctx.as_json:
        ctx.emit(answer.body)
        return EXIT_OK
    letters = answer.body.get("deadletters") if isinstance(answer.body, dict) else None
    letters = [d for d in letters or [] if isinstance(d, dict)]
    if not letters:
        ctx.say(f"{ctx.args.id}: no dead letters")
        return EXIT_OK
    rows = []
    for letter in letters:
        source = letter.get("source") if isinstance(letter.get("source"), dict) else {}
        rows.append([letter.get("partition"), letter.get("offset"), _time(letter.get("timestamp")),
                     f"{source.get('topic')}[{source.get('partition')}]@{source.get('offset')}",
                     letter.get("status"), letter.get("attempts"),
                     _short(_cell(letter.get("reason")), 60),
                     _data(letter.get("key"), 24), _data(letter.get("value"), 40)])
    for line in table(["partition", "offset", "time", "source", "status", "attempts", "reason",
                       "key", "value"], rows):
        ctx.say(line)
    return EXIT_OK


# -- command line ------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """Connection and output options, accepted before and after the command."""
    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    group = parser.add_argument_group("connection and output")
    group.add_argument("--url", default=default(None),
                       help=f"the service's API (env RESTCONSUMER_URL; default {DEFAULT_URL})")
    group.add_argument("--token", default=default(None),
                       help="API token, sent as Bearer (env RESTCONSUMER_API_TOKEN, which keeps it "
                            "out of the process list)")
    group.add_argument("--user", default=default(None),
                       help="user for Basic auth (env RESTCONSUMER_API_USER)")
    group.add_argument("--password", default=default(None),
                       help="password for Basic auth (env RESTCONSUMER_API_PASSWORD; asked for "
                            "when a terminal is attached)")
    group.add_argument("--timeout", type=float, default=default(DEFAULT_TIMEOUT), metavar="SECONDS",
                       help=f"how long one API request may take (default {DEFAULT_TIMEOUT:g})")
    group.add_argument("--json", action="store_true", default=default(False),
                       help="print the API's JSON as it is, for scripts")


Command = Callable[[Context], Awaitable[int]]


def build_parser() -> argparse.ArgumentParser:
    """The ``restconsumer`` argument parser, every command with its own ``--help``."""
    parser = argparse.ArgumentParser(
        prog="restconsumer",
        description="Manage restconsumer jobs over the service's HTTP API.",
        epilog="Exit codes: 0 success; 1 the service answered an error, a job or message was "
               "refused; 2 the service could not be reached, or a wrong command line.")
    _common(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Command, help_text: str) -> argparse.ArgumentParser:
        short = help_text.split(". ")[0].split(" (")[0].split(";")[0].rstrip(".")
        sub = commands.add_parser(name, help=short, description=help_text)
        sub.set_defaults(handler=handler)
        _common(sub, defaults=False)
        return sub

    apply = command("apply", cmd_apply,
                    "Create or update the jobs of a file or folder (*.json, each one job or a list "
                    "of jobs); prints created/updated/unchanged per job, or every problem as "
                    "'<job id>: <field>: <reason>'. A job is unchanged when its hash is the same "
                    "before and after (the job is read first, then posted).")
    apply.add_argument("-f", "--file", required=True, metavar="FILE|DIR", help="a job file or folder")

    listing = command("list", cmd_list, "List the jobs; with their state where the service tells it.")
    listing.add_argument("--owner", metavar="O", help="only the jobs of this owner")

    for name, handler, text in (("get", cmd_get, "Show a job (secrets as ***)."),
                                ("delete", cmd_delete, "Stop and remove a job."),
                                ("status", cmd_status, "Show a job's state, counters, lag and errors."),
                                ("start", cmd_start, "Run a stopped job again."),
                                ("stop", cmd_stop, "Stop a job on every instance.")):
        command(name, handler, text).add_argument("id", metavar="ID", help="the job's id")

    offset = command("set-offset", cmd_set_offset,
                     "Move a job's committed offsets (every partition, or one with --topic/--partition).")
    offset.add_argument("id", metavar="ID", help="the job's id")
    offset.add_argument("offset", metavar="OFFSET", help="a number, 'beginning' or 'end'")
    offset.add_argument("--topic", metavar="T", help="only this topic")
    offset.add_argument("--partition", type=int, metavar="P", help="only this partition")

    preview = command("preview", cmd_preview,
                      "Dry run: the requests a job would send for the given messages; nothing is "
                      "sent, stored or produced. Exits 1 when a record would fail.")
    preview.add_argument("target", metavar="FILE|ID", help="a job file, or the id of a stored job")
    preview.add_argument("--message", "-m", action="append", required=True, metavar="JSON|@file",
                         help="a message (repeatable): JSON, wrapped as {\"value\": …} unless it is an "
                              "envelope with \"value\" or \"base64\" (and key, topic, partition, "
                              "offset, timestamp, headers); @file reads a file (@- standard input) "
                              "whose bytes, when not JSON, are sent as base64 (an Avro container, "
                              "text)")

    letters = command("deadletters", cmd_deadletters,
                      "List a job's dead letters or replay them through the job; newest last.")
    letters.add_argument("id", metavar="ID", help="the job's id")
    letters.add_argument("--limit", type=int, metavar="N", help="at most N (the service's default: 100)")
    letters.add_argument("--replay", action="store_true",
                         help="send every dead letter not yet replayed through the job again")
    return parser


def authorization(args: argparse.Namespace, env: Mapping[str, str],
                  ask: Callable[[str], str] | None = None) -> str | None:
    """The Authorization header: ``--user`` (Basic) or ``--token`` (Bearer) as given, else the
    environment's token, else its user; None without any."""
    user = args.user
    token = args.token if user is None else None
    if user is None and token is None:
        token = env.get("RESTCONSUMER_API_TOKEN") or None
        user = None if token else env.get("RESTCONSUMER_API_USER") or None
    if token:
        return f"Bearer {token}"
    if user:
        password = args.password if args.password is not None else env.get("RESTCONSUMER_API_PASSWORD")
        if password is None:
            if ask is None:
                raise UsageError("--user needs --password (or RESTCONSUMER_API_PASSWORD)")
            password = ask(f"password for {user}: ")
        credentials = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        return f"Basic {credentials}"
    return None


def _ask_password(prompt: str) -> str:
    """Ask for the password on the terminal; a usage error without one."""
    try:
        interactive = sys.stdin is not None and sys.stdin.isatty()
    except (OSError, ValueError):
        interactive = False
    if not interactive:
        raise UsageError("--user needs --password (or RESTCONSUMER_API_PASSWORD)")
    return getpass.getpass(prompt)


async def run(argv: Sequence[str], http: Any, *, out: TextIO | None = None, err: TextIO | None = None,
              env: Mapping[str, str] | None = None, timeout: float | None = -1.0) -> int:
    """Run one command line through ``http`` (treq, or a StubTreq); the exit code.

    ``timeout=-1`` takes ``--timeout``; None sends without one (a StubTreq needs no clock).
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    env = os.environ if env is None else env
    args = build_parser().parse_args(list(argv))
    try:
        header = authorization(args, env, _ask_password)
        client = Client(args.url or env.get("RESTCONSUMER_URL") or DEFAULT_URL, http=http,
                        authorization=header, timeout=args.timeout if timeout == -1.0 else timeout)
        ctx = Context(client, args, out, err, as_json=args.json)
        return await args.handler(ctx)
    except Unreachable as e:
        print(f"error: {e}", file=err)
        return EXIT_UNREACHABLE
    except UsageError as e:
        print(f"error: {e}", file=err)
        return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: parse, run the command on the reactor, exit with its code."""
    import treq
    from twisted.internet.task import react

    arguments = list(sys.argv[1:] if argv is None else argv)
    build_parser().parse_args(arguments)  # usage errors and --help before the reactor starts

    def start(_reactor: Any) -> Deferred[None]:
        async def go() -> None:
            code = await run(arguments, treq)
            if code:
                raise SystemExit(code)

        return Deferred.fromCoroutine(go())

    react(start)


if __name__ == "__main__":
    main()
