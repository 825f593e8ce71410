"""Recording an issued certificate: the last step of every issuance pipeline (SVIDs, TLS
leaves, Istio intermediates), in the caller's transaction, with its audit record."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from cryptography import x509
from sqlmodel import Session

from ca import audit
from ca.pem import certs_pem, fingerprint
from ca.store.core import Insert, insert_now, table
from ca.store.models import CertificateRow

__all__ = ["issued_rows", "record_issued"]

# Built once (see ca.store.core): this runs once per issuance.
_INSERT = sa.insert(table(CertificateRow))


def issued_rows(
    cert: x509.Certificate,
    *,
    pem: bytes | None = None,
    authority: str,
    issuer_ca_id: int,
    profile: str,
    identity: str,
    requested_by: str,
    now: dt.datetime,
    entry_id: str | None = None,
    event: str = "certificate.issued",
    detail: dict[str, Any] | None = None,
) -> tuple[Insert, Insert]:
    """The certificate's row and its audit record, for the caller to insert (a group commit
    inserts those of a whole batch together: ``ca.store.batch.Rows``)."""
    serial = format(cert.serial_number, "x")
    row = {
        "serial": serial,
        "authority": authority,
        "issuer_ca_id": issuer_ca_id,
        "profile": profile,
        "spiffe_id": identity,
        "entry_id": entry_id,
        "fingerprint_sha256": fingerprint(cert),
        "not_before": cert.not_valid_before_utc,
        "not_after": cert.not_valid_after_utc,
        "status": "active",
        "requested_by": requested_by[:255],
        "cert_pem": (pem or certs_pem([cert])).decode(),
        "created_at": now,
    }
    record = audit.entry(
        event,
        identity,
        actor=requested_by,
        at=now,
        detail={
            "serial": serial,
            "profile": profile,
            "authority": authority,
            "not_after": cert.not_valid_after_utc.isoformat(),
            **(detail or {}),
        },
    )
    return (_INSERT, row), (audit.INSERT, record)


def record_issued(session: Session | sa.Connection, cert: x509.Certificate, **fields: Any) -> None:
    """``issued_rows`` inserted now, in the caller's transaction."""
    insert_now(session, *issued_rows(cert, **fields))
