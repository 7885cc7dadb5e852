"""The origin of a URL — scheme, host, port — read one way everywhere (validation, the
request builder's ``Host``, redirects, ``--allow-hosts``)."""

from __future__ import annotations

from urllib.parse import urlsplit

__all__ = ["DEFAULT_PORTS", "Origin", "host_of", "origin"]

#: The port a URL of each scheme means when it names none.
DEFAULT_PORTS = {"http": 80, "https": 443}

#: scheme, host (lower case, an IPv6 literal without brackets), port (the default filled in).
Origin = tuple[str, str, int | None]


def origin(url: str | bytes) -> Origin:
    """The origin of an absolute URL; ValueError for a port that is not a number."""
    text = url.decode("ascii", "replace") if isinstance(url, bytes) else url
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    port = parts.port
    return scheme, parts.hostname or "", DEFAULT_PORTS.get(scheme) if port is None else port


def host_of(url: bytes) -> str:
    """The host of an absolute URL, as :func:`origin` reads it, without parsing the rest
    (asked for each request when hosts are limited)."""
    authority = url.split(b"/", 3)[2].rpartition(b"@")[2]
    host = authority[1:authority.find(b"]")] if authority.startswith(b"[") else authority.partition(b":")[0]
    return host.decode("ascii", "replace").lower()
