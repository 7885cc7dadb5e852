"""One attempt of one request (SPEC §5, §12): compose it, keep the job's pace, send it.

Each attempt is composed anew by :func:`~restconsumer.delivery.compose.compose` (the
token, then the signature: a retry carries a fresh timestamp, its id unchanged).
:class:`Attempts` is a job's way to the wire, shared by the running job and a replay of its
dead letters: the ``ratelimit`` pace (every attempt, retries too), one token cache, the
request's time limit, and the request metrics. It tells the job's concurrency controller
(:class:`~restconsumer.delivery.concurrency.AdaptiveLimit`) of every request written and
how it was answered: what is on the wire is known here only.
"""

from __future__ import annotations

from collections import deque
from functools import partial
from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.error import TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from restconsumer.base.types import Answer, DestinationRefused, Outgoing
from restconsumer.delivery.compose import compose
from restconsumer.delivery.concurrency import AdaptiveLimit, Signal
from restconsumer.delivery.metrics import Metrics
from restconsumer.delivery.oauth2 import TokenSource, treq_fetch
from restconsumer.delivery.retry import is_throttled
from restconsumer.delivery.sender import HTTPSender
from restconsumer.delivery.settings import Current, Settings
from restconsumer.jobs.signing import Signer

__all__ = ["RESULT_BODY", "Attempts", "Pacer", "Sending", "signal_of"]

#: The most of an answer's body a result (SPEC §12) holds.
RESULT_BODY = 64 * 1024


class Sending(Protocol):
    """What is told that a request of its is on the wire (a unit of delivery)."""

    sending: bool
    cancelled: bool


class _Tools:
    """What a job's settings give the way to the wire (rebuilt when they change)."""

    __slots__ = ("settings", "signer", "tokens")

    def __init__(self, settings: Settings, signer: Signer | None, tokens: TokenSource | None) -> None:
        self.settings = settings
        self.signer = signer
        self.tokens = tokens


class Attempts:
    """A job's way to the wire: pace, token, signature, time limit, metrics."""

    def __init__(self, clock: IReactorTime, sender: HTTPSender, metrics: Metrics, current: Current,
                 token_fetch: Any = None, concurrency: AdaptiveLimit | None = None,
                 on_answer: Any = None) -> None:
        self._clock = clock
        #: The job's concurrency controller, told of what goes on the wire and comes back.
        self.concurrency = concurrency if concurrency is not None else AdaptiveLimit()
        #: Called after each answer (a slot on the wire is free): the dispatcher's pump.
        self.on_answer = on_answer
        self._sender = sender
        self._metrics = metrics
        self._current = current
        self._token_fetch = token_fetch
        self._tools = self._make(current.settings, None)
        self._pacer = Pacer(clock)

    def _make(self, settings: Settings, before: _Tools | None) -> _Tools:
        signer = Signer(settings.signing_secret) if settings.signing_secret is not None else None
        tokens = None
        if settings.oauth2 is not None:
            if before is not None and before.tokens is not None and \
                    before.settings.oauth2 == settings.oauth2:
                tokens = before.tokens  # the same client: its token stays good
            else:
                fetch = self._token_fetch
                if fetch is None and settings.granted is not None:
                    # A limited owner's token endpoint is reached as its requests are (SPEC §8).
                    fetch = partial(treq_fetch, agent=self._sender.agent(settings.granted))
                tokens = TokenSource(self._clock, settings.oauth2, fetch, settings.timeout)
        return _Tools(settings, signer, tokens)

    def tools(self) -> _Tools:
        """The tools of the settings in force."""
        tools = self._tools
        if tools.settings is not self._current.settings:
            tools = self._tools = self._make(self._current.settings, tools)
        return tools

    @property
    def tokens(self) -> TokenSource | None:
        """The job's OAuth2 token cache, if it has one."""
        return self.tools().tokens

    def send(self, request: Outgoing, unit: Sending) -> Deferred[Answer]:
        """One attempt of ``request``: fires with the answer, fails as the send failed."""
        tools = self.tools()
        settings = tools.settings
        if settings.ratelimit <= 0:
            return self._send(tools, request, unit)
        # Every attempt, retries too, keeps the job's pace.
        self._pacer.every = settings.ratelimit
        return self._pacer.turn().addCallback(lambda _: self._send(tools, request, unit))

    def _send(self, tools: _Tools, request: Outgoing, unit: Sending) -> Deferred[Answer]:
        if tools.tokens is None:
            return self._one(tools, compose(request, self._clock.seconds(), None, tools.signer), unit)
        return Deferred.fromCoroutine(self._with_token(tools, request, unit))

    async def _with_token(self, tools: _Tools, request: Outgoing, unit: Sending) -> Answer:
        """Send with the job's OAuth2 token; on a 401, once more with a new token."""
        tokens = tools.tokens
        assert tokens is not None
        token = await tokens.token()
        answer = await self._one(tools, compose(request, self._clock.seconds(), token, tools.signer), unit)
        if answer.status == 401:
            tokens.rejected(token)
            token = await tokens.token()
            answer = await self._one(tools, compose(request, self._clock.seconds(), token, tools.signer),
                                     unit)
        return answer

    def _one(self, tools: _Tools, request: Outgoing, unit: Sending) -> Deferred[Answer]:
        settings = tools.settings
        unit.sending = True
        began = self._clock.seconds()
        concurrency = self.concurrency
        concurrency.sent(began)
        # A result holds up to 64 KiB of the answer's body.
        keep = RESULT_BODY if settings.result_topic is not None else 500
        d = self._sender.send(request, settings.timeout, settings.follow_redirects, settings.ca_cert,
                              keep=keep, granted=settings.granted,
                              connections=concurrency.limit if settings.adaptive else settings.max_in_flight)
        job_id = settings.job.id

        def sent(result: Answer | Failure) -> Answer | Failure:
            unit.sending = False
            now = self._clock.seconds()
            if isinstance(result, Answer):
                status: int | None = result.status
                if settings.adaptive:
                    concurrency.answered(now, now - began, signal_of(result), result.retry_after)
                else:
                    concurrency.forget(now)  # a fixed number: only what is on the wire counts
            elif unit.cancelled or result.check(DestinationRefused):
                concurrency.forget(now)
                self._answered()
                return result  # nothing was answered: abandoned, or never sent
            else:
                status = None
                if settings.adaptive:
                    signal = Signal.TIMEOUT if _timed_out(result) else Signal.REFUSED
                    concurrency.answered(now, now - began, signal)
                else:
                    concurrency.forget(now)
            self._metrics.answered(job_id, status, now - began)
            self._answered()
            return result

        return d.addBoth(sent)

    def _answered(self) -> None:
        if self.on_answer is not None:
            self.on_answer()

    def stop(self) -> None:
        """No more turns: waiting attempts keep waiting until cancelled."""
        self._pacer.stop()


def signal_of(answer: Answer) -> Signal:
    """What an answer tells of the endpoint's load (SPEC §5, §11)."""
    if is_throttled(answer):
        return Signal.THROTTLED
    if answer.status >= 500:
        return Signal.OVERLOADED
    return Signal.OK


def _timed_out(failure: Failure) -> bool:
    return failure.check(DeferredTimeout, TimeoutError, CancelledError) is not None


class Pacer:
    """Lets one waiter go at a time, at least ``every`` seconds after the last one went —
    measured when it really went, so a late wake-up never shortens the next gap."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.every = 0.0
        self._waiting: deque[Deferred[None]] = deque()
        self._last = float("-inf")
        self._timer: IDelayedCall | None = None

    def turn(self) -> Deferred[None]:
        """Fires when it is this caller's turn; cancelling it gives the turn up."""
        d: Deferred[None] = Deferred(self._leave)
        self._waiting.append(d)
        self._schedule()
        return d

    def _leave(self, d: Deferred[None]) -> None:
        if d in self._waiting:
            self._waiting.remove(d)

    def stop(self) -> None:
        """Cancel the timer (the job stops)."""
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _schedule(self) -> None:
        if not self._waiting or (self._timer is not None and self._timer.active()):
            return
        delay = self._last + self.every - self._clock.seconds()
        if delay <= 0:
            self._release()
        else:
            self._timer = self._clock.callLater(delay, self._release)

    def _release(self) -> None:
        self._timer = None
        if self._waiting:
            self._last = self._clock.seconds()
            self._waiting.popleft().callback(None)
        self._schedule()

