"""The HTTP API (SPEC §7): jobs read and changed through the store, JSON in and out."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from restconsumer.auth import Authenticator, Principal
from restconsumer.model import InvalidJob, Policy, load, redact, validate
from restconsumer.offsets import OffsetError, OffsetMover, OffsetRequest
from restconsumer.status import StatusReporter, job_status
from restconsumer.store import JobStore, StoreUnavailable
from restconsumer.supervisor import Supervisor

__all__ = ["API", "MAX_BODY", "APIError"]

#: The largest request body the API reads, in bytes.
MAX_BODY = 1024 * 1024
#: How often a create or update is tried again when the job changed under it.
WRITE_ATTEMPTS = 5
#: The OpenAPI 3 description, served as it is.
OPENAPI = (Path(__file__).parent / "openapi.json").read_bytes()


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
                 demo_sink: Callable[[str, str, bytes], None] | None = None) -> None:
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

    # -- helpers -----------------------------------------------------------------------

    def _principal(self, request: IRequest) -> Principal:
        if getattr(request, "too_large", False):
            raise APIError(413, "request body too large", [f"at most {self.max_body} bytes"])
        principal = self.auth.authenticate(request.getHeader(b"Authorization"))
        if principal is None:
            request.setHeader(b"WWW-Authenticate", self.auth.challenge.encode())
            raise APIError(401, "authentication required",
                           ["send Authorization: Bearer <token> (or Basic user:password)"])
        return principal

    def _body(self, request: IRequest) -> Any:
        if getattr(request, "too_large", False):
            raise APIError(413, "request body too large", [f"at most {self.max_body} bytes"])
        length = request.getHeader(b"Content-Length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise APIError(413, "request body too large", [f"at most {self.max_body} bytes"])
        data = request.content.read(self.max_body + 1)
        if len(data) > self.max_body:
            raise APIError(413, "request body too large", [f"at most {self.max_body} bytes"])
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

    @app.handle_errors
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

    @app.route("/embedded/echo/", branch=True,
               methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    def echo(self, request: IRequest) -> bytes:
        """``--embedded`` only: a demo endpoint for jobs to call; ``demo_sink`` counts what it
        got (restconsumer.embedded logs a summary), answers 200."""
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
        await self._visible_job(principal, job_id)
        record = await self.store.record(job_id)
        if record is None:
            raise APIError(404, "no such job", [job_id])
        body = await job_status(job_id, record, self.store, self.supervisor, self.reporter, self.clock)
        return _json(request, 200, body)
