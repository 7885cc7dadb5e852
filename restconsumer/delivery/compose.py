"""The request as it goes on the wire, made from the one the request builder made.

Plain functions, no Twisted. :func:`compose` adds the job's OAuth2 token in
``Authorization``, then the Standard Webhooks signature. Delivery calls it at every
attempt; the preview calls it with ``***`` for the token and :class:`RedactedSigner`, so it
shows what the job would send without fetching a token or signing anything.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from restconsumer.base.types import Outgoing
from restconsumer.jobs.model import REDACTED

__all__ = ["RedactedSigner", "Signs", "compose"]


class Signs(Protocol):
    """Signs a request (restconsumer.jobs.signing.Signer, or the preview's redacted twin)."""

    def sign(self, request: Outgoing, now: float) -> Outgoing:
        """A signed copy of ``request``, its timestamp ``now``."""


class RedactedSigner:
    """Signs as the job's signer would, with ``***`` for the signature (a preview)."""

    def sign(self, request: Outgoing, now: float) -> Outgoing:
        """A copy of ``request`` with the three Standard Webhooks headers, redacted."""
        headers = dict(request.headers)
        headers[b"webhook-id"] = [(request.webhook_id or "").encode()]
        headers[b"webhook-timestamp"] = [str(int(now)).encode()]
        headers[b"webhook-signature"] = [REDACTED.encode()]
        return dataclasses.replace(request, headers=headers, own_headers=True)


def compose(request: Outgoing, now: float, token: str | None, signer: Signs | None) -> Outgoing:
    """The request as sent: with the bearer ``token`` (OAuth2), then signed."""
    if token is not None:
        auth = b"Bearer " + token.encode("latin-1", "replace")
        request = dataclasses.replace(request, headers={**request.headers, b"Authorization": [auth]},
                                      own_headers=True)
    if signer is not None:
        request = signer.sign(request, now)
    return request
