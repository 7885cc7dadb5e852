"""Signed requests (SPEC §12) as the Standard Webhooks specification defines them.

``webhook-id``, ``webhook-timestamp`` and ``webhook-signature: v1,<base64 HMAC-SHA256 of
"id.timestamp.body">``, with the secret given as ``whsec_<base64>``. A request is signed at
each attempt, so that a retry after a long outage carries a fresh timestamp (receivers
refuse old ones); its id stays the same.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
from typing import Any

from restconsumer.base.types import Outgoing

__all__ = ["PREFIX", "SCHEMES", "Signer", "secret_problem"]

PREFIX = "whsec_"
SCHEMES = ("standard-webhooks",)


def _key(secret: str) -> bytes:
    if not secret.startswith(PREFIX):
        raise ValueError(f"must be {PREFIX}<base64>")
    try:
        key = base64.b64decode(secret[len(PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"must be {PREFIX}<base64>: what follows {PREFIX} is not base64") from None
    if not key:
        raise ValueError(f"must be {PREFIX}<base64> of at least one byte")
    return key


def secret_problem(secret: Any) -> str | None:
    """Why ``secret`` is no Standard Webhooks secret, or None (never quotes the secret)."""
    if not isinstance(secret, str):
        return "must be a string"
    try:
        _key(secret)
    except ValueError as e:
        return str(e)
    return None


class Signer:
    """Signs a job's requests with its secret."""

    def __init__(self, secret: str) -> None:
        self._key = _key(secret)

    def signature(self, msg_id: str, timestamp: int, body: bytes) -> bytes:
        """``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``."""
        mac = hmac.new(self._key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
        return b"v1," + base64.b64encode(mac.digest())

    def sign(self, request: Outgoing, now: float) -> Outgoing:
        """A copy of ``request`` with the three headers, its timestamp ``now``."""
        msg_id = request.webhook_id or ""
        timestamp = int(now)
        headers = dict(request.headers)
        headers[b"webhook-id"] = [msg_id.encode()]
        headers[b"webhook-timestamp"] = [str(timestamp).encode()]
        headers[b"webhook-signature"] = [self.signature(msg_id, timestamp, request.body or b"")]
        return dataclasses.replace(request, headers=headers, own_headers=True)
