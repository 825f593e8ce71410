"""CA rows: finding them by name, their certificates, and their unlocked signers (cached per
process: a key is never decrypted per request)."""

from __future__ import annotations

from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from sqlmodel import Session, col, select

from ca.config import Context
from ca.errors import InvalidInput, NotFound
from ca.keys import KeyHandle, KeyType, Signer
from ca.serial import Serial
from ca.store.models import AuthorityRow, CaRow

__all__ = [
    "CertifiedKey",
    "ca_certificate",
    "ca_certificate_der",
    "ca_handle",
    "ca_signer",
    "find_ca",
    "find_crl_issuer",
    "load_ca_key",
    "signing_keys",
]


# A key and the public key of the certificate it signs as (``KeyStore.check``).
CertifiedKey = tuple[KeyHandle, CertificatePublicKeyTypes]


class _KeyColumns(Protocol):
    """A row that names a key (a CA's, an OCSP responder's): where it lives and its type."""

    key_backend: str
    key_ref: str
    key_type: str


def ca_handle(row: _KeyColumns) -> KeyHandle:
    return KeyHandle(row.key_backend, row.key_ref, KeyType(row.key_type))


def load_ca_key(ctx: Context, row: CaRow) -> Signer:
    """The CA's key, proven to be the private half of the CA certificate's public key: every
    signature it makes is then checked against the certificate relying parties hold
    (docs/vault.md), not against whatever key the store now keeps under the name."""
    return ctx.keys.load(ca_handle(row), certified=ca_certificate(ctx, row).public_key())


def signing_keys(ctx: Context, backend: str) -> list[CertifiedKey]:
    """The keys in ``backend`` of every CA that may still sign (active or prepared, never
    revoked), each once and paired with the public key of its CA certificate: what ``trellis
    vault check`` looks at."""
    with Session(ctx.engine) as session:
        rows = session.exec(
            select(CaRow).where(
                CaRow.key_backend == backend,
                col(CaRow.state).in_(("active", "prepared")),
                col(CaRow.revoked_at).is_(None),
            )
        ).all()
    keys: dict[KeyHandle, CertificatePublicKeyTypes] = {}
    for row in rows:
        keys.setdefault(ca_handle(row), ca_certificate(ctx, row).public_key())
    return list(keys.items())


def ca_signer(ctx: Context, row: CaRow) -> Signer:
    key = ("signer", row.id)
    cached = ctx.cache.get(key)
    if isinstance(cached, Signer):
        return cached
    signer = load_ca_key(ctx, row)
    ctx.cache[key] = signer
    return signer


def ca_certificate(ctx: Context, row: CaRow) -> x509.Certificate:
    key = ("cert", row.id)
    cached = ctx.cache.get(key)
    if isinstance(cached, x509.Certificate):
        return cached
    cert = x509.load_pem_x509_certificate(row.cert_pem.encode())
    ctx.cache[key] = cert
    return cert


def find_ca(session: Session, authority: str, selector: str) -> CaRow:
    """``root`` and ``intermediate`` name the active ones; anything else is a CA serial in hex,
    written as operators paste serials (``0x…``, colons, any case: ``Serial.parse``)."""
    query = select(CaRow).where(CaRow.authority == authority)
    if selector in ("root", "intermediate"):
        query = query.where(CaRow.role == selector, CaRow.state == "active")
    else:
        try:
            serial = Serial.parse(selector)
        except InvalidInput:
            raise InvalidInput(
                f"invalid CA {selector[:48]!r}: root, intermediate or a CA serial in hex"
            ) from None
        query = query.where(CaRow.serial == serial.hex)
    row = session.exec(query.order_by(col(CaRow.not_after).desc())).first()
    if row is None:
        from ca.authority import no_such_authority  # ca.authority imports this module

        # No CA because no authority: say which (mesh and gateway before their init: 7 / 503).
        if session.get(AuthorityRow, authority) is None:
            raise no_such_authority(authority)
        raise NotFound(f"no CA {selector[:48]!r} in authority {authority[:32]!r}")
    return row


def find_crl_issuer(session: Session, authority: str, selector: str) -> CaRow:
    """``find_ca`` for CRLs: a cross certificate is a second certificate of another root's
    key and name, not a CRL issuer. A CRL for it would be signed by that root under the
    root's name and key identifier with a CRL-number sequence of its own, one that lists
    nothing: RFC 5280 §5.2.3 wants one increasing sequence per issuer, and such a CRL, with
    a genuine signature, could be passed off as the root's to hide a revocation."""
    row = find_ca(session, authority, selector)
    if row.role == "cross":
        raise NotFound(
            f"no CRL for {selector[:48]!r} in authority {authority[:32]!r}: it is a cross"
            " certificate, and its subject root's CRL covers what that key signs"
        )
    return row


def ca_certificate_der(ctx: Context, authority: str, selector: str) -> bytes:
    with Session(ctx.engine) as session:
        row = find_ca(session, authority, selector)
    return ca_certificate(ctx, row).public_bytes(serialization.Encoding.DER)
