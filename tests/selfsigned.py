"""Self-signed certificates made on purpose, for tests that need one Trellis did not make: an
attacker's CA, a partner's malformed one, an RSA-1024 CA a gateway must refuse, a certificate
where a CSR belongs, a CA with known defects for a linter. One builder, so each test states only
what is particular to its certificate (its extensions, key and lifetime)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

__all__ = ["CA_KEY_USAGE", "self_signed"]

Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

# keyCertSign and cRLSign, what a CA certificate's keyUsage holds (RFC 5280 4.2.1.3)
CA_KEY_USAGE = x509.KeyUsage(False, False, False, False, False, True, True, False, False)


def self_signed(
    common_name: str,
    *,
    key: Key | None = None,
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    valid_from: dt.timedelta = dt.timedelta(0),
    lifetime: dt.timedelta = dt.timedelta(days=1),
    serial: int | None = None,
) -> tuple[x509.Certificate, Key]:
    """A certificate for ``common_name`` signed by its own key (a new P-256 key unless ``key``),
    valid from now + ``valid_from`` for ``lifetime``, with ``extensions`` as (value, critical)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = dt.datetime.now(dt.UTC) + valid_from
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number() if serial is None else serial)
        .not_valid_before(start)
        .not_valid_after(start + lifetime)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical)
    return builder.sign(key, hashes.SHA256()), key
