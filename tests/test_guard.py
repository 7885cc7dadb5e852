"""CheckedEndpoint (restconsumer.delivery.guard): a limited owner's connections go only to
addresses it checked — resolved once per connection, connected to by IP."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import DNSLookupError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from restconsumer.base.types import DestinationRefused
from restconsumer.delivery.guard import CheckedEndpoint
from restconsumer.jobs.destinations import Destinations


class Resolver:
    """Answers each lookup with the next list of addresses (a DNS that rebinds)."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.asked: list[str] = []

    def resolveHostName(self, receiver: Any, host: str, portNumber: int = 0, **_: Any) -> Any:  # noqa: N803
        self.asked.append(host)
        receiver.resolutionBegan(None)
        for text in self.answers.pop(0):
            kind = IPv6Address if ":" in text else IPv4Address
            receiver.addressResolved(kind("TCP", text, portNumber))
        receiver.resolutionComplete()
        return receiver


def reactor_with(resolver: Resolver) -> MemoryReactorClock:
    reactor = MemoryReactorClock()
    reactor.nameResolver = resolver  # type: ignore[attr-defined]
    return reactor


def connect(endpoint: CheckedEndpoint) -> list[Any]:
    seen: list[Any] = []
    endpoint.connect(Factory.forProtocol(Protocol)).addBoth(seen.append)
    return seen


def connected_to(reactor: MemoryReactorClock) -> list[tuple[str, int]]:
    return [(host, port) for host, port, *_ in reactor.tcpClients]


def test_a_rebinding_name_cannot_reach_the_private_address() -> None:
    """Public at the first lookup, loopback at the second: the first connection goes to the
    public address it checked, the second is refused — never a connection to 127.0.0.1."""
    resolver = Resolver(["93.184.216.34"], ["127.0.0.1"])
    reactor = reactor_with(resolver)
    endpoint = CheckedEndpoint(reactor, "rebind.example", 80, Destinations())
    connect(endpoint)
    assert connected_to(reactor) == [("93.184.216.34", 80)]
    second = connect(endpoint)
    assert connected_to(reactor) == [("93.184.216.34", 80)]
    assert isinstance(second[0], Failure) and second[0].check(DestinationRefused)
    assert "rebind.example (127.0.0.1) is a loopback address" in second[0].getErrorMessage()
    assert resolver.asked == ["rebind.example", "rebind.example"]


def test_only_checked_addresses_of_an_answer_are_tried() -> None:
    reactor = reactor_with(Resolver(["169.254.169.254", "10.0.0.1", "2606:4700::1"]))
    connect(CheckedEndpoint(reactor, "mixed.example", 443, Destinations()))
    assert connected_to(reactor) == [("2606:4700::1", 443)]


def test_a_granted_network_or_name_is_reached() -> None:
    reactor = reactor_with(Resolver(["127.0.0.1"], ["10.1.2.3"]))
    connect(CheckedEndpoint(reactor, "localhost", 8080, Destinations.parse(["127.0.0.0/8"])))
    connect(CheckedEndpoint(reactor, "crm.internal", 80, Destinations.parse(["crm.internal"])))
    assert connected_to(reactor) == [("127.0.0.1", 8080), ("10.1.2.3", 80)]


def test_a_literal_address_is_checked_without_a_lookup() -> None:
    resolver = Resolver()
    reactor = reactor_with(resolver)
    refused = connect(CheckedEndpoint(reactor, "127.0.0.1", 80, Destinations()))
    assert refused[0].check(DestinationRefused) and "127.0.0.1 is a loopback" in refused[0].getErrorMessage()
    connect(CheckedEndpoint(reactor, "[::1]", 80, Destinations.parse(["::1"])))
    assert connected_to(reactor) == [("::1", 80)] and resolver.asked == []


def test_an_unspecified_address_is_refused_and_no_address_is_a_lookup_error() -> None:
    reactor = reactor_with(Resolver(["0.0.0.0"], []))
    refused = connect(CheckedEndpoint(reactor, "nowhere.example", 80, Destinations()))
    assert refused[0].check(DestinationRefused)
    failed = connect(CheckedEndpoint(reactor, "nowhere.example", 80, Destinations()))
    assert failed[0].check(DNSLookupError)  # retried, as for any job
    assert connected_to(reactor) == []
