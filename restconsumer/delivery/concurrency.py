"""How many requests a job keeps on the wire: ``max_in_flight: "auto"`` (SPEC §11, §5).

Plain data, no Twisted, no I/O, time passed in (float seconds). The dispatcher tells
:class:`AdaptiveLimit` when a request was written (:meth:`~AdaptiveLimit.sent`) and how it
ended (:meth:`~AdaptiveLimit.answered`: its time from written to answered and a
:class:`Signal`), asks :meth:`~AdaptiveLimit.may_send` / :meth:`~AdaptiveLimit.next_send`
before it writes one (a ``Retry-After`` hold, the pacing interval), and bounds the
scheduler's requests under way by :attr:`~AdaptiveLimit.limit`.

The rule
--------

Answers are judged in *windows*: a round of answers to requests written since the last
change of the limit (at least ``MIN_SAMPLES``; at most ``MAX_WINDOW_RTTS`` round trips).
Answers to requests written before the last change say nothing about the new limit and are
left out; failures of requests written before the last cut belong to the burst that made it,
so one burst is one cut, not one per failure (TCP's rule; written = now - rtt).

* **Failures** (OVERLOADED, TIMEOUT, REFUSED) in a window cut the limit by
  ``1 - (1 - FAIL_FACTOR) * min(1, share / FAIL_SHARE_FULL)``: to half when a quarter of
  the window failed, by a little for one stray 500 (1 % random errors do not pin it to 1).
  Slow start then climbs back to the limit before the burst.
* **Queueing**: the window's mean RTT above ``base * (1 + TOLERANCE)`` plus ``NOISE_Z``
  standard errors of jitter. ``base`` is the lowest mean of ``BASE_SAMPLES`` answers over the
  last one to two epochs (``BASE_EPOCH``) -- not a moving average, which a slowly growing
  limit drags along (Vector compares with a moving average and mean + 2.5 sigma, the drift
  behind its limits settling off a good fixed setting, vector #7371, #8470). The cut goes to
  what the endpoint served, Little's law ``answers/s * base`` (an endpoint that serves S at
  a time and queues the rest gives S), times ``CUT_BELOW`` so the next window sees the base
  again; at most to half. If the next window is no faster, the cut did not help: the
  endpoint got slower, not queued behind the job, and its RTT becomes the base. A window at
  a higher limit whose answers/s rose by ``GAIN`` of the limit's rise is no knee, whatever
  its RTT (an endpoint working in batches).
* **Growth**: no failure, throttle or queueing and the limit *used* (requests on the wire
  reached it in the window; a limit held back by order groups or a short backlog stays
  put). Below ``_ssthresh`` (slow start, until the first queueing) the limit doubles per
  window (by half from ``SLOW_START_GENTLER``); above it, it grows by 1, 2, 4, ... (the step
  doubles per good window, at most an eighth of the limit).
* **Throttled** (429, 503 with ``Retry-After``) acts at once: a ``Retry-After`` holds every
  new request until it passes, and the limit is halved (once per burst). If the endpoint
  accepted a rate in the ``Retry-After`` (at least one second) before and the limit would
  go faster than it -- for a fast endpoint that is "even one request at a time is too many"
  -- the job *paces*: sends at least :attr:`~AdaptiveLimit.pace` apart, ``1 / (accepted/s
  * (1 - PACE_MARGIN))``, with a limit that just carries that rate (``PACE_MIN_LIMIT``, 2,
  for a fast endpoint).
  The pace holds for ``QUIET_MIN`` seconds after a throttle (doubling, up to ``QUIET_MAX``,
  each time a throttle finds the same rate again: every probe above a real rate limit costs a
  whole ``Retry-After`` of nothing sent), then the rate rises each second by ``PACE_STEP``,
  twice that, four times, ... until a throttle answers again, or the pace no longer binds
  (the job sends slower than half of it while the limit is full): then pacing is off and
  the limit grows again.

Why these constants -- measured with the discrete-event simulation in
``tests/test_concurrency.py`` (start 4, ceiling 512; a fixed setting run on the same model):

* Endpoint serving 16 at a time, 20 ms each, queueing the rest, 6,000 requests: 796/s, 0.995
  x a fixed 16 or 64 (800/s), saw-tooth 16-24, p50 20 ms (fixed 64: 80 ms); with +-30 % service
  times 752/s (0.94 x), 12-23, p50 22 ms. ``TOLERANCE`` 0.25: the knee is within a quarter.
* 1 ms, unlimited: 4.7 x a fixed 64 (it doubles to 512 in a few ms); 1 ms from 64 slots:
  0.96 x a fixed 64, limit 65-89. Without slow start (+1 per window) it takes 60 windows
  to get to 64; with doubling all the way, the overshoot into a knee or a rate limit is
  twice as large (``SLOW_START_GENTLER``).
* 50 ms, 5,000 records of 500 keys in key order: 1.67 x a fixed 128.
* 300 requests per one-second window, 429 + ``Retry-After: 1`` beyond, 6,000 requests:
  274/s with 2.4 % answered 429 at 1 ms (paced at 1 in flight), 271/s, 2.4 % at 20 ms
  (9 in flight); nearly all of them the first burst, before the rate is known. A fixed 64
  with the same hold: 314/s and 295/s, but 17 % and 16 % of its requests answered 429.
  ``PACE_MARGIN`` 0.05 and ``QUIET_MIN`` 4 s: one probe above the limit per 4-8 s at first,
  seldom later (it doubles up to ``QUIET_MAX``). 10 s was tried: a storm of 429s that was
  no rate limit kept a job paced at 1 in flight for more than 6 s after it (the
  integration test); 2 s: 250/s against 300/s (the probes cost too many ``Retry-After``).
* ``FAIL_FACTOR``/``THROTTLE_FACTOR`` 0.5, TCP's halving: Vector's and Netflix AIMD's 0.9
  need seven cuts to halve; with one cut per burst halving is not a collapse. A 0.5 s burst
  of 503s against the 16-slot endpoint: down to 1, back at the knee 0.3 s after it ends.
"""

from __future__ import annotations

import bisect
import enum
import math
from collections import deque

__all__ = ["AdaptiveLimit", "Signal"]

#: Relative rise of the window's mean RTT over the base that counts as queueing, plus
#: ``NOISE_Z`` standard errors of the window's mean (jitter, measured at limits up to
#: ``JITTER_LIMIT``, where the job's own requests hardly queue).
TOLERANCE = 0.25
NOISE_Z = 3.0
JITTER_LIMIT = 8
#: After an RTT cut, a window still queueing and not this much faster means the cut did
#: not help: the endpoint got slower (not queueing behind the job), and that is the new base.
REBASE_GAIN = 0.1
#: The base RTT is the lowest window mean of the last one to two epochs of this length
#: (seconds, or round trips if longer): an endpoint that got slower is adopted that late.
BASE_EPOCH = 5.0
BASE_EPOCH_RTTS = 50
#: A window is judged when a round of answers (and at least ``MIN_SAMPLES``) is in, or
#: after ``MAX_WINDOW_RTTS`` round trips with fewer.
MIN_SAMPLES = 4
MAX_WINDOW_RTTS = 4.0
#: Answers pooled into one candidate for the base RTT (the mean of a few is too noisy).
BASE_SAMPLES = 32
#: An RTT cut lands this far below the concurrency the endpoint served (so the next
#: window sees the base again and the base cannot creep up with the limit).
CUT_BELOW = 0.9
#: A window whose answers/s rose by this share of its limit's rise over the last window's is
#: not queueing, whatever its RTT: an endpoint (or this job) working in batches gets slower
#: per answer and still faster in all. Simulated (``Batching`` in the tests): 0.5 stopped at
#: 0.74 x a fixed 64, 0.35 gives 0.97 x; 0.3 and less let a 64-slot endpoint's queue grow
#: past 0.95 x of its best.
GAIN = 0.35
#: Slow start doubles the limit per window below this, and grows it by half above (a
#: blind doubling of a large limit is what overshoots a knee, or a rate limit, the most).
SLOW_START_GENTLER = 64
#: Cut on failures (when ``FAIL_SHARE_FULL`` of the window failed) and on a throttle.
FAIL_FACTOR = 0.5
FAIL_SHARE_FULL = 0.25
THROTTLE_FACTOR = 0.5
#: Pacing: margin under the learned rate, quiet time before probing, first step, rate window.
PACE_MARGIN = 0.05
QUIET_MIN = 4.0
QUIET_MAX = 120.0
PACE_STEP = 0.02
PACE_SAME_RATE = 0.15
#: While pacing, the limit is this many times what the paced rate keeps on the wire, and at
#: least ``PACE_MIN_LIMIT``: the pace binds, and a second request on the wire hides the job's
#: own turn-around between an answer and the next write (at 1, a real job reached 228/s of a
#: 300/s limit: each send waited for the previous answer's processing, not for the pace).
PACE_HEADROOM = 1.5
PACE_MIN_LIMIT = 2
#: A throttle teaches a rate only when at least this many requests succeeded before it.
RATE_EVIDENCE = 4
#: The span (seconds) over which accepted answers are counted, and how many are kept.
RATE_SPAN_MIN = 1.0
RATE_SPAN_MAX = 10.0
RATE_KEEP = 8192


class Signal(enum.Enum):
    """What an answer says about the endpoint's load."""

    #: The endpoint coped: 2xx, and 4xx other than 429 (the record's fault, not load).
    OK = "ok"
    #: Back-pressure: 429, or 503 with ``Retry-After``.
    THROTTLED = "throttled"
    #: 503 without ``Retry-After``, other 5xx.
    OVERLOADED = "overloaded"
    #: The request timed out.
    TIMEOUT = "timeout"
    #: The connection was refused or reset.
    REFUSED = "refused"


class AdaptiveLimit:
    """The concurrency limit of one job (per process) and its ``Retry-After`` hold and pacing.

    ``limit`` is between 1 and ``ceiling``; it starts at ``start`` and finds the endpoint's
    best concurrency from the outcomes it is told (module docstring: the rule).
    """

    def __init__(self, ceiling: int = 512, *, start: int = 4) -> None:
        if ceiling < 1:
            raise ValueError("ceiling must be at least 1")
        #: The highest the limit may go (the job's ``max_in_flight_limit``).
        self.ceiling = ceiling
        self._start = max(1, min(start, ceiling))
        #: Requests on the wire now (written, not yet answered).
        self.in_flight = 0
        self._hold_until = -math.inf
        self._due = -math.inf  # when the last send was due (paced) or went (not paced)
        self._reset()

    # -- state -------------------------------------------------------------------------------

    def _reset(self) -> None:
        #: The current limit: requests that may be on the wire at once.
        self.limit = self._start
        #: Seconds between two sends while pacing; 0 when not pacing.
        self.pace = 0.0
        self._ssthresh = self.ceiling  # slow start below it (doubling per window)
        self._step = 1  # the additive step above it, doubles per good window
        self._changed_at = -math.inf  # last change: answers to requests sent before say nothing new
        self._cut_at = -math.inf  # last cut: failures of requests sent before are the same burst
        self._congested = False  # cut since the last good window (the burst's first cut sets the goal)
        self._cut_mean = 0.0  # the mean RTT that made the last RTT cut (0: the last change was not one)
        self._srtt = 0.0  # smoothed RTT of good answers (0: none yet)
        self._base = 0.0  # RTT with nothing waiting (0: not measured yet)
        self._base_cur = self._base_prev = math.inf
        self._epoch_end = -math.inf
        self._pool_n = 0  # answers pooled for the next base candidate, and their RTTs' sum
        self._var = 0.0  # smoothed variance of single RTTs within a window (jitter)
        self._pool_sum = 0.0
        self._rate = 0.0  # the paced rate (requests/s), 0 when not pacing
        self._learned = 0.0  # the rate the last throttle taught
        self._quiet = QUIET_MIN
        self._probe_at = math.inf
        self._probe_step = PACE_STEP
        self._accepted: deque[float] = deque()  # when the last good answers came
        self._ref = (0, 0.0)  # the last judged window's limit and answers/s
        self._new_window(-math.inf)

    def _new_window(self, now: float) -> None:
        self._w_start = now
        self._w_n = 0  # good answers (with an RTT) to requests written since the last change
        self._w_sum = 0.0
        self._w_sq = 0.0
        self._w_failed = 0  # failures of requests written since the last cut
        self._w_all = 0  # every answer in the window
        self._w_throttled = False
        self._w_peak = self.in_flight
        self._w_used = self.in_flight >= self.limit

    def _advance(self, now: float) -> None:
        if self._w_start == -math.inf:
            self._w_start = now  # the first window begins with the first request

    def _change(self, now: float, limit: int) -> None:
        self._cut_mean = 0.0
        self.limit = max(1, min(limit, self.ceiling))
        self._changed_at = now
        self._new_window(now)

    # -- what the dispatcher tells -------------------------------------------------------------

    def sent(self, now: float) -> None:
        """A request was written at ``now``."""
        self._advance(now)
        self.in_flight += 1
        if self.pace > 0:
            # The next is due one interval after this one was due, not after it went: lateness
            # (a timer fires up to a millisecond after its time, 25 % of a 4 ms pace) is made
            # up, by at most one interval.
            self._due = max(self._due + self.pace, now - self.pace)
        else:
            self._due = now
        self._w_peak = max(self._w_peak, self.in_flight)
        if self.in_flight >= self.limit:
            self._w_used = True

    def answered(self, now: float, rtt: float, signal: Signal, retry_after: float | None = None) -> None:
        """A request written ``rtt`` seconds before ``now`` was answered (or failed) at ``now``."""
        self._advance(now)
        self.in_flight = max(0, self.in_flight - 1)
        self._w_all += 1
        rtt = max(0.0, rtt)
        written = now - rtt
        if signal is Signal.OK:
            self._ok(now, rtt, written >= self._changed_at)
        elif signal is Signal.THROTTLED:
            self._throttled(now, retry_after, written > self._cut_at)
        elif written > self._cut_at:
            self._w_failed += 1
        if self._window_due(now):
            self._judge(now)

    def forget(self, now: float) -> None:
        """A request told as written leaves the wire, telling nothing of the endpoint: it never
        reached it (refused by us, or cancelled), or the job has a fixed number and only
        counts what is on the wire."""
        self._advance(now)
        self.in_flight = max(0, self.in_flight - 1)

    def restart(self) -> None:
        """The circuit closed: start low again, with nothing learned (a hold still stands)."""
        self._reset()

    # -- what the dispatcher asks --------------------------------------------------------------

    def may_send(self, now: float) -> bool:
        """False while a ``Retry-After`` hold or the pacing interval says wait (the limit aside)."""
        return self.next_send(now) <= now

    def next_send(self, now: float) -> float:
        """When the next request may be written: ``now`` if it may now (the limit aside)."""
        paced = self._due + self.pace if self.pace > 0 else -math.inf
        return max(now, self._hold_until, paced)

    @property
    def held_until(self) -> float:
        """The end of the latest ``Retry-After`` hold (in the past when none holds)."""
        return self._hold_until

    # -- answers -------------------------------------------------------------------------------

    def _ok(self, now: float, rtt: float, fresh: bool) -> None:
        self._srtt = rtt if self._srtt == 0.0 else self._srtt + (rtt - self._srtt) / 8
        self._accepted.append(now)
        if len(self._accepted) > RATE_KEEP:
            self._accepted.popleft()
        while self._accepted[0] < now - RATE_SPAN_MAX:
            self._accepted.popleft()
        if fresh:
            self._w_n += 1
            self._w_sum += rtt
            self._w_sq += rtt * rtt
        if self.pace > 0 and now >= self._probe_at:
            self._probe(now)

    def _throttled(self, now: float, retry_after: float | None, fresh: bool) -> None:
        self._w_throttled = True
        if retry_after is not None and retry_after > 0:
            self._hold_until = max(self._hold_until, now + retry_after)
        if not fresh:
            return
        span = min(RATE_SPAN_MAX, max(RATE_SPAN_MIN, retry_after or 0.0))
        limit = max(1, math.floor(self.limit * THROTTLE_FACTOR))
        rate = self._rate_since(now, span)
        rtt = self._base or self._srtt
        # Pace if the endpoint showed a rate and the limit would go faster (or pacing already).
        paced = rate > 0 and rtt > 0 and (self.pace > 0 or self.limit / rtt > rate)
        if paced:
            same = self._learned > 0 and abs(rate - self._learned) <= PACE_SAME_RATE * self._learned
            self._quiet = min(QUIET_MAX, self._quiet * 2) if same else QUIET_MIN
            # The same limit again: the lower of the two (a count over one second that straddles
            # two of the endpoint's windows reads high).
            self._rate = self._learned = min(rate, self._learned) if same else rate
            self.pace = 1.0 / self._rate
            limit = self._pace_limit()
            self._probe_step = PACE_STEP
            self._probe_at = now + self._quiet
        self._cut(now, limit, recover=not paced)

    def _accepted_since(self, since: float) -> int:
        return len(self._accepted) - bisect.bisect_left(self._accepted, since)

    def _rate_since(self, now: float, span: float) -> float:
        """Requests/s the endpoint accepted over ``span`` before ``now``, less the margin (0: too few)."""
        since = now - span
        accepted = self._accepted_since(since)
        if accepted < RATE_EVIDENCE:
            return 0.0
        if len(self._accepted) >= RATE_KEEP and self._accepted[0] > since:
            span = max(now - self._accepted[0], 1e-9)  # fewer kept than the span held
        return accepted / span * (1 - PACE_MARGIN)

    def _pace_limit(self) -> int:
        """A limit that carries the paced rate with room to spare (the pace is what binds)."""
        rtt = self._base or self._srtt
        return min(self.ceiling, max(PACE_MIN_LIMIT, math.ceil(self._rate * rtt * PACE_HEADROOM)))

    def _probe(self, now: float) -> None:
        """A quiet second passed while pacing: raise the rate by more than last time."""
        achieved = self._accepted_since(now - 1.0)
        self._rate *= 1 + self._probe_step
        self._probe_step = min(1.0, self._probe_step * 2)
        self._probe_at = now + 1.0
        self.pace = 1.0 / self._rate
        limit = self._pace_limit()
        if achieved < self._rate / 2 or limit >= self.ceiling:
            self._stop_pacing()  # the pace no longer binds (the job sends slower anyway)
        if limit > self.limit:
            self._change(now, limit)

    def _stop_pacing(self) -> None:
        """Pacing is off; the limit may grow again (slow start: the pace held it down)."""
        self.pace = 0.0
        self._rate = 0.0
        self._probe_at = math.inf
        self._ssthresh = self.ceiling

    # -- windows -------------------------------------------------------------------------------

    def _window_due(self, now: float) -> bool:
        answers = self._w_n + self._w_failed
        if answers == 0:
            return False
        if answers >= max(MIN_SAMPLES, self._w_peak):  # a whole round: its first answers are its fastest
            return True
        return self._srtt > 0 and now - self._w_start >= MAX_WINDOW_RTTS * self._srtt

    def _judge(self, now: float) -> None:
        mean = self._w_sum / self._w_n if self._w_n else 0.0
        queueing = self._w_n > 0 and self._base > 0 and mean > self._threshold()
        rate = self._w_all / max(now - self._w_start, 1e-9)
        if queueing and self._gaining(rate):
            queueing = False  # slower answers, but more of them: no knee yet (batching, say)
        self._ref = (self.limit, rate)
        if self._w_n >= 2 and not queueing and self.limit <= JITTER_LIMIT:
            # Jitter, measured where the job's own requests hardly queue (a mild queue spreads
            # RTTs too, and must not widen the allowance meant to catch it).
            var = max(0.0, self._w_sq / self._w_n - mean * mean)
            self._var = var if self._var == 0.0 else self._var + (var - self._var) / 4
        if self._w_n and not queueing:
            self._learn_base(now, mean)
        binds = self._accepted_since(now - 1.0) >= self._rate / 2
        if self.pace > 0 and self._w_used and now >= self._hold_until + 1.0 and not binds:
            self._stop_pacing()  # the limit binds, not the pace (a storm passed, say)
        if self._w_failed:
            share = self._w_failed / (self._w_failed + self._w_n)
            factor = 1 - (1 - FAIL_FACTOR) * min(1.0, share / FAIL_SHARE_FULL)
            self._cut(now, min(self.limit - 1, math.floor(self.limit * factor)), recover=True)
        elif queueing and self._cut_mean > 0 and mean >= self._cut_mean * (1 - REBASE_GAIN):
            self._rebase(mean)  # the last cut did not help: the endpoint got slower, not us
            self._new_window(now)
        elif queueing:
            # The endpoint served ``answers/s * base`` at a time (Little's law at no wait).
            served = self._w_all / max(now - self._w_start, 1e-9) * self._base
            target = round(served * CUT_BELOW)
            limit = max(math.ceil(self.limit / 2), min(self.limit - 1, target))
            if self.pace > 0:  # paced: the pace binds the rate; keep PACE_MIN_LIMIT on the wire
                limit = max(limit, min(self.limit, PACE_MIN_LIMIT))
            self._cut(now, limit, recover=False)
            self._cut_mean = mean
        elif self._w_used and self._w_n and not self._w_throttled and self.pace == 0.0:
            self._grow(now)
        else:
            if not self._w_used:
                self._step = 1
            self._new_window(now)

    def _gaining(self, rate: float) -> bool:
        """The window at a higher limit than the last had answers/s up by at least ``GAIN``
        of the limit's rise: the endpoint is not at its knee, whatever its RTT says."""
        limit, before = self._ref
        return before > 0 and self.limit > limit and rate >= before * (1 + GAIN * (self.limit / limit - 1))

    def _learn_base(self, now: float, mean: float) -> None:
        """The base: the lowest mean of ``BASE_SAMPLES`` answers in the last one to two epochs."""
        self._pool_n += self._w_n
        self._pool_sum += mean * self._w_n
        if now >= self._epoch_end:
            self._base_prev, self._base_cur = self._base_cur, math.inf
            self._epoch_end = now + max(BASE_EPOCH, BASE_EPOCH_RTTS * self._srtt)
        if self._pool_n >= BASE_SAMPLES:
            self._base_cur = min(self._base_cur, self._pool_sum / self._pool_n)
            self._pool_n, self._pool_sum = 0, 0.0
        lowest = min(self._base_prev, self._base_cur)
        self._base = lowest if lowest < math.inf else self._pool_sum / self._pool_n

    def _rebase(self, mean: float) -> None:
        self._base = self._base_cur = self._base_prev = mean
        self._pool_n, self._pool_sum = 0, 0.0
        self._cut_mean = 0.0

    def _threshold(self) -> float:
        """The mean RTT above which a window counts as queueing: tolerance plus jitter."""
        noise = NOISE_Z * math.sqrt(self._var / max(1, self._w_n))
        return self._base * (1 + TOLERANCE) + noise

    def _grow(self, now: float) -> None:
        self._congested = False
        if self.limit < self._ssthresh:
            factor = 2.0 if self.limit < SLOW_START_GENTLER else 1.5
            self._change(now, min(math.ceil(self.limit * factor), self._ssthresh))
            return
        step = self._step
        self._step = min(self._step * 2, max(1, self.limit // 8))
        self._change(now, self.limit + step)

    def _cut(self, now: float, limit: int, *, recover: bool) -> None:
        """Lower the limit; ``recover``: slow start back to the limit before the burst."""
        before = self.limit
        self._change(now, limit)
        if not recover:
            self._ssthresh = self.limit  # the knee (or the paced rate): grow carefully from here
        elif not self._congested:
            self._ssthresh = max(self.limit, before)
        self._congested = True
        self._cut_at = now
        self._step = 1
