"""The shared leaf modules: reading a URL's origin (base.urls) and PEM certificates (base.pem)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given
from hypothesis import strategies as st

from restconsumer.base.pem import read_certificates, system_certificates
from restconsumer.base.urls import host_of, origin
from tests.infra.certs import make_pki


@pytest.mark.parametrize(("url", "expected"), [
    ("http://Example.COM/x", ("http", "example.com", 80)),
    ("HTTPS://example.com:443/x", ("https", "example.com", 443)),
    ("https://example.com:8443", ("https", "example.com", 8443)),
    ("http://user:pw@[::1]:81/x?y", ("http", "::1", 81)),
    (b"http://10.0.0.1/", ("http", "10.0.0.1", 80)),
])
def test_origin(url: str | bytes, expected: tuple[str, str, int]) -> None:
    assert origin(url) == expected


def test_a_default_port_is_the_same_origin() -> None:
    assert origin("http://a.example/x") == origin("http://a.example:80/y")
    assert origin("http://a.example/x") != origin("https://a.example/x")


def test_a_bad_port_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        origin("http://a.example:99999/")


hosts = st.one_of(
    st.from_regex(r"[a-zA-Z0-9-]{1,20}(\.[a-zA-Z0-9-]{1,20}){0,3}", fullmatch=True),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
)


@given(scheme=st.sampled_from(["http", "https"]), host=hosts,
       port=st.none() | st.integers(1, 65535), user=st.none() | st.from_regex(r"[a-z]{1,5}(:[a-z@]{0,5})?",
                                                                               fullmatch=True),
       rest=st.sampled_from(["", "/", "/a/b", "/a?x=1", "/p@q"]))
def test_host_of_reads_the_host_as_origin_does(scheme: str, host: str, port: int | None, user: str | None,
                                               rest: str) -> None:
    """The per-request shortcut and the parser agree on every URL a job can make."""
    url = f"{scheme}://{user + '@' if user else ''}{host}{f':{port}' if port else ''}{rest}"
    assert host_of(url.encode()) == origin(url)[1] == (urlsplit(url).hostname or "")


def test_read_certificates(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    pem = pki.ca_file.read_bytes()
    assert len(read_certificates(pem + pem)) == 2
    with pytest.raises(ValueError, match="no PEM certificate"):
        read_certificates(b"hello")
    with pytest.raises(ValueError, match="damaged"):
        read_certificates(pem.replace(b"\n", b"\n!", 3))


def test_system_certificates_are_read() -> None:
    """The system's CAs, each once (Debian's folder holds links to them too)."""
    found = system_certificates()
    assert len(found) > 10
    assert len({c.public_bytes(Encoding.DER) for c in found}) == len(found)
