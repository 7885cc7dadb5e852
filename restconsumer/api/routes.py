"""The HTTP API (SPEC §7): jobs read and changed through the store, JSON in and out."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from restconsumer.api.auth import Authenticator, Principal
from restconsumer.api.preview import BadEnvelope, envelopes, preview, schema_ids
from restconsumer.base.urls import origin
from restconsumer.control.offsets import OffsetError, OffsetMover, OffsetRequest
from restconsumer.control.status import StatusReporter, job_status
from restconsumer.control.store import JobStore, StoreUnavailable
from restconsumer.control.supervisor import Supervisor
from restconsumer.delivery.deadletters import DeadLetterReader
from restconsumer.delivery.guard import refusal_of
from restconsumer.delivery.metrics import CONTENT_TYPE, Metrics
from restconsumer.delivery.registry import SchemaRegistry
from restconsumer.delivery.replay import ReplayRunning, Replays
from restconsumer.jobs.destinations import Destinations
from restconsumer.jobs.model import InvalidJob, Policy, load, redact, validate
from restconsumer.jobs.secrets import UnresolvedSecrets

__all__ = ["API", "MAX_BODY", "MAX_PREVIEW_BODY", "APIError"]

#: The largest request body the API reads, in bytes.
MAX_BODY = 1024 * 1024
#: The largest body of a dry run (sample messages may be Avro containers).
MAX_PREVIEW_BODY = 4 * 1024 * 1024
#: How many dead letters one listing may ask for.
MAX_DEAD_LETTERS = 10_000
#: How often a create or update is tried again when the job changed under it.
WRITE_ATTEMPTS = 5
#: The OpenAPI 3 description, served as it is.
OPENAPI = (Path(__file__).parent / "openapi.json").read_bytes()
#: The dashboard's folder (SPEC §10); only the files named in the /ui routes are served.
UI = Path(__file__).parent / "ui"
UI_POLICY = (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
             b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class APIError(Exception):
    """An answer other than success: status code, message and details."""

    def __init__(self, status: int, error: str, details: list[Any] | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.details = details or []


def _json(request: IRequest, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(body, ensure_ascii=False).encode("utf-8") + b"\n"


class API:
    """The Klein application; ``API(...).app.resource()`` is what the site serves."""

    app = Klein()
    log = Logger()

    def __init__(self, store: JobStore, auth: Authenticator,
                 kafka_check: Callable[[], Deferred[dict[str, Any]]], *,
                 supervisor: Supervisor, reporter: StatusReporter, mover: OffsetMover,
                 clock: IReactorTime, allow_hosts: frozenset[str] | None = None,
                 policy: Policy | None = None,
                 max_body: int = MAX_BODY,
                 demo_sink: Callable[[str, str, bytes], None] | None = None,
                 metrics: Metrics | None = None, reader: DeadLetterReader | None = None,
                 replays: Replays | None = None, registry: SchemaRegistry | None = None) -> None:
        self.store = store
        self.supervisor = supervisor
        self.reporter = reporter
        self.mover = mover
        self.clock = clock
        self.demo_sink = demo_sink
        self.auth = auth
        self.kafka_check = kafka_check
        self.allow_hosts = allow_hosts
        #: What a job must also respect: allowed hosts, owners' topic limits, secret references.
        self.policy = policy if policy is not None else Policy(allow_hosts=allow_hosts)
        self.max_body = max_body
        self.metrics = metrics
        self.reader = reader
        self.replays = replays
        #: The Schema Registry the dry run fetches wire-format schemas from, if configured.
        self.registry = registry
        #: The process is draining (SIGTERM): ``/health/ready`` answers 503.
        self.draining = False

    # -- helpers -----------------------------------------------------------------------

    def _principal(self, request: IRequest, limit: int | None = None) -> Principal:
        limit = limit or self.max_body
        length = request.getHeader(b"Content-Length")
        if getattr(request, "too_large", False) or (
                length is not None and length.isdigit() and int(length) > limit):
            # Refused before authenticating: an unauthenticated caller cannot make us read more.
            raise APIError(413, "request body too large", [f"at most {limit} bytes"])
        principal = self.auth.authenticate(request.getHeader(b"Authorization"))
        if principal is None:
            request.setHeader(b"WWW-Authenticate", self.auth.challenge.encode())
            raise APIError(401, "authentication required",
                           ["send Authorization: Bearer <token> (or Basic user:password)"])
        return principal

    def _body(self, request: IRequest, limit: int | None = None) -> Any:
        limit = limit or self.max_body
        if getattr(request, "too_large", False):
            raise APIError(413, "request body too large", [f"at most {limit} bytes"])
        length = request.getHeader(b"Content-Length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise APIError(413, "request body too large", [f"at most {limit} bytes"])
        data = request.content.read(limit + 1)
        if len(data) > limit:
            raise APIError(413, "request body too large", [f"at most {limit} bytes"])
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise APIError(400, "malformed JSON", [str(e) or type(e).__name__]) from e

    async def _visible_job(self, principal: Principal, job_id: str) -> dict[str, Any]:
        stored = await self.store.get(job_id)
        if stored is None or not principal.may_see(str(stored.get("owner"))):
            raise APIError(404, "no such job", [job_id])
        return stored

    @staticmethod
    def _public(stored: dict[str, Any]) -> dict[str, Any]:
        # Stored jobs were validated on the way in; showing one needs no new compile.
        return redact(stored)

    # -- errors ------------------------------------------------------------------------

    @app.handle_errors(APIError)
    def _api_error(self, request: IRequest, failure: Failure) -> bytes:
        e: APIError = failure.value
        return _json(request, e.status, {"error": e.error, "details": e.details})

    @app.handle_errors(OffsetError)
    def _offset_error(self, request: IRequest, failure: Failure) -> bytes:
        e: OffsetError = failure.value
        error = {400: "bad set_offset", 409: "conflict", 501: "set_offset not supported by this Kafka",
                 503: "offsets not moved"}.get(e.status, "error")
        return _json(request, e.status, {"error": error, "details": [str(e)]})

    @app.handle_errors(StoreUnavailable)
    def _store_error(self, request: IRequest, failure: Failure) -> bytes:
        self.log.warn("store unavailable: {reason}", reason=str(failure.value))
        request.setHeader(b"Retry-After", b"5")
        return _json(request, 503, {"error": "job store unavailable", "details": [str(failure.value)]})

    @app.handle_errors(NotFound)
    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        return _json(request, 404, {"error": "not found",
                                    "details": [request.path.decode("utf-8", "replace")]})

    @app.handle_errors(MethodNotAllowed)
    def _bad_method(self, request: IRequest, failure: Failure) -> bytes:
        allowed = sorted(failure.value.valid_methods or [])
        request.setHeader(b"Allow", ", ".join(allowed).encode())
        return _json(request, 405, {"error": "method not allowed", "details": allowed})

    @app.handle_errors(HTTPException)
    def _http_error(self, request: IRequest, failure: Failure) -> bytes:
        e: HTTPException = failure.value
        return _json(request, e.code or 500, {"error": e.name, "details": []})

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        self.log.failure("unexpected error in {method} {path}", failure,
                         method=request.method.decode(), path=request.path.decode("utf-8", "replace"))
        return _json(request, 500, {"error": "internal error", "details": []})

    # -- routes ------------------------------------------------------------------------

    @app.route("/health", methods=["GET"])
    async def health(self, request: IRequest) -> bytes:
        """Liveness and readiness: 200 when Redis and Kafka answer, 503 otherwise.

        Without credentials only up or down per part; the details (error texts, brokers)
        only for a caller the API authenticates.
        """

        async def redis() -> dict[str, Any]:
            try:
                await self.store.ping()
            except StoreUnavailable as e:
                return {"ok": False, "error": str(e)}
            return {"ok": True}

        redis_state, kafka_state = await gatherResults(
            [Deferred.fromCoroutine(redis()), self.kafka_check()]
        )
        ready = redis_state["ok"] and kafka_state["ok"]
        if self.auth.authenticate(request.getHeader(b"Authorization")) is None:
            redis_state, kafka_state = {"ok": redis_state["ok"]}, {"ok": kafka_state["ok"]}
        body = {"status": "ok" if ready else "unavailable", "redis": redis_state, "kafka": kafka_state}
        return _json(request, 200 if ready else 503, body)

    @app.route("/health/live", methods=["GET"])
    def live(self, request: IRequest) -> bytes:
        """Liveness: the process serves (whatever Redis and Kafka do); no auth."""
        return _json(request, 200, {"status": "ok"})

    @app.route("/health/ready", methods=["GET"])
    async def ready(self, request: IRequest) -> bytes:
        """Readiness: Redis and Kafka reachable (as ``/health``), and not draining; no auth."""
        if self.draining:
            # SIGTERM: a load balancer stops sending here while the jobs drain (SPEC §6).
            return _json(request, 503, {"status": "draining"})
        return await self.health(request)

    @app.route("/metrics", methods=["GET"])
    def metrics_text(self, request: IRequest) -> bytes:
        """Prometheus text format (the admin's credentials; ``--metrics`` serves it without)."""
        principal = self._principal(request)
        if not principal.is_admin:
            raise APIError(403, "forbidden", ["the metrics cover every job: the admin's credentials"])
        if self.metrics is None:
            raise APIError(503, "metrics not available", [])
        request.setHeader(b"Content-Type", CONTENT_TYPE.encode())
        return self.metrics.exposition()

    @app.route("/jobs/status", methods=["GET"])
    async def all_status(self, request: IRequest) -> bytes:
        """The status of every job the caller may see, in one answer."""
        principal = self._principal(request)
        answer = []
        for stored in await self.store.all():
            job_id = str(stored.get("id"))
            if not principal.may_see(str(stored.get("owner"))):
                continue
            record = await self.store.record(job_id)
            if record is None:
                continue
            answer.append(await self._status_of(job_id, record, stored))
        return _json(request, 200, answer)

    async def _status_of(self, job_id: str, record: Any, stored: dict[str, Any]) -> dict[str, Any]:
        body = await job_status(job_id, record, self.store, self.supervisor, self.reporter, self.clock)
        body.setdefault("owner", stored.get("owner"))
        if self.replays is not None and (replay := self.replays.progress(job_id)) is not None:
            body["replay"] = replay
        return body

    @app.route("/preview", methods=["POST"])
    async def preview_definition(self, request: IRequest) -> bytes:
        """The dry run of a job definition: ``{"job": …, "messages": […]}``; nothing sent or
        stored. An invalid job answers 400 as ``POST /job`` does."""
        principal = self._principal(request, MAX_PREVIEW_BODY)
        raw = self._body(request, MAX_PREVIEW_BODY)
        if not isinstance(raw, dict) or "job" not in raw:
            raise APIError(400, "invalid preview", [{"field": "job", "reason": "is required"}])
        definition = raw["job"]
        job_id = definition.get("id") if isinstance(definition, dict) else None
        try:
            job = validate(definition, job_id if isinstance(job_id, str) else None, policy=self.policy)
        except InvalidJob as e:
            raise APIError(400, "invalid job", [p.as_dict() for p in e.problems]) from e
        if not principal.may_see(job.owner):
            raise APIError(403, "forbidden", [f"this token may not preview jobs of {job.owner}"])
        return await self._preview(request, job, raw.get("messages"))

    @app.route("/job/<job_id>/preview", methods=["POST"])
    async def preview_stored(self, request: IRequest, job_id: str) -> bytes:
        """The dry run of a stored job: ``{"messages": […]}``."""
        principal = self._principal(request, MAX_PREVIEW_BODY)
        raw = self._body(request, MAX_PREVIEW_BODY)
        stored = await self._visible_job(principal, job_id)
        if not isinstance(raw, dict):
            raise APIError(400, "invalid preview", [{"field": "messages", "reason": "is required"}])
        return await self._preview(request, load(stored), raw.get("messages"))

    async def _preview(self, request: IRequest, job: Any, messages: Any) -> bytes:
        now_ms = int(self.clock.seconds() * 1000)
        try:
            incoming = envelopes(job, messages, now_ms)
        except BadEnvelope as e:
            raise APIError(400, "invalid messages",
                           [{"field": f, "reason": r} for f, r in e.problems]) from e
        unavailable: dict[int, str] = {}
        registry = self.registry
        if registry is not None:
            # The schemas first, on the reactor, as delivery fetches them.
            ids = sorted(schema_ids(incoming))
            fetched = await DeferredList([registry.fetch(i) for i in ids], consumeErrors=True)
            for ident, (_, result) in zip(ids, fetched, strict=True):
                if isinstance(result, Failure):
                    unavailable[ident] = result.getErrorMessage()
        results = preview(job, messages, now_ms, registry.cache if registry is not None else None,
                          unavailable)
        granted = self.policy.destinations.get(job.owner)
        if granted is not None:
            await self._say_refused(results, granted)
        return _json(request, 200, {"results": results})

    async def _say_refused(self, results: list[dict[str, Any]], granted: Destinations) -> None:
        """Mark the requests a limited owner's job could not send (SPEC §8): each record's
        ``refused`` says why, as delivery would dead-letter it; nothing is connected to."""
        said: dict[tuple[str, int | None], str | None] = {}
        for result in results:
            if "request" not in result:
                continue
            _, host, port = origin(result["request"]["url"])
            if (host, port) not in said:
                said[host, port] = await refusal_of(self.clock, host, port or 0, granted)
            if said[host, port] is not None:
                result["refused"] = said[host, port]

    @app.route("/job/<job_id>/deadletters", methods=["GET"])
    async def dead_letters(self, request: IRequest, job_id: str) -> bytes:
        """The job's newest dead letters (``?limit=N``, default 100), newest last."""
        principal = self._principal(request)
        stored = await self._visible_job(principal, job_id)
        values = request.args.get(b"limit")
        limit = 100
        if values:
            text = values[0].decode("utf-8", "replace")
            if not text.isdigit() or not 1 <= int(text) <= MAX_DEAD_LETTERS:
                raise APIError(400, "bad limit", [f"limit is a whole number from 1 to {MAX_DEAD_LETTERS}"])
            limit = int(text)
        if self.reader is None:
            raise APIError(503, "dead letters not available", [])
        job = load(stored)
        letters = await self.reader.latest(job.id, job.dead_letter_topic, limit)
        return _json(request, 200, {"deadletters": letters})

    @app.route("/job/<job_id>/deadletters/replay", methods=["POST"])
    async def replay(self, request: IRequest, job_id: str) -> bytes:
        """Send the job's dead letters not yet replayed through the job again: 202, or 409
        while a replay runs."""
        principal = self._principal(request)
        stored = await self._visible_job(principal, job_id)
        if self.replays is None:
            raise APIError(503, "replay not available", [])
        try:
            plan = await self.replays.start(stored)
        except ReplayRunning as e:
            raise APIError(409, "replay under way", [str(e)]) from e
        except (InvalidJob, UnresolvedSecrets) as e:
            raise APIError(409, "the job cannot run on this instance", [str(e)]) from e
        self.log.info("job {job_id}: replay of dead letters started: {plan}", job_id=job_id,
                      plan=", ".join(f"[{p}] {a}..{b}" for p, (a, b) in sorted(plan.items())))
        return _json(request, 202, {"replay": {"partitions": {str(p): [a, b] for p, (a, b) in plan.items()}}})

    @app.route("/embedded/echo/", branch=True,
               methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    def echo(self, request: IRequest) -> bytes:
        """``--embedded`` only: a demo endpoint for jobs to call; ``demo_sink`` counts what it
        got (restconsumer.ops.embedded logs a summary), answers 200."""
        if self.demo_sink is None:
            raise NotFound()
        body = request.content.read(self.max_body)
        self.demo_sink(request.method.decode(), request.uri.decode("utf-8", "replace"), body)
        return _json(request, 200, {"received": len(body)})

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        """The OpenAPI 3 description of this API; no auth."""
        request.setHeader(b"Content-Type", b"application/json")
        return OPENAPI

    @app.route("/ui", methods=["GET"])
    def ui_redirect(self, request: IRequest) -> bytes:
        """The dashboard lives at ``/ui/``."""
        request.setResponseCode(301)
        request.setHeader(b"Location", b"ui/")
        return b""

    @staticmethod
    def _ui_file(request: IRequest, name: str, content_type: bytes) -> bytes:
        # No auth for the dashboard's own files: its data comes from the API, with the token.
        request.setHeader(b"Content-Type", content_type)
        request.setHeader(b"Content-Security-Policy", UI_POLICY)
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Cache-Control", b"no-cache")
        return (UI / name).read_bytes()

    @app.route("/ui/", methods=["GET"])
    def ui_page(self, request: IRequest) -> bytes:
        """The dashboard's page."""
        return self._ui_file(request, "index.html", b"text/html; charset=utf-8")

    @app.route("/ui/app.js", methods=["GET"])
    def ui_script(self, request: IRequest) -> bytes:
        """The dashboard's script."""
        return self._ui_file(request, "app.js", b"text/javascript; charset=utf-8")

    @app.route("/ui/app.css", methods=["GET"])
    def ui_style(self, request: IRequest) -> bytes:
        """The dashboard's style sheet."""
        return self._ui_file(request, "app.css", b"text/css; charset=utf-8")

    @app.route("/jobs", methods=["GET"])
    async def list_jobs(self, request: IRequest) -> bytes:
        """Every job the caller may see."""
        principal = self._principal(request)
        jobs = [j for j in await self.store.all() if principal.may_see(str(j.get("owner")))]
        return _json(request, 200, [self._public(j) for j in jobs])

    @app.route("/jobs/<owner>", methods=["GET"])
    async def list_owner_jobs(self, request: IRequest, owner: str) -> bytes:
        """Every job of one owner."""
        principal = self._principal(request)
        if not principal.may_see(owner):
            raise APIError(403, "forbidden", [f"this token may not see the jobs of {owner}"])
        jobs = [j for j in await self.store.all() if j.get("owner") == owner]
        return _json(request, 200, [self._public(j) for j in jobs])

    @app.route("/job/<job_id>", methods=["GET"])
    async def get_job(self, request: IRequest, job_id: str) -> bytes:
        """One job, secrets shown as ``***``."""
        principal = self._principal(request)
        return _json(request, 200, self._public(await self._visible_job(principal, job_id)))

    @app.route("/job/<job_id>", methods=["POST"])
    async def put_job(self, request: IRequest, job_id: str) -> bytes:
        """Create or replace a job: 201 created, 200 updated, 400 with every problem.

        Atomic (SPEC §8): a job is created only if no job has its id, and replaced only if
        it is still the one read; otherwise it is read again and the request decided anew,
        so two creations at once give one 201 and one 200 (or 403 for another owner).
        """
        principal = self._principal(request)
        raw = self._body(request)
        for _ in range(WRITE_ATTEMPTS):
            previous, version = await self.store.read(job_id)
            if previous is not None and not principal.may_see(str(previous.get("owner"))):
                # Another owner's job is not shown to exist, and cannot be taken over.
                raise APIError(403, "forbidden", [f"job {job_id} belongs to another owner"])
            try:
                job = validate(raw, job_id, previous=previous, policy=self.policy)
            except InvalidJob as e:
                raise APIError(400, "invalid job", [p.as_dict() for p in e.problems]) from e
            if not principal.may_see(job.owner):
                raise APIError(403, "forbidden", [f"this token may not create jobs for {job.owner}"])
            if previous is None:
                done = await self.store.create(job)
            else:
                done = await self.store.replace(job, version or "")
            if done:
                self.log.info("job {job_id} {what} (hash {hash})", job_id=job.id,
                              what="created" if previous is None else "updated", hash=job.hash[:12])
                return _json(request, 201 if previous is None else 200, job.public())
            self.log.info("job {job_id} was {what} meanwhile; the request is decided again",
                          job_id=job_id, what="created" if previous is None else "changed")
        raise APIError(409, "conflict", [f"job {job_id} kept changing while it was written; "
                                         f"send it again"])

    @app.route("/job/<job_id>", methods=["DELETE"])
    async def delete_job(self, request: IRequest, job_id: str) -> bytes:
        """Stop and remove a job."""
        principal = self._principal(request)
        await self._visible_job(principal, job_id)
        await self.store.delete(job_id)
        self.log.info("job {job_id} deleted", job_id=job_id)
        return _json(request, 200, {"id": job_id, "deleted": True})


    async def _run_state(self, request: IRequest, job_id: str, stopped: bool) -> bytes:
        principal = self._principal(request)
        await self._visible_job(principal, job_id)
        await self.store.set_stopped(job_id, stopped)
        state = "stopped" if stopped else "running"
        self.log.info("job {job_id} {state} by request", job_id=job_id, state=state)
        return _json(request, 200, {"id": job_id, "state": state})

    @app.route("/job/<job_id>/stop", methods=["POST"])
    async def stop_job(self, request: IRequest, job_id: str) -> bytes:
        """Stop a job on every instance; it stays stopped across restarts."""
        return await self._run_state(request, job_id, stopped=True)

    @app.route("/job/<job_id>/start", methods=["POST"])
    async def start_job(self, request: IRequest, job_id: str) -> bytes:
        """Run a stopped job again, from where it stopped."""
        return await self._run_state(request, job_id, stopped=False)

    @app.route("/job/<job_id>/set_offset/<offset>", methods=["POST"])
    async def set_offset(self, request: IRequest, job_id: str, offset: str) -> bytes:
        """Move the job's committed offsets (all partitions, or ``?topic=&partition=``)."""
        principal = self._principal(request)
        stored = await self._visible_job(principal, job_id)
        args = request.args

        def arg(name: bytes) -> str | None:
            values = args.get(name)
            return values[0].decode("utf-8", "replace") if values else None

        job = load(stored)
        wanted = OffsetRequest.parse(offset, arg(b"topic"), arg(b"partition"), job)
        moved = await self.mover.move(job, wanted)
        return _json(request, 200, {"id": job_id, "offsets": moved})

    @app.route("/job/<job_id>/status", methods=["GET"])
    async def status(self, request: IRequest, job_id: str) -> bytes:
        """State, counters, lag per partition, rate and last error of a job."""
        principal = self._principal(request)
        stored = await self._visible_job(principal, job_id)
        record = await self.store.record(job_id)
        if record is None:
            raise APIError(404, "no such job", [job_id])
        return _json(request, 200, await self._status_of(job_id, record, stored))
