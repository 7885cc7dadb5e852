"""OAuth2 client credentials (SPEC §12): a job's access token, fetched with treq and cached.

The token is fetched once for all the job's requests under way, kept until 30 s before it
expires, and fetched again when the endpoint answers 401 to it. A token endpoint that cannot
be reached, or answers anything but a token, is an outage (:class:`TokenUnavailable`): the
job's circuit holds its records, nothing is dead-lettered for it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

from restconsumer.base.types import USER_AGENT, DestinationRefused
from restconsumer.delivery.retry import Unavailable

__all__ = ["EARLY", "Fetch", "TokenSource", "TokenUnavailable", "treq_fetch"]

#: A token is fetched again this many seconds before it expires.
EARLY = 30.0

#: ``fetch(url, form, timeout)`` → (status, body) of the token endpoint's answer.
Fetch = Callable[[str, dict[str, str], float], Awaitable[tuple[int, bytes]]]


class TokenUnavailable(Unavailable):
    """The token endpoint is down or gave no token: an outage, not a bad message."""


async def treq_fetch(url: str, form: dict[str, str], timeout: float,
                     agent: IAgent | None = None) -> tuple[int, bytes]:
    """POST the form to the token endpoint with treq (through ``agent``, if given: a limited
    owner's, SPEC §8); its status and body."""
    import treq

    response = await treq.post(url, data=form, timeout=timeout, agent=agent,
                               headers=Headers({b"Accept": [b"application/json"],
                                                b"User-Agent": [USER_AGENT]}))
    return response.code, await response.content()


class TokenSource:
    """The access token of one job."""

    def __init__(self, clock: IReactorTime, settings: dict[str, Any], fetch: Fetch | None = None,
                 timeout: float = 30.0) -> None:
        self._clock = clock
        self._url: str = settings["token_url"]
        form = {"grant_type": "client_credentials", "client_id": settings["client_id"],
                "client_secret": settings["client_secret"]}
        for name in ("scope", "audience"):
            if settings.get(name):
                form[name] = settings[name]
        self._form = form
        self._fetch: Fetch = fetch or treq_fetch
        self._timeout = timeout
        self._token: str | None = None
        self._until = 0.0
        self._waiters: list[Deferred[str]] = []
        #: Tokens fetched so far (tests and status).
        self.fetched = 0

    def token(self) -> Deferred[str]:
        """The current token; one fetch serves every caller waiting for it."""
        if self._token is not None and self._clock.seconds() < self._until:
            return succeed(self._token)
        waiter: Deferred[str] = Deferred()
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            Deferred.fromCoroutine(self._refresh())
        return waiter

    def rejected(self, token: str) -> None:
        """The endpoint answered 401 to ``token``: the next caller fetches a new one."""
        if self._token == token:
            self._token = None

    async def _refresh(self) -> None:
        error: Exception | None = None
        token = ""
        try:
            status, body = await self._fetch(self._url, self._form, self._timeout)
            if status != 200:
                raise TokenUnavailable(f"the OAuth2 token endpoint answered HTTP {status}: "
                                       f"{body[:200].decode('utf-8', 'replace')}")
            data = json.loads(body)
            token = data["access_token"]
            if not isinstance(token, str) or not token:
                raise TokenUnavailable("the OAuth2 token endpoint gave no access_token")
            expires_in = float(data.get("expires_in") or 3600)
            self._token = token
            self._until = self._clock.seconds() + expires_in - EARLY
            self.fetched += 1
        except TokenUnavailable as e:
            error = e
        except DestinationRefused as e:  # never retried: the record is dead-lettered, saying why
            error = DestinationRefused(f"the OAuth2 token endpoint: {e}")
        except Exception as e:  # never the form in the reason: it holds the client secret
            error = TokenUnavailable(f"no OAuth2 token from the token endpoint: "
                                     f"{type(e).__name__}: {e}")
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if error is None:
                waiter.callback(token)
            else:
                waiter.errback(error)
