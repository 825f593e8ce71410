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
from ca.store.models import AuthorityRow, CaRow, OcspResponderRow

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


def signing_keys(
    ctx: Context, backend: str | None = None, *, prepared: bool = True
) -> list[CertifiedKey]:
    """Every key this instance signs with, each once and paired with the public key of the
    certificate it signs as: what ``trellis vault check`` (``backend``: its keys only) and
    ``/readyz`` (``prepared=False``: the keys that sign now) look at, with one rule for both.

    The keys of the CAs that may sign (roots and intermediates, active and, unless ``prepared``
    is false, prepared; never revoked: a cross certificate is a second certificate of a root's
    key, which its root's row covers) and of those CAs' OCSP responders still valid: a delegated
    id-pkix-ocsp-nocheck responder's key is as much a CA key as the CA's own (whoever has it can
    answer "good" for a revoked certificate until the responder expires), docs/vault.md. Not a
    file-backed responder's: its key lives on the replica that made it, and another replica
    that lacks it answers OCSP ``tryLater`` and serves everything else (docs/revocation.md)."""
    states = ("active", "prepared") if prepared else ("active",)
    with Session(ctx.engine) as session:
        rows = session.exec(
            select(CaRow).where(
                col(CaRow.role).in_(("root", "intermediate")),
                col(CaRow.state).in_(states),
                col(CaRow.revoked_at).is_(None),
            )
        ).all()
        responders = session.exec(
            select(OcspResponderRow).where(
                col(OcspResponderRow.ca_id).in_([row.id for row in rows]),
                col(OcspResponderRow.not_after) > ctx.clock.now(),
                OcspResponderRow.key_backend != "file",
            )
        ).all()
    keys: dict[KeyHandle, CertificatePublicKeyTypes] = {}
    for row in rows:
        keys.setdefault(ca_handle(row), ca_certificate(ctx, row).public_key())
    for responder in responders:
        cert = x509.load_pem_x509_certificate(responder.cert_pem.encode())
        keys.setdefault(ca_handle(responder), cert.public_key())
    return [key for key in keys.items() if backend in (None, key[0].backend)]


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
