"""Log output (SPEC §9): ``--log-level``, ``--log-format text|json``, librdkafka in the same log.

twistd builds its log observer from a dotted name (``--logger``) after our options are
parsed: the options call :func:`configure`, and :func:`observer` then writes text or one
flat JSON object per event — ``time`` (ISO 8601 UTC), ``level``, ``logger``, ``message``
and the event's own plain fields (``job_id``, ``topic``, ``partition``, …), never Twisted's
internals — for events at or above the level.

librdkafka's own messages reach the same log through :data:`kafka_logger`, a standard
``logging.Logger`` given to every Kafka client (its ``logger`` setting). Its lines about a
broker that cannot be reached, repeated for every client and every attempt, go at debug
level: the service says once that Kafka is away and once that it is back.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
from typing import Any, TextIO

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    textFileLogObserver,
)
from zope.interface import provider

__all__ = ["LEVELS", "configure", "flatten", "json_observer", "kafka_logger", "observer"]

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
          "warning": LogLevel.warn, "error": LogLevel.error, "critical": LogLevel.critical}

_settings = {"level": "info", "format": "text"}

#: Fields of an event that belong to Twisted, not to what happened.
_INTERNAL = {"format", "message", "isError", "failure", "why", "system", "time", "level", "logger"}


def configure(level: str, form: str) -> None:
    """Set the level and format the next :func:`observer` uses."""
    _settings["level"] = level
    _settings["format"] = form


def flatten(event: dict[str, Any]) -> dict[str, Any]:
    """One event as a flat JSON-able object."""
    stamp = event.get("log_time")
    when = datetime.datetime.fromtimestamp(stamp if stamp is not None else 0, datetime.UTC)
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": getattr(level, "name", "info"),
        "logger": event.get("log_namespace") or "?",
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _INTERNAL:
            continue
        if value is None or isinstance(value, (str, int, float, bool)):
            record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = f"{failure.type.__name__}: {failure.getErrorMessage()}"
        record["traceback"] = failure.getTraceback()
    return record


def json_observer(stream: TextIO | None = None) -> ILogObserver:
    """Writes each event as one flat JSON line."""
    out = stream or sys.stdout

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        try:
            line = json.dumps(flatten(event), ensure_ascii=False, default=str)
        except Exception as e:  # an event that cannot be written must not stop logging
            line = json.dumps({"level": "error", "message": f"unloggable event: {e}"})
        out.write(line + "\n")
        out.flush()

    return observe


#: Twisted's and txredisapi's words at every connection attempt: the service says once when
#: a part goes away and once when it is back (restconsumer.control.watch), so these go at debug.
_CHATTER = ("Starting factory {factory!r}", "Stopping factory {factory!r}",
            "Scheduling retry {attempt} to connect {endpoint} in {delay} seconds.",
            "Discarding dead connection.")


@provider(ILogFilterPredicate)
def _quiet(event: dict[str, Any]) -> PredicateResult:
    """Let Twisted's connection chatter through only at debug level."""
    said = event.get("log_format")
    if said == "{log_text}":  # a legacy log.msg, as txredisapi writes them
        said = event.get("log_text")
    if said in _CHATTER and LEVELS[_settings["level"]] > LogLevel.debug:
        return PredicateResult.no
    return PredicateResult.maybe


def observer() -> ILogObserver:
    """twistd's ``--logger`` factory: text or JSON, at the configured level."""
    write = json_observer() if _settings["format"] == "json" else textFileLogObserver(sys.stdout)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[_settings["level"]])
    return FilteringLogObserver(write, [_quiet, predicate])


class _ToTwisted(logging.Handler):
    """Hands standard-library log records (librdkafka's) to Twisted's log."""

    _LEVELS = ((logging.ERROR, LogLevel.error), (logging.WARNING, LogLevel.warn),
               (logging.INFO, LogLevel.info))
    #: librdkafka's words for a broker it cannot reach right now: said once by the service.
    _UNREACHABLE = re.compile(r"Connect to .* failed|Connection refused|Disconnected|"
                              r"brokers are down|Receive failed|Failed to resolve|"
                              r"Timed out \d+ in-flight|ApiVersionRequest failed", re.I)

    def __init__(self) -> None:
        super().__init__()
        self._log = Logger(namespace="librdkafka")

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        level = next((lvl for floor, lvl in self._LEVELS if record.levelno >= floor), LogLevel.debug)
        if self._UNREACHABLE.search(text):
            level = LogLevel.debug
        self._log.emit(level, "{text}", text=text)


kafka_logger = logging.getLogger("restconsumer.librdkafka")
kafka_logger.propagate = False
kafka_logger.setLevel(logging.DEBUG)
if not kafka_logger.handlers:
    kafka_logger.addHandler(_ToTwisted())
