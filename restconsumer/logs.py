"""Log output: ``--log-format json`` writes one JSON object per event to standard output."""

from __future__ import annotations

import sys
from typing import Any

from twisted.logger import ILogObserver, formatEvent, jsonFileLogObserver
from zope.interface import provider

__all__ = ["json_observer"]


def json_observer() -> ILogObserver:
    """A log observer writing each event as a JSON line, with its text in ``message``
    (twistd's ``--logger`` factory)."""
    write = jsonFileLogObserver(sys.stdout, recordSeparator="")

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        write({**event, "message": formatEvent(event)})

    return observe
