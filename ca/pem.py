"""PEM in and out: the only byte format that leaves Trellis for humans and most programs."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.errors import InvalidInput

__all__ = ["certs_pem", "fingerprint", "load_certs", "private_key_pem"]


def certs_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


def load_certs(data: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise InvalidInput("not a PEM certificate bundle") from None
    return certs


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lower-case hex (what ``openssl x509 -fingerprint`` shows)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def private_key_pem(key: object) -> bytes:
    """Unencrypted PKCS#8 PEM for keys handed to workloads (their file is 0600)."""
    return key.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
