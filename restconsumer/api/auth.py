"""Who may use the API: an admin token or user/password, and owner-scoped tokens."""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from restconsumer.jobs.destinations import Destinations

__all__ = ["Authenticator", "Principal", "TokenFile", "load_token_file", "load_tokens"]


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


@dataclass(frozen=True)
class TokenFile:
    """A tokens file: each token's owner, the topics an owner's jobs may use, and what
    they may reach besides public addresses."""

    owners: dict[str, str] = field(default_factory=dict)
    #: owner → shell-style globs (fnmatch) its jobs' topics must match; absent: any topic
    topic_limits: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: owner → what its jobs may reach besides public addresses (SPEC §8); every owner of
    #: the file has an entry (none granted: public addresses only)
    destinations: dict[str, Destinations] = field(default_factory=dict)


_SHAPE = '{"owner": o, "topics": [globs], "destinations": [hosts, *.suffixes, networks]}'


@dataclass(frozen=True)
class _Entry:
    owner: str
    topics: tuple[str, ...] | None = None
    destinations: Destinations = field(default_factory=Destinations)


def _entry(number: int, token: Any, value: Any, problems: list[str]) -> _Entry | None:
    # Entries are named by their place in the file: an error message never shows a token.
    where = f"entry {number}"
    if not isinstance(token, str) or not token:
        problems.append("every token must be a non-empty string")
        return None
    if isinstance(value, str) and value:
        return _Entry(value)
    if not isinstance(value, dict):
        problems.append(f"{where}: must map to an owner, or to {_SHAPE}")
        return None
    unknown = sorted(set(value) - {"owner", "topics", "destinations"})
    if unknown:
        problems.append(f"{where}: unknown field(s) {', '.join(map(str, unknown))} "
                        f"(only owner, topics and destinations)")
    owner, topics = value.get("owner"), value.get("topics")
    if not isinstance(owner, str) or not owner:
        problems.append(f"{where}: owner must be a non-empty string")
        return None
    if (topics is not None or "destinations" not in value) and (
            not isinstance(topics, list) or not topics
            or not all(isinstance(t, str) and t.strip() for t in topics)):
        problems.append(f"{where}: topics must be a non-empty list of topic globs "
                        f"(e.g. \"aether.*\"){'' if topics is not None else ', or destinations given'}")
        return None
    granted = Destinations()
    if "destinations" in value:
        entries = value["destinations"]
        try:
            if not isinstance(entries, list):
                raise ValueError("must be a list of host names, *.suffixes and IP networks")
            granted = Destinations.parse(entries)
        except ValueError as e:
            problems.append(f"{where}: destinations: {e}")
            return None
    return _Entry(owner, tuple(topics) if topics is not None else None, granted)


def load_token_file(path: str | Path) -> TokenFile:
    """Read a tokens file: a JSON object mapping each token to an owner, or to
    ``{"owner": o, "topics": ["aether.*", ...], "destinations": ["crm.internal", ...]}`` to
    limit the topics that owner's jobs use and grant what they may reach besides public
    addresses.

    The limits belong to the owner: every token of one owner must give the same ones.
    Raises ValueError saying every problem (never a token in full).
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the tokens file {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"the tokens file {path} must be a JSON object of token: owner "
                         f"(or token: {_SHAPE})")
    problems: list[str] = []
    owners: dict[str, str] = {}
    limits: dict[str, tuple[str, ...] | None] = {}
    granted: dict[str, Destinations] = {}
    for number, (token, value) in enumerate(data.items(), 1):
        entry = _entry(number, token, value, problems)
        if entry is None:
            continue
        owner = entry.owner
        owners[token] = owner
        if owner in limits and limits[owner] != entry.topics:
            problems.append(f"owner {owner!r} is given different topic limits by different "
                            f"tokens: give every token of an owner the same")
        if owner in granted and granted[owner] != entry.destinations:
            problems.append(f"owner {owner!r} is given different destinations by different "
                            f"tokens: give every token of an owner the same")
        limits.setdefault(owner, entry.topics)
        granted.setdefault(owner, entry.destinations)
    if problems:
        raise ValueError(f"the tokens file {path}: " + "; ".join(dict.fromkeys(problems)))
    return TokenFile(owners, {o: t for o, t in limits.items() if t is not None}, granted)


def load_tokens(path: str | Path) -> dict[str, str]:
    """Read a tokens file (see :func:`load_token_file`): token → owner. ValueError if malformed."""
    return load_token_file(path).owners


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
