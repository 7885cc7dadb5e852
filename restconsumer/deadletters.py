"""Dead letters (SPEC §5): what can never be delivered goes to the job's dead-letter topic.

The original key, value and headers, plus headers saying which job, where it came from,
how many attempts, the last status and the reason — built here, in one place.
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import KafkaError, Producer
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from restconsumer.threads import ThreadService
from restconsumer.work import Incoming

__all__ = ["DeadLetters", "dead_letter_headers"]


def dead_letter_headers(job_id: str, incoming: Incoming, reason: str, *, record: int | None = None,
                        status: int | None = None, attempts: int = 0) -> list[tuple[str, bytes]]:
    """The headers of a dead letter: where it came from and why, then the original ones."""
    headers = [
        ("restconsumer.job", job_id.encode()),
        ("restconsumer.topic", incoming.topic.encode()),
        ("restconsumer.partition", str(incoming.partition).encode()),
        ("restconsumer.offset", str(incoming.offset).encode()),
        ("restconsumer.attempts", str(attempts).encode()),
        ("restconsumer.status", b"" if status is None else str(status).encode()),
        ("restconsumer.reason", reason.encode("utf-8", "replace")),
    ]
    if record is not None:
        headers.append(("restconsumer.record", str(record).encode()))
    headers.extend((k, v if v is not None else b"") for k, v in incoming.headers)
    return headers


class DeadLetters(ThreadService):
    """Produces dead letters to Kafka; each send fires once Kafka has acknowledged it.

    The producer's delivery reports are served by a thread of its own.
    """

    def __init__(self, reactor: Any, config: dict[str, Any]) -> None:
        super().__init__(reactor, "dead-letters")
        # A dead letter carries the source message whole, plus its headers: allow more than
        # Kafka's 1 MB default (the broker may still refuse; see send()).
        self._config = {"message.max.bytes": 64 * 1024 * 1024, **config, "acks": "all",
                        "linger.ms": 5, "enable.idempotence": True}
        self._producer: Producer | None = None
        self._polling = False
        self._loop: Deferred[None] | None = None

    def startService(self) -> None:
        """Create the producer and start serving its delivery reports."""
        super().startService()
        self._producer = Producer(self._config)
        self._polling = True
        self._loop = self.in_thread(self._serve)

    def _serve(self) -> None:
        assert self._producer is not None
        while self._polling:
            self._producer.poll(0.2)
        self._producer.flush(10)

    def stopService(self) -> Deferred[None]:
        """Flush what is queued, then stop the thread."""
        Service.stopService(self)  # the thread stops below, once its loop has flushed
        self._polling = False
        d = self._loop if self._loop is not None else succeed(None)
        return d.addBoth(lambda _: self._stop_thread())

    def send(self, topic: str, key: bytes | None, value: bytes | None,
             headers: list[tuple[str, bytes]]) -> Deferred[None]:
        """Produce one dead letter; fires when Kafka has it, fails with the Kafka error.

        One the broker refuses as too large goes again without its value, a header saying why.
        """
        done: Deferred[None] = Deferred()

        def report(err: KafkaError | None, _msg: Any) -> None:
            # Runs on the delivery-report thread.
            if err is None:
                self._reactor.callFromThread(done.callback, None)
            elif value is not None and err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                slim = [*headers, ("restconsumer.value_dropped",
                                   f"the broker refused the original value: {err.str()}".encode())]
                self._reactor.callFromThread(
                    lambda: self.send(topic, key, None, slim).chainDeferred(done))
            else:
                self._reactor.callFromThread(done.errback, Failure(RuntimeError(err.str())))

        if self._producer is None:
            return fail(RuntimeError("dead letters are not running"))
        try:
            self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=report)
        except Exception as e:  # BufferError when the queue is full, KafkaException otherwise
            return fail(RuntimeError(f"cannot produce to {topic}: {e}"))
        return done
