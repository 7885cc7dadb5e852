"""The value types every layer shares, and nothing else: no Twisted, no I/O.

``TP`` names a partition; :class:`Outgoing` is one request ready to send (built by
``jobs.mapping``, signed by ``jobs.signing``, sent by ``delivery.sender``), :class:`Answer`
what came back and :class:`DestinationRefused` why it was not sent; ``USER_AGENT`` is what
every request of ours (and our OAuth2 and Schema Registry calls) says it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from restconsumer import __version__

__all__ = ["TP", "USER_AGENT", "Answer", "DestinationRefused", "Outgoing"]

#: A topic and partition.
TP = tuple[str, int]

#: Sent with every request (SPEC §12); a job's own ``User-Agent`` header replaces it.
USER_AGENT = f"restconsumer/{__version__}".encode("ascii")


@dataclass(slots=True)
class Outgoing:
    """One request, ready to send. ``headers`` is shared by every request of a job (it
    includes ``Host``) and is never changed."""

    method: bytes
    url: bytes
    headers: dict[bytes, list[bytes]]
    body: bytes | None
    entity_id: Any = None
    #: Whether ``headers`` belong to this request alone (templated headers, an idempotency
    #: key) rather than being the job's shared dict.
    own_headers: bool = False
    #: The record's place (``{job}:{topic}:{partition}:{offset}:{record}``, a batch's
    #: ``…:{first}-{last}``): the ``webhook-id`` of a signed request.
    webhook_id: str | None = None


@dataclass(frozen=True)
class Answer:
    """What the endpoint answered: status, ``Retry-After`` seconds if any, start of the body."""

    status: int
    retry_after: float | None = None
    body: bytes = b""


class DestinationRefused(Exception):
    """The request may not go where it would go (a redirect outside the allowed hosts, a
    CA that cannot be used); never retried."""
