"""The secret key checked against what Redis holds (SPEC §8), once, before the store answers.

The key's fingerprint is kept in Redis; the stored jobs say under which keys their secrets
are sealed. A key that fits is taken (and written as the fingerprint if none is yet); what
is in clear or under an older key is sealed under it; a key that does not fit is refused:
``on_refused`` is told why, and every call of the store fails from then on.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from restconsumer.control.keys import JOB_SET, REPLACE, channel, job_key
from restconsumer.control.redis import StoreUnavailable
from restconsumer.jobs.model import InvalidJob, Policy, load
from restconsumer.jobs.secrets import (
    FINGERPRINT_KEY,
    SecretKey,
    check_key,
    needs_sealing,
    open_definition,
    seal_definition,
    sealed_fingerprints,
)

__all__ = ["KeyCheck", "KeyRefused"]


class KeyRefused(Exception):
    """The secret key (or its absence) does not fit what Redis holds: the instance must not run."""


class KeyCheck:
    """The one check of a store's secret key, that every call of the store waits for."""

    log = Logger()

    def __init__(self, key: SecretKey | None, raw: Callable[..., Awaitable[Any]],
                 parse: Callable[[str, Any], dict[str, Any] | None],
                 on_refused: Callable[[str], object]) -> None:
        self.key = key
        self._raw = raw
        self._parse = parse
        self._on_refused = on_refused
        #: The key was found to fit.
        self.done = False
        #: Why the key was refused, once it was.
        self.refused: str | None = None
        self._waiting: list[Deferred[None]] | None = None

    @property
    def running(self) -> bool:
        """Whether a check is under way."""
        return self._waiting is not None

    async def wait(self) -> None:
        """Wait for the check (starting it if none runs); StoreUnavailable if it failed."""
        if self.done:
            return
        if self.refused is not None:
            raise StoreUnavailable(f"not started: {self.refused}")
        if self._waiting is not None:
            waiting: Deferred[None] = Deferred()
            self._waiting.append(waiting)
            await waiting
            return
        self._waiting = []
        error: BaseException | None = None
        try:
            await self._check()
            self.done = True
        except KeyRefused as e:
            self.refused = str(e)
            self._on_refused(str(e))
            error = StoreUnavailable(f"not started: {e}")
        except StoreUnavailable as e:
            error = e
        waiting_list, self._waiting = self._waiting, None
        for d in waiting_list:
            if error is None:
                d.callback(None)
            else:
                d.errback(error)
        if error is not None:
            raise error

    async def _stored_raw(self) -> dict[str, str]:
        ids = sorted(str(i) for i in await self._raw("smembers", JOB_SET))
        if not ids:
            return {}
        values = await self._raw("mget", [job_key(i) for i in ids])
        return {i: v for i, v in zip(ids, values, strict=False) if v is not None}

    async def _check(self) -> None:
        """Compare the key with what Redis holds; encrypt what is in clear or under an old key."""
        key = self.key
        stored_raw = await self._stored_raw()
        jobs = {i: job for i, raw in stored_raw.items() if (job := self._parse(i, raw)) is not None}
        found: set[str] = set()
        for job in jobs.values():
            found |= sealed_fingerprints(job)
        plain = [i for i, job in jobs.items() if key is not None and needs_sealing(job, key)]
        fingerprint = await self._raw("get", FINGERPRINT_KEY)
        verdict = check_key(fingerprint, found, len(plain), key)
        if verdict.error is not None:
            raise KeyRefused(verdict.error)
        if key is None:
            return
        if fingerprint is None:
            if not await self._raw("setnx", FINGERPRINT_KEY, key.fingerprint):
                # Another instance wrote one first: it must be one of ours too.
                fingerprint = await self._raw("get", FINGERPRINT_KEY)
                verdict = check_key(fingerprint, found, len(plain), key)
                if verdict.error is not None:
                    raise KeyRefused(verdict.error)
        elif verdict.store is not None:
            self.log.info("secret key rotation: the key with fingerprint {new} now encrypts "
                          "(was {old})", new=verdict.store, old=fingerprint)
            await self._raw("set", FINGERPRINT_KEY, verdict.store)
        resealed = 0
        for job_id in plain:
            resealed += await self._reseal(job_id, stored_raw[job_id], jobs[job_id], key)
        if resealed:
            self.log.info("job secrets of {n} stored jobs encrypted under the key with fingerprint "
                          "{fingerprint} (they were in clear or under an older key)", n=resealed,
                          fingerprint=key.fingerprint)

    async def _reseal(self, job_id: str, raw: str, job: dict[str, Any], key: SecretKey) -> int:
        opened, unreadable = open_definition(job, key)
        if unreadable:
            return 0
        try:
            # Its hash covers the secrets through an HMAC under the key now.
            renewed = load(opened, Policy(secret_digest=key.digest)).stored()
        except InvalidJob:
            renewed = opened
        value = json.dumps(seal_definition(renewed, key), ensure_ascii=False)
        done = await self._raw("eval", REPLACE, [job_key(job_id), JOB_SET],
                               [value, job_id, channel(job_id), raw])
        return int(bool(done))
