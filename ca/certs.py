"""Issued certificates: listing, inspection and (basic) revocation."""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass

import sqlalchemy as sa
from sqlmodel import Session, col, select

from ca.config import Context
from ca.errors import Conflict, InvalidInput, NotFound
from ca.identity import SpiffeId
from ca.revocation import RevocationReason
from ca.serial import Serial
from ca.store.models import CertificateRow

__all__ = [
    "CertStatus",
    "CertificateInfo",
    "get_certificate",
    "list_certificates",
    "revoke_certificate",
]

MAX_PAGE = 1000


class CertStatus(enum.Enum):
    ACTIVE = "active"
    REVOKED = "revoked"
    EXPIRED = "expired"

    @classmethod
    def parse(cls, text: str) -> CertStatus:
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise InvalidInput("status must be one of active, revoked, expired") from None


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    serial: Serial
    spiffe_id: SpiffeId
    status: CertStatus
    profile: str
    not_before: dt.datetime
    not_after: dt.datetime
    fingerprint_sha256: str
    requested_by: str
    created_at: dt.datetime
    revoked_at: dt.datetime | None
    revocation_reason: RevocationReason | None
    revoked_by: str | None
    certificate_pem: str


def _info(row: CertificateRow, now: dt.datetime) -> CertificateInfo:
    # "expired" is derived, not stored: it changes with time, not with any write.
    status = CertStatus(row.status)
    if status is CertStatus.ACTIVE and row.not_after <= now:
        status = CertStatus.EXPIRED
    return CertificateInfo(
        serial=Serial.parse(row.serial),
        spiffe_id=SpiffeId.parse(row.spiffe_id),
        status=status,
        profile=row.profile,
        not_before=row.not_before,
        not_after=row.not_after,
        fingerprint_sha256=row.fingerprint_sha256,
        requested_by=row.requested_by,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        revocation_reason=RevocationReason(row.revocation_reason)
        if row.revocation_reason
        else None,
        revoked_by=row.revoked_by,
        certificate_pem=row.cert_pem,
    )


def list_certificates(
    ctx: Context,
    *,
    spiffe_id: SpiffeId | None = None,
    status: CertStatus | None = None,
    limit: int = 100,
    after: Serial | None = None,
) -> list[CertificateInfo]:
    """Newest-expiry-first is what operators scan for; ordering by serial keeps paging stable."""
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidInput(f"limit must be between 1 and {MAX_PAGE}")
    now = ctx.clock.now()
    query = select(CertificateRow)
    if spiffe_id is not None:
        query = query.where(CertificateRow.spiffe_id == str(spiffe_id))
    if status is CertStatus.REVOKED:
        query = query.where(CertificateRow.status == "revoked")
    elif status is CertStatus.ACTIVE:
        query = query.where(CertificateRow.status == "active", col(CertificateRow.not_after) > now)
    elif status is CertStatus.EXPIRED:
        query = query.where(CertificateRow.status == "active", col(CertificateRow.not_after) <= now)
    if after is not None:
        # Serials are stored as unpadded hex: order by (length, text) to order them numerically.
        key = after.hex
        query = query.where(
            sa.or_(
                sa.func.length(CertificateRow.serial) > len(key),
                sa.and_(
                    sa.func.length(CertificateRow.serial) == len(key),
                    col(CertificateRow.serial) > key,
                ),
            )
        )
    query = query.order_by(sa.func.length(CertificateRow.serial), CertificateRow.serial).limit(
        limit
    )
    with Session(ctx.engine) as session:
        rows = session.exec(query).all()
    return [_info(row, now) for row in rows]


def get_certificate(ctx: Context, serial: Serial) -> CertificateInfo:
    with Session(ctx.engine) as session:
        row = session.get(CertificateRow, serial.hex)
    if row is None:
        raise NotFound(f"no certificate with serial {serial}")
    return _info(row, ctx.clock.now())


def revoke_certificate(
    ctx: Context, serial: Serial, reason: RevocationReason, actor: str
) -> CertificateInfo:
    """Revoke once: a second revocation is a ``Conflict`` so scripts notice they were late."""
    now = ctx.clock.now()
    with Session(ctx.engine) as session:
        result = session.execute(
            sa.update(CertificateRow)
            .where(col(CertificateRow.serial) == serial.hex, col(CertificateRow.status) == "active")
            .values(
                status="revoked",
                revoked_at=now,
                revocation_reason=reason.value,
                revoked_by=actor[:255],
            )
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            if session.get(CertificateRow, serial.hex) is None:
                raise NotFound(f"no certificate with serial {serial}")
            raise Conflict(f"certificate {serial} is already revoked")
        session.commit()
        row = session.get(CertificateRow, serial.hex)
        assert row is not None
        return _info(row, now)
