"""Ending the process from inside a running reactor, with an exit status of our choosing.

For a failure found once the reactor runs (the store finds the secret key refused, a
worker's parent is gone): every service stops in order, then the process exits non-zero.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from typing import Any

from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IReactorCore

__all__ = ["end_process"]

_exit_status: int | None = None


def _exit_with_status() -> None:
    # twistd (up to 26.10 at least) gives a service no say in the exit status: once the
    # reactor runs, an exception is logged and swallowed, and the reactor's _exitSignal
    # only re-raises a signal that stopped it (and SIGTERM counts as a clean exit for
    # systemd). This runs from atexit, after twistd has stopped every service, removed
    # its pid file and stopped logging; an exception here would not change the status,
    # so it flushes what is left and ends the process itself.
    if _exit_status is None:
        return
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        # A closed stream has nothing left to flush.
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    os._exit(_exit_status)


def end_process(reactor: IReactorCore, status: int = 1, *, deadline: float = 15.0) -> None:
    """Stop the reactor (every service stops in order), then exit with ``status``.

    For a failure found once the reactor runs; before that, raise :class:`StartupError`.
    If stopping takes longer than ``deadline`` seconds, the process ends anyway.
    """
    global _exit_status
    if _exit_status is None:
        atexit.register(_exit_with_status)
    _exit_status = max(status, _exit_status or 0)

    def stop() -> None:
        # Already stopping is as good.
        with contextlib.suppress(ReactorNotRunning):
            reactor.stop()
        clock: Any = reactor
        # A service that never finishes stopping must not keep a failed process alive.
        clock.callLater(deadline, _exit_with_status)

    reactor.callWhenRunning(stop)
