"""Reading PEM certificates: the one reader (cryptography's) for every CA the service is given."""

from __future__ import annotations

import re
import ssl as stdlib_ssl
import warnings
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import Certificate, load_pem_x509_certificate, load_pem_x509_certificates

__all__ = ["read_certificates", "system_certificates"]

_BEGIN = b"-----BEGIN CERTIFICATE-----"
_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def read_certificates(pem: bytes) -> list[Certificate]:
    """Every certificate of a PEM bundle; ValueError saying what is wrong with it."""
    if _BEGIN not in pem:
        raise ValueError("no PEM certificate in it")
    try:
        return load_pem_x509_certificates(pem)
    except ValueError:
        raise ValueError("a certificate in it is damaged (not valid PEM)") from None


def system_certificates() -> list[Certificate]:
    """The CAs OpenSSL trusts by default (``SSL_CERT_FILE``/``SSL_CERT_DIR``, else the
    system's), read from where ``ssl.get_default_verify_paths`` says they are.

    Read one by one: a CA of the system's bundle that this cryptography refuses is left
    out rather than the whole bundle.
    """
    paths = stdlib_ssl.get_default_verify_paths()
    files = [Path(paths.cafile)] if paths.cafile else []
    if not files and paths.capath:
        files = sorted(p for p in Path(paths.capath).iterdir() if p.is_file())
    found: dict[bytes, Certificate] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. old CAs' negative serial numbers
        for path in files:
            try:
                pem = path.read_bytes()
            except OSError:
                continue
            for block in _BLOCK.findall(pem):
                try:
                    cert = load_pem_x509_certificate(block)
                except ValueError:
                    continue
                found.setdefault(cert.public_bytes(Encoding.DER), cert)  # capath holds links too
    return list(found.values())
