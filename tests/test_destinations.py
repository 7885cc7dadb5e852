"""What a limited owner's jobs may reach (restconsumer.jobs.destinations, SPEC §8)."""

from __future__ import annotations

import ipaddress

import pytest

from restconsumer.jobs.destinations import Destinations, refusal, why_refused
from restconsumer.jobs.model import InvalidJob, Policy, validate


@pytest.mark.parametrize(("address", "kind"), [
    ("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"),
    ("10.0.0.1", "private"), ("172.16.0.1", "private"), ("172.31.255.254", "private"),
    ("192.168.1.1", "private"),
    ("100.64.0.1", "non-public"), ("100.127.255.254", "non-public"),
    ("169.254.169.254", "link-local"), ("169.254.0.1", "link-local"),
    ("224.0.0.1", "multicast"), ("239.1.2.3", "multicast"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"),
    ("0.0.0.0", "unspecified"),
    ("::1", "loopback"), ("fc00::1", "unique-local"), ("fd12:3456::1", "unique-local"),
    ("fe80::1", "link-local"), ("ff02::1", "multicast"), ("::", "unspecified"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.1.1.1", "private"),
    ("::ffff:169.254.169.254", "link-local"), ("::ffff:100.64.0.1", "non-public"),
    ("2002:7f00:1::", "6to4 (loopback)"),
])
def test_refused_addresses(address: str, kind: str) -> None:
    assert why_refused(ipaddress.ip_address(address)) == kind


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700::1111",
                                     "::ffff:8.8.8.8", "2002:808:808::"])
def test_public_addresses(address: str) -> None:
    assert why_refused(ipaddress.ip_address(address)) is None


def test_the_grammar_names_suffixes_and_networks() -> None:
    granted = Destinations.parse(["CRM.Internal.", "*.corp.example", "10.20.0.0/16", "127.0.0.1",
                                  "[::1]", "fd00::/8", "bücher.example"])
    assert granted.names == {"crm.internal", "xn--bcher-kva.example"}
    assert granted.suffixes == (".corp.example",)
    assert [str(n) for n in granted.networks] == ["10.20.0.0/16", "127.0.0.1/32", "::1/128", "fd00::/8"]


def test_what_is_granted() -> None:
    granted = Destinations.parse(["crm.internal", "*.corp.example", "10.20.0.0/16"])
    private = ipaddress.ip_address("10.9.9.9")
    assert granted.grants("crm.internal", private)  # a granted name, wherever it resolves
    assert granted.grants("CRM.INTERNAL.", private)
    assert granted.grants("a.b.corp.example", private)
    assert not granted.grants("corp.example", private)  # a suffix is what is under it
    assert not granted.grants("evilcorp.example", private)
    assert granted.grants("x.example", ipaddress.ip_address("10.20.3.4"))  # a granted network
    assert granted.grants("x.example", ipaddress.ip_address("::ffff:10.20.3.4"))
    assert not granted.grants("x.example", private)
    assert not granted.grants("x.example")


def test_refusal_names_the_host_and_the_address() -> None:
    loopback = ipaddress.ip_address("127.0.0.1")
    assert refusal("localhost", loopback, None) is None  # an admin job: not limited here
    reason = refusal("localhost", loopback, Destinations())
    assert reason is not None and "localhost (127.0.0.1)" in reason and "loopback" in reason
    assert refusal("127.0.0.1", loopback, Destinations.parse(["127.0.0.1"])) is None
    assert refusal("example.com", ipaddress.ip_address("93.184.216.34"), Destinations()) is None
    reason = refusal("[::1]", ipaddress.ip_address("::1"), Destinations())
    assert reason is not None and reason.startswith("::1 is a loopback address")


@pytest.mark.parametrize("entry", ["bad host", "10.0.0.0/33", "*.", "", "-x.example", "a..b", 7])
def test_entries_that_are_none_of_the_three_are_refused(entry: object) -> None:
    with pytest.raises(ValueError) as caught:
        Destinations.parse(["ok.example", entry])  # type: ignore[list-item]
    assert repr(entry) in str(caught.value)


def test_every_bad_entry_is_named() -> None:
    with pytest.raises(ValueError) as caught:
        Destinations.parse(["bad host", "ok.example", "300.1.1.1/8"])
    assert "'bad host'" in str(caught.value) and "'300.1.1.1/8'" in str(caught.value)


def _job(url: str, owner: str = "tenant", **more: object) -> dict[str, object]:
    return {"id": "j", "owner": owner, "type": "POST", "topic": "t", "datamap": {"id": "$.id"},
            "url": url, **more}


def test_a_literal_refused_address_is_a_400_for_a_limited_owner_only() -> None:
    policy = Policy(destinations={"tenant": Destinations(), "lab": Destinations.parse(["10.0.0.0/8"])})
    with pytest.raises(InvalidJob) as caught:
        validate(_job("http://169.254.169.254/latest/{id}"), policy=policy)
    [problem] = caught.value.problems
    assert problem.field == "url" and "169.254.169.254 is a link-local address" in problem.reason
    with pytest.raises(InvalidJob) as caught:
        validate(_job("http://[::1]:8080/{id}"), policy=policy)
    assert [p.field for p in caught.value.problems] == ["url"]
    validate(_job("http://10.1.2.3/{id}", owner="lab"), policy=policy)  # granted
    validate(_job("http://127.0.0.1/{id}", owner="ops"), policy=policy)  # not a tokens-file owner
    validate(_job("http://localhost/{id}"), policy=policy)  # a name: checked when sent
    validate(_job("https://93.184.216.34/{id}"), policy=policy)  # public


def test_the_token_endpoint_of_a_limited_owner_is_checked_too() -> None:
    policy = Policy(destinations={"tenant": Destinations()})
    oauth2 = {"token_url": "http://10.0.0.5/token", "client_id": "c", "client_secret": "s"}
    with pytest.raises(InvalidJob) as caught:
        validate(_job("https://api.example/{id}", oauth2=oauth2), policy=policy)
    assert [p.field for p in caught.value.problems] == ["oauth2.token_url"]
