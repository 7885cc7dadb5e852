"""What an owner's jobs may reach (SPEC §8): public addresses, and what its tokens grant.

An address is refused when ``ipaddress`` does not call it global, or calls it loopback,
private, link-local, multicast, reserved or unspecified (an IPv4-mapped IPv6 address is
judged as the IPv4 address it carries). A token's ``destinations`` grant more: host names
(``crm.internal``), name suffixes (``*.corp.example``: any name under it) and IP networks
(``10.20.0.0/16``; a lone address is its own network). Pure: no Twisted, no name lookups —
the caller resolves, and asks about the address it will connect to.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["Address", "Destinations", "refusal", "why_refused"]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_UNIQUE_LOCAL = ipaddress.IPv6Network("fc00::/7")


def why_refused(address: Address) -> str | None:
    """What kind of address this is if a job of a limited owner may not reach it, else None."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        elif address.sixtofour is not None and why_refused(address.sixtofour) is not None:
            return f"6to4 ({why_refused(address.sixtofour)})"  # the relay would carry it there
        elif address in _UNIQUE_LOCAL:
            return "unique-local"
    for kind, says in (("unspecified", address.is_unspecified), ("loopback", address.is_loopback),
                       ("link-local", address.is_link_local), ("multicast", address.is_multicast),
                       ("reserved", address.is_reserved), ("private", address.is_private)):
        if says:
            return kind
    if not address.is_global:
        return "non-public"  # e.g. 100.64.0.0/10, shared by carriers: neither private nor global
    return None


def _host_name(text: str, entry: str) -> str:
    name = text.strip().rstrip(".").lower()
    wrong = ValueError(f"{entry!r} is not a host name, a *.suffix or an IP network")
    try:
        name = name.encode("idna").decode("ascii")
    except UnicodeError:
        raise wrong from None
    if not name or len(name) > 253 or not all(
            0 < len(label) <= 63 and label.replace("-", "").replace("_", "").isalnum()
            and not label.startswith("-") and not label.endswith("-") for label in name.split(".")):
        raise wrong
    return name


@dataclass(frozen=True)
class Destinations:
    """What one owner's tokens grant beyond public addresses."""

    names: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()
    networks: tuple[Network, ...] = field(default=())

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Destinations:
        """From a tokens file's ``destinations``; ValueError naming each entry that is none
        of a host name, ``*.suffix`` or IP network."""
        names: set[str] = set()
        suffixes: list[str] = []
        networks: list[Network] = []
        problems: list[str] = []
        for entry in entries:
            if not isinstance(entry, str) or not entry.strip():
                problems.append(f"{entry!r} is not a host name, a *.suffix or an IP network")
                continue
            text = entry.strip()
            try:
                if text.startswith("*."):
                    suffixes.append("." + _host_name(text[2:], text))
                elif "/" in text or _is_address(text):
                    networks.append(ipaddress.ip_network(text.strip("[]"), strict=False))
                else:
                    names.add(_host_name(text, text))
            except ValueError as e:
                problems.append(str(e) if str(e).startswith(repr(text)) else f"{text!r}: {e}")
        if problems:
            raise ValueError("; ".join(problems))
        return cls(frozenset(names), tuple(suffixes), tuple(networks))

    def grants(self, host: str, address: Address | None = None) -> bool:
        """Whether ``host`` (a name or an IP literal), connected to at ``address``, is granted."""
        name = host.strip("[]").rstrip(".").lower()
        if name in self.names or any(name.endswith(s) for s in self.suffixes):
            return True
        if address is None:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address.version == n.version and address in n for n in self.networks)


def refusal(host: str, address: Address, granted: Destinations | None) -> str | None:
    """Why a limited owner's job may not connect to ``host`` at ``address`` (None: it may).
    ``granted`` None means an unlimited (admin) job: nothing is refused here."""
    if granted is None:
        return None
    kind = why_refused(address)
    if kind is None or granted.grants(host, address):
        return None
    shown = host.strip("[]")
    where = f"{shown}" if shown == str(address) else f"{shown} ({address})"
    return (f"{where} is a {kind} address, which this owner's jobs may not reach "
            f"(a token's \"destinations\" can grant it)")


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True
