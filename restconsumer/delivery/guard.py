"""Connections of a limited owner's jobs: to checked addresses only (SPEC §8).

:class:`CheckedEndpoint` resolves the host, asks :func:`~restconsumer.jobs.destinations.refusal`
about every address it got, and connects to an address it checked — the TCP connection
is to that IP, TLS still checks the certificate against the host name — so an answer
that changes between the check and the connection (DNS rebinding) cannot reach a refused
address. It runs once per connection: the pool keeps the connections made, and requests
on them are not checked again.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import (
    IHostResolution,
    IProtocolFactory,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from zope.interface import implementer

from restconsumer.base.types import DestinationRefused
from restconsumer.jobs.destinations import Address, Destinations, refusal

__all__ = ["CheckedEndpoint", "refusal_of", "resolve"]


@implementer(IResolutionReceiver)
class _Addresses:
    """Collects what the reactor's resolver finds for one name."""

    def __init__(self) -> None:
        self.found: list[Address] = []
        self.done: Deferred[list[Address]] = Deferred()

    def resolutionBegan(self, resolution: IHostResolution) -> None:  # the interface's names
        pass

    def addressResolved(self, address: Any) -> None:
        try:
            ip = ipaddress.ip_address(address.host.partition("%")[0])  # an IPv6 zone is not ours
        except (AttributeError, ValueError):
            return
        if ip not in self.found:
            self.found.append(ip)

    def resolutionComplete(self) -> None:
        self.done.callback(self.found)


def resolve(reactor: Any, host: str, port: int) -> Deferred[list[Address]]:
    """The addresses ``host`` has (an IP literal is its own), through the reactor's resolver."""
    try:
        return Deferred.fromCoroutine(_literal(ipaddress.ip_address(host.strip("[]"))))
    except ValueError:
        pass
    receiver = _Addresses()
    reactor.nameResolver.resolveHostName(receiver, host, portNumber=port)
    return receiver.done


async def _literal(address: Address) -> list[Address]:
    return [address]


@implementer(IStreamClientEndpoint)
class CheckedEndpoint:
    """Connects to ``host``:``port`` at an address a limited owner's job may reach.

    ``tls`` (a client connection creator for the host name) wraps the connection when the
    URL is https. Addresses allowed are tried in the resolver's order until one connects;
    if every address is refused, the connection fails with :class:`DestinationRefused`
    saying why (host and address), which dead-letters the record.
    """

    def __init__(self, reactor: Any, host: str, port: int, granted: Destinations, *,
                 timeout: float = 10.0, tls: Any = None) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port
        self._granted = granted
        self._timeout = timeout
        self._tls = tls

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:  # noqa: N803  # the interface's name
        """Resolve, check, connect to a checked address."""
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, factory: IProtocolFactory) -> Any:
        addresses = await resolve(self._reactor, self._host, self._port)
        if not addresses:
            raise DNSLookupError(self._host)  # as any job's lookup that fails: retried
        allowed: list[Address] = []
        reasons: list[str] = []
        for address in addresses:
            reason = refusal(self._host, address, self._granted)
            if reason is None:
                allowed.append(address)
            else:
                reasons.append(reason)
        if not allowed:
            raise DestinationRefused(reasons[0])
        last: BaseException | None = None
        for address in allowed:
            endpoint: Any = (TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint)(
                self._reactor, str(address), self._port, timeout=self._timeout)
            if self._tls is not None:
                endpoint = wrapClientTLS(self._tls, endpoint)
            try:
                return await endpoint.connect(factory)
            except Exception as e:  # the next address, as HostnameEndpoint would
                last = e
        assert last is not None
        raise last


async def refusal_of(reactor: Any, host: str, port: int, granted: Destinations) -> str | None:
    """Why a limited owner's request to ``host`` would be refused now (every address it
    resolves to refused), or None; what :class:`CheckedEndpoint` would decide (a preview
    says it without connecting). A name that does not resolve is not refused here."""
    try:
        addresses = await resolve(reactor, host, port)
    except Exception:  # the lookup failed: delivery would retry, not refuse
        return None
    reasons = [refusal(host, address, granted) for address in addresses]
    return next((r for r in reasons if r), None) if reasons and all(reasons) else None

