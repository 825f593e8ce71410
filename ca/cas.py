"""CA rows: finding them by name, their certificates, and their unlocked signers (cached per
process: a key is never decrypted per request)."""

from __future__ import annotations

from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlmodel import Session, col, select

from ca.config import Context
from ca.errors import NotFound
from ca.keys import KeyHandle, KeyType, Signer
from ca.store.models import CaRow

__all__ = [
    "ca_certificate",
    "ca_certificate_der",
    "ca_handle",
    "ca_signer",
    "find_ca",
    "load_ca_key",
]


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
    """``root`` and ``intermediate`` name the active ones; anything else is a CA serial (hex)."""
    query = select(CaRow).where(CaRow.authority == authority)
    if selector in ("root", "intermediate"):
        query = query.where(CaRow.role == selector, CaRow.state == "active")
    else:
        query = query.where(CaRow.serial == selector.lower().replace(":", ""))
    row = session.exec(query.order_by(col(CaRow.not_after).desc())).first()
    if row is None:
        raise NotFound(f"no CA {selector[:48]!r} in authority {authority[:32]!r}")
    return row


def ca_certificate_der(ctx: Context, authority: str, selector: str) -> bytes:
    with Session(ctx.engine) as session:
        row = find_ca(session, authority, selector)
    return ca_certificate(ctx, row).public_bytes(serialization.Encoding.DER)
