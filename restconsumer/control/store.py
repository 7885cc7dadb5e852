"""The job store: jobs kept in Redis, and every change announced on the job channel.

Where things are kept and the scripts that change them are :mod:`.keys`; the connections,
:mod:`.redis`; the secret key's check before the first answer, :mod:`.keycheck`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import txredisapi
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from restconsumer.base.process import end_process
from restconsumer.control.keycheck import KeyCheck, KeyRefused
from restconsumer.control.keys import (
    ADD_STATS,
    BEGIN_MOVE,
    CLAIM,
    CREATE,
    DELETE,
    END_MOVE,
    JOB_SET,
    KEEP,
    PUT,
    PUT_STATES,
    RELEASE,
    REPLACE,
    SET_STOPPED,
    STOPPED_SET,
    channel,
    instances_key,
    job_key,
    offsets_key,
    replay_key,
    stats_key,
)
from restconsumer.control.redis import RedisAddress, RedisLink, StoreUnavailable
from restconsumer.jobs.model import Job
from restconsumer.jobs.secrets import (
    SecretKey,
    open_definition,
    seal_definition,
)

__all__ = ["JobRecord", "JobStore", "KeyRefused", "RedisAddress", "StoreUnavailable"]

@dataclass(frozen=True)
class JobRecord:
    """A stored job with its run state: stopped by an operator, or halted for set_offset."""

    job: dict[str, Any]
    stopped: bool = False
    moving_offsets: bool = False

    @property
    def runnable(self) -> bool:
        """Whether the job should be consuming now."""
        return not self.stopped and not self.moving_offsets


class JobStore(Service):
    """Jobs in Redis over a txredisapi pool that reconnects by itself.

    While no connection is up, every call fails at once with :class:`StoreUnavailable`
    rather than waiting for Redis to come back.

    Job secrets (SPEC §8): with a ``secret_key`` they are written encrypted and read back
    decrypted; without one, as they are. Before its first call answers, the store checks
    the key against the fingerprint kept in Redis and the jobs stored there (and encrypts
    under the first key what is in clear or under an older key). A key that does not fit
    calls ``on_refused`` with the reason (by default: log it and end the process), and
    every call fails from then on.

    Behind Sentinel (SPEC §6), a job write is answered only once a replica has it, while the
    master has any (``WAIT 1``, ``replica_timeout``): if none confirms it in time, the write
    stays on the master but the call fails with :class:`StoreUnavailable` saying so.
    """

    log = Logger()

    def __init__(self, address: RedisAddress, *, clock: IReactorTime | None = None,
                 poolsize: int = 4, reply_timeout: float = 5.0, connect_timeout: float = 2.0,
                 watch_every: float = 2.0, secret_key: SecretKey | None = None,
                 on_refused: Callable[[str], object] | None = None, replica_timeout: float = 1.0) -> None:
        if clock is None:
            from twisted.internet import reactor

            # The installed reactor: mypy sees the module twisted.internet.reactor instead.
            clock = cast(IReactorTime, reactor)
        self._clock = clock
        self.secret_key = secret_key
        self._key = KeyCheck(secret_key, self._raw, self._parse, on_refused or self._end_process)
        self.address = address
        self.replica_timeout = replica_timeout
        self._link = RedisLink(
            clock, address, lambda: txredisapi.RedisFactory(
                f"{address.host}:{address.port}", address.db or None, poolsize, isLazy=True,
                password=address.password, username=address.username, replyTimeout=reply_timeout),
            what="the connection pool", connect_timeout=connect_timeout, every=watch_every,
            on_tick=self._check_key_soon)

    def startService(self) -> None:
        """Start connecting to Redis, and watch that the pool keeps trying."""
        super().startService()
        if self.secret_key is None:
            self.log.warn("no --secret-key: job secrets (passwords, tokens, credential headers) "
                          "are stored in Redis as they are, readable by whoever can read Redis")
        else:
            self.log.info("job secrets are stored encrypted under the key with fingerprint "
                          "{fingerprint}", fingerprint=self.secret_key.fingerprint)
        self._link.start()

    def _check_key_soon(self) -> None:
        if self.connected and not self._key.done and not self._key.running:
            # Checked as soon as Redis answers, even if nothing asks the store for anything.
            Deferred.fromCoroutine(self._key.wait()).addErrback(lambda _: None)

    def stopService(self) -> Deferred[Any]:
        """Close every connection; fires when they are closed."""
        super().stopService()
        return self._link.stop()

    @property
    def connected(self) -> bool:
        """Whether at least one connection to Redis is up."""
        return self._link.connected

    async def _call(self, method: str, *args: Any) -> Any:
        if not self._key.done:
            await self._key.wait()
        return await self._raw(method, *args)

    async def _raw(self, method: str, *args: Any) -> Any:
        if self._key.refused is not None:
            raise StoreUnavailable(f"not started: {self._key.refused}")
        if not self.connected:
            raise StoreUnavailable(f"Redis at {self.address}: {self._link.problem or 'not connected'}")
        try:
            return await getattr(self._link.commands, method)(*args)
        except (txredisapi.ConnectionError, txredisapi.TimeoutError, txredisapi.ResponseError) as e:
            # A ResponseError here is Redis refusing to work (READONLY, OOM, LOADING...).
            raise StoreUnavailable(f"Redis at {self.address}: {e}") from e

    async def _replicated(self) -> None:
        """Behind Sentinel, wait until a replica has this connection's writes (if any replica)."""
        if not self.address.sentinels:
            return
        role = await self._raw("role")
        if not (isinstance(role, list) and len(role) >= 3 and role[2]):
            return  # no replica connected: nothing to wait for
        # txredisapi sends every command that does not block on one connection, so this
        # WAIT follows the write it is about.
        acknowledged = await self._raw("execute_command", "WAIT", 1, int(self.replica_timeout * 1000))
        if not acknowledged:
            raise StoreUnavailable(
                f"Redis at {self.address}: the change is on the master, but no replica confirmed "
                f"it within {self.replica_timeout:g} s, so a failover now could lose it; "
                f"send it again when a replica answers")

    # -- the secret key --------------------------------------------------------------------

    def _end_process(self, reason: str) -> None:
        self.log.critical("{reason}; the process ends", reason=reason)
        end_process(self._clock)  # type: ignore[arg-type]

    def _seal(self, job: Job) -> str:
        stored = job.stored()
        if self.secret_key is not None:
            stored = seal_definition(stored, self.secret_key)
        return json.dumps(stored, ensure_ascii=False)

    def _open(self, job_id: str, stored: dict[str, Any] | None) -> dict[str, Any] | None:
        if stored is None:
            return None
        # A secret no key opens is left encrypted: the supervisor puts such a job in its
        # error state, saying why; the API shows it as ***.
        opened, _ = open_definition(stored, self.secret_key)
        return opened

    # -- jobs --------------------------------------------------------------------------------

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` unless Redis answers."""
        await self._call("ping")

    async def get(self, job_id: str) -> dict[str, Any] | None:
        """The stored job with that id (secrets decrypted), or None."""
        job, _ = await self.read(job_id)
        return job

    async def read(self, job_id: str) -> tuple[dict[str, Any] | None, str | None]:
        """The stored job with that id (secrets decrypted) and its stored text, to
        :meth:`replace` it only if nobody changed it meanwhile; (None, None) if there is none."""
        raw = await self._call("get", job_key(job_id))
        return self._decode(job_id, raw), raw

    async def all(self) -> list[dict[str, Any]]:
        """Every stored job (secrets decrypted), ordered by id."""
        ids = sorted(await self.ids())
        if not ids:
            return []
        values = await self._call("mget", [job_key(i) for i in ids])
        return [job for i, raw in zip(ids, values, strict=False) if (job := self._decode(i, raw)) is not None]

    async def ids(self) -> set[str]:
        """The id of every stored job."""
        return {str(i) for i in await self._call("smembers", JOB_SET)}

    async def record(self, job_id: str) -> JobRecord | None:
        """One stored job with its run state, or None."""
        job = await self.get(job_id)
        if job is None:
            return None
        stopped = bool(await self._call("sismember", STOPPED_SET, job_id))
        moving = await self._call("get", offsets_key(job_id))
        return JobRecord(job, stopped, moving is not None)

    async def set_stopped(self, job_id: str, stopped: bool) -> None:
        """Keep a job stopped (or not) across restarts, and announce it."""
        await self._call("eval", SET_STOPPED, [STOPPED_SET],
                         [job_id, "1" if stopped else "0", channel(job_id),
                          "stop" if stopped else "start"])
        await self._replicated()

    async def begin_offset_move(self, job_id: str, token: str, ttl: int) -> bool:
        """Halt the job everywhere while its offsets move; False if a move is under way.

        The mark expires after ``ttl`` seconds, so a crashed mover never halts a job for good.
        """
        taken = await self._call("eval", BEGIN_MOVE, [offsets_key(job_id)],
                                 [token, str(ttl), channel(job_id)])
        return bool(taken)

    async def end_offset_move(self, job_id: str, token: str) -> None:
        """Let the job run again after its offsets moved (only the mover's own mark goes)."""
        await self._call("eval", END_MOVE, [offsets_key(job_id)], [token, channel(job_id)])

    async def claim_replay(self, job_id: str, owner: str, ttl: int) -> bool:
        """Mark a replay of the job's dead letters as ``owner``'s (for ``ttl`` seconds, kept
        with :meth:`keep_replay`); False if another one holds the mark."""
        return bool(await self._call("eval", CLAIM, [replay_key(job_id)], [owner, str(ttl)]))

    async def keep_replay(self, job_id: str, owner: str, ttl: int) -> bool:
        """Extend ``owner``'s mark by ``ttl`` seconds; False if it is no longer theirs."""
        return bool(await self._call("eval", KEEP, [replay_key(job_id)], [owner, str(ttl)]))

    async def release_replay(self, job_id: str, owner: str) -> None:
        """Remove ``owner``'s mark (another's is left alone)."""
        await self._call("eval", RELEASE, [replay_key(job_id)], [owner])

    async def add_stats(self, job_id: str, deltas: dict[str, int]) -> None:
        """Add to a job's counters (kept across instances and restarts, until it is deleted).

        One script: every counter moves or none does, so a failed call leaves nothing
        half-added that a retry of the same deltas would count twice. (A reply lost after
        Redis ran it is the one case where the retry counts twice, and then all of it.)
        """
        args: list[str] = []
        for name, delta in deltas.items():
            if delta:
                args += [name, str(int(delta))]
        if args:
            await self._call("eval", ADD_STATS, [stats_key(job_id)], args)

    async def put_instance_states(self, instance: str, states: dict[str, dict[str, Any]]) -> None:
        """What one instance reports of several jobs, in one call per hundred jobs."""
        items = list(states.items())
        for start in range(0, len(items), 100):
            chunk = items[start:start + 100]
            await self._call("eval", PUT_STATES, [instances_key(job_id) for job_id, _ in chunk],
                             [instance, *(json.dumps(state) for _, state in chunk)])

    async def stats(self, job_id: str) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
        """A job's counters, and each instance's latest report."""
        totals = await self._call("hgetall", stats_key(job_id)) or {}
        reports = await self._call("hgetall", instances_key(job_id)) or {}
        instances = {}
        for name, raw in reports.items():
            try:
                instances[str(name)] = json.loads(raw)
            except (TypeError, ValueError):
                continue
        return {str(k): int(v) for k, v in totals.items()}, instances

    async def put(self, job: Job, *, new: bool = False) -> None:
        """Store a job and announce the change; a ``new`` job starts with fresh counters."""
        await self._call("eval", PUT,
                         [job_key(job.id), JOB_SET, stats_key(job.id), instances_key(job.id)],
                         [self._seal(job), job.id, channel(job.id), "1" if new else "0"])
        await self._replicated()

    async def create(self, job: Job) -> bool:
        """Store a job only if none has its id; True if it was created (and announced)."""
        created = await self._call(
            "eval", CREATE, [job_key(job.id), JOB_SET, stats_key(job.id), instances_key(job.id)],
            [self._seal(job), job.id, channel(job.id)])
        if created:
            await self._replicated()
        return bool(created)

    async def replace(self, job: Job, expected: str) -> bool:
        """Store a job only if its stored text is still ``expected`` (as :meth:`read` gave it);
        True if it was replaced (and announced), False if it changed or went meanwhile."""
        replaced = await self._call("eval", REPLACE, [job_key(job.id), JOB_SET],
                                    [self._seal(job), job.id, channel(job.id), expected])
        if replaced:
            await self._replicated()
        return bool(replaced)

    async def delete(self, job_id: str) -> bool:
        """Remove a job, its run state and counters, and announce it; False if there was none."""
        removed = await self._call(
            "eval", DELETE, [job_key(job_id), JOB_SET, STOPPED_SET, stats_key(job_id),
                              instances_key(job_id), offsets_key(job_id)],
            [job_id, channel(job_id)])
        if removed:
            await self._replicated()
        return bool(removed)

    async def announce(self, job_id: str, action: str) -> None:
        """Publish ``action`` on the job's channel, for every instance to act on."""
        await self._call("publish", channel(job_id), action)

    def _parse(self, job_id: str, raw: Any) -> dict[str, Any] | None:
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            self.log.error("job {job_id}: the stored value is not JSON; ignored", job_id=job_id)
            return None
        return value if isinstance(value, dict) else None

    def _decode(self, job_id: str, raw: Any) -> dict[str, Any] | None:
        return self._open(job_id, self._parse(job_id, raw))
