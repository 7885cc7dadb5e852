"""Who may use the API: an admin token or user/password, and owner-scoped tokens."""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Authenticator", "Principal", "load_tokens"]


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the admin (``owner`` None) or the holder of an owner's token."""

    owner: str | None = None

    @property
    def is_admin(self) -> bool:
        """Whether the caller sees and changes every job."""
        return self.owner is None

    def may_see(self, owner: str) -> bool:
        """Whether the caller may see and change the jobs of ``owner``."""
        return self.owner is None or self.owner == owner


def load_tokens(path: str | Path) -> dict[str, str]:
    """Read a tokens file: a JSON object of token → owner. Raises ValueError if malformed."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the tokens file {path}: {e}") from e
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str) and v for k, v in data.items()
    ):
        raise ValueError(f"the tokens file {path} must be a JSON object of token: owner")
    return data


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


@dataclass
class Authenticator:
    """Checks the ``Authorization`` header of an API request, in constant time."""

    token: str | None = None
    user: str | None = None
    password: str | None = None
    scoped: dict[str, str] = field(default_factory=dict)
    generated: bool = False

    @classmethod
    def configure(cls, token: str | None, user: str | None, password: str | None,
                  scoped: dict[str, str] | None = None) -> Authenticator:
        """An authenticator for the given credentials; with none at all, a generated token."""
        if not token and not (user and password):
            return cls(token=secrets.token_urlsafe(24), scoped=scoped or {}, generated=True)
        return cls(token=token or None, user=user or None, password=password or None,
                   scoped=scoped or {})

    @property
    def challenge(self) -> str:
        """The ``WWW-Authenticate`` value of a 401 answer."""
        if self.user:
            return 'Basic realm="restconsumer", Bearer realm="restconsumer"'
        return 'Bearer realm="restconsumer"'

    def authenticate(self, header: bytes | None) -> Principal | None:
        """The caller named by an ``Authorization`` header, or None if it names nobody."""
        if not header:
            return None
        scheme, _, value = header.decode("latin-1").strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value:
            return self._bearer(value)
        if scheme.lower() == "basic" and value:
            return self._basic(value)
        return None

    def _bearer(self, value: str) -> Principal | None:
        found: Principal | None = None
        if self.token is not None and _same(value, self.token):
            found = Principal()
        for token, owner in self.scoped.items():
            # Compare against every token so the time taken says nothing of which matched.
            if _same(value, token) and found is None:
                found = Principal(owner)
        return found

    def _basic(self, value: str) -> Principal | None:
        if not (self.user and self.password):
            return None
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, ValueError):  # ValueError: not even ASCII
            return None
        ok_user = _same(user, self.user)
        ok_password = _same(password, self.password)
        return Principal() if sep and ok_user and ok_password else None
