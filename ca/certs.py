"""Issued certificates: listing, inspection and (basic) revocation."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlmodel import Session, col, select

from ca import audit, metrics
from ca.config import Context
from ca.crl import refresh_crl_if_signable
from ca.errors import Conflict, InvalidInput, NotFound, TrellisError
from ca.identity import SpiffeId
from ca.logs import REQUEST_ID
from ca.paging import MAX_PAGE, Page, check_limit, page
from ca.progress import Progress, report
from ca.revocation import RevocationReason
from ca.serial import Serial
from ca.store import locks
from ca.store.models import AuthorityRow, CaRow, CertificateRow, UtcDateTime

__all__ = [
    "MAX_PAGE",
    "CertStatus",
    "CertificateInfo",
    "Page",
    "Revocation",
    "certificate_info",
    "certificate_page",
    "get_certificate",
    "list_certificates",
    "publish_revocations",
    "revoke_certificate",
    "revoke_identity",
    "withdrawn_unless_delivered",
]

log = logging.getLogger("trellis.certs")


class CertStatus(enum.Enum):
    ACTIVE = "active"
    REVOKED = "revoked"
    EXPIRED = "expired"

    @classmethod
    def parse(cls, text: str) -> CertStatus:
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise InvalidInput(
                f"invalid status {text[:20]!r}: active, revoked or expired"
            ) from None


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """An issued certificate as recorded. The store's ``spiffe_id`` column holds each
    certificate's identity: a SPIFFE ID for SVIDs and Istio intermediates, a ``CN=...`` name for
    OpenVPN and gateway certificates (those authorities have no trust domain)."""

    serial: Serial
    identity: str  # the SPIFFE ID of an SVID; "CN=<name>" style for other profiles
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
    revocation_request_id: str | None
    invalidity_date: dt.datetime | None
    issuer_ca_id: int
    certificate_pem: str
    # Set only on the answer to a revocation: why the issuer's CRL was not re-signed to list it
    # (the issuer is revoked itself and its key is gone: ``ca.crl.refresh_crl_if_signable``).
    crl_skipped: str | None = None

    @property
    def spiffe_id(self) -> SpiffeId | None:
        return SpiffeId.parse(self.identity) if self.identity.startswith("spiffe://") else None


def certificate_info(row: CertificateRow, now: dt.datetime) -> CertificateInfo:
    # "expired" is derived, not stored: it changes with time, not with any write.
    status = CertStatus(row.status)
    if status is CertStatus.ACTIVE and row.not_after <= now:
        status = CertStatus.EXPIRED
    return CertificateInfo(
        serial=Serial.parse(row.serial),
        identity=row.spiffe_id,
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
        revocation_request_id=row.revocation_request_id,
        invalidity_date=row.invalidity_date,
        issuer_ca_id=row.issuer_ca_id,
        certificate_pem=row.cert_pem,
    )


def list_certificates(
    ctx: Context,
    *,
    spiffe_id: SpiffeId | None = None,
    status: CertStatus | None = None,
    expiring_within: dt.timedelta | None = None,
    limit: int = 100,
    after: Serial | None = None,
) -> list[CertificateInfo]:
    """One page, in serial order; or, with ``expiring_within``, the live certificates that
    expire within that time, soonest first (what operators scan for). Paging continues after
    the serial of a page's last item either way (keyset pagination: a page costs the same at
    row 10 or at row 1,000,000; indexes in migration 0012), which must be a stored certificate's
    (``InvalidInput`` otherwise)."""
    check_limit(limit)
    return _listed(ctx, spiffe_id, status, expiring_within, limit, after)


def _listed(
    ctx: Context,
    spiffe_id: SpiffeId | None,
    status: CertStatus | None,
    expiring_within: dt.timedelta | None,
    limit: int,
    after: Serial | None,
) -> list[CertificateInfo]:
    now = ctx.clock.now()
    with Session(ctx.engine) as session:  # the cursor row and the page: one checkout
        return _page(session, now, spiffe_id, status, expiring_within, limit, after)


def _page(
    session: Session,
    now: dt.datetime,
    spiffe_id: SpiffeId | None,
    status: CertStatus | None,
    expiring_within: dt.timedelta | None,
    limit: int,
    after: Serial | None,
) -> list[CertificateInfo]:
    query = select(CertificateRow)
    if spiffe_id is not None:
        query = query.where(CertificateRow.spiffe_id == str(spiffe_id))
    if expiring_within is not None:
        if status not in (None, CertStatus.ACTIVE):
            raise InvalidInput("expiring_within lists live certificates: use no other status")
        if expiring_within.total_seconds() <= 0:
            raise InvalidInput("expiring_within must be a positive duration")
        status = CertStatus.ACTIVE
        query = query.where(col(CertificateRow.not_after) <= now + expiring_within)
    if status is CertStatus.REVOKED:
        query = query.where(CertificateRow.status == "revoked")
    elif status is CertStatus.ACTIVE:
        query = query.where(CertificateRow.status == "active", col(CertificateRow.not_after) > now)
    elif status is CertStatus.EXPIRED:
        query = query.where(CertificateRow.status == "active", col(CertificateRow.not_after) <= now)
    # The cursor is a serial a page ended with, so it names a stored certificate: compared
    # with the stored (hex text) serials, any other value orders as text, not as the number it
    # is ("abcdef" sorted after every serial of 38 digits, "0x10" before them all).
    last = None if after is None else session.get(CertificateRow, after.hex)
    if after is not None and last is None:
        raise InvalidInput(f"certificate {after} is not there to page after")
    if expiring_within is not None:
        if last is not None:
            query = query.where(
                sa.tuple_(col(CertificateRow.not_after), col(CertificateRow.serial))
                > sa.tuple_(sa.literal(last.not_after, UtcDateTime()), sa.literal(last.serial))
            )
        query = query.order_by(col(CertificateRow.not_after), col(CertificateRow.serial))
        query = query.limit(limit)
    else:
        # Ordered by the stored serial (hex text): any total order pages stably, and this one
        # is the primary key's, so a page is an index range at any depth. (Random serials have
        # no meaningful order; numeric order would need an expression index.)
        if last is not None:
            query = query.where(col(CertificateRow.serial) > last.serial)
        query = query.order_by(col(CertificateRow.serial)).limit(limit)
    rows = session.exec(query).all()
    return [certificate_info(row, now) for row in rows]


def certificate_page(
    ctx: Context,
    *,
    spiffe_id: SpiffeId | None = None,
    status: CertStatus | None = None,
    expiring_within: dt.timedelta | None = None,
    limit: int = 100,
    after: Serial | None = None,
) -> Page[CertificateInfo]:
    """``list_certificates`` for a reader who pages (REST, ``trellis certs list``),
    through ``ca.paging.page``."""

    def read(n: int) -> list[CertificateInfo]:
        return _listed(ctx, spiffe_id, status, expiring_within, n, after)

    return page(limit, read, lambda info: info.serial)


def get_certificate(ctx: Context, serial: Serial) -> CertificateInfo:
    with Session(ctx.engine) as session:
        row = session.get(CertificateRow, serial.hex)
    if row is None:
        raise NotFound(f"no certificate with serial {serial}")
    return certificate_info(row, ctx.clock.now())


@dataclass(frozen=True, slots=True)
class Revocation:
    """Who revokes, why, and under which request: recorded on every revoked certificate and in
    its audit record. The request is the one being served when this is made
    (``ca.logs.REQUEST_ID``: a REST request's id, set by ``api.requestid``, or a CLI command's
    ``cli-<hex>``, set by ``cli.common``), so no caller passes it down and none can name
    another request's."""

    reason: RevocationReason
    actor: str
    invalidity_date: dt.datetime | None = None
    request_id: str | None = field(default_factory=REQUEST_ID.get, init=False)


def _revoke_rows(
    ctx: Context,
    session: Session,
    serials: list[str],
    revocation: Revocation,
    now: dt.datetime,
    progress: Progress | None = None,
) -> dict[int, str]:
    """Mark rows revoked and re-sign their issuers' CRLs in the caller's transaction. Returns,
    per issuer whose CRL could not be signed (a revoked CA whose key is gone), why: the
    certificates are revoked all the same, their status (and OCSP) says so, and the root's CRL
    already lists their issuer."""
    session.execute(
        sa.update(CertificateRow)
        .where(col(CertificateRow.serial).in_(serials), col(CertificateRow.status) == "active")
        .values(
            status="revoked",
            revoked_at=now,
            revocation_reason=revocation.reason.value,
            revoked_by=revocation.actor[:255],
            revocation_request_id=(revocation.request_id or "")[:64] or None,
            invalidity_date=revocation.invalidity_date,
        )
    )
    for done, serial in enumerate(serials):
        report(progress, done, len(serials))
        audit.record(
            session,
            "certificate.revoked",
            serial,
            actor=revocation.actor,
            at=now,
            detail={"reason": revocation.reason.value},
            request_id=revocation.request_id,
        )
    for authority in session.exec(
        select(CertificateRow.authority).where(col(CertificateRow.serial).in_(serials))
    ).all():
        metrics.REVOKED.labels(authority, revocation.reason.value).inc()
    issuers = session.exec(
        select(CertificateRow.issuer_ca_id)
        .where(col(CertificateRow.serial).in_(serials))
        .distinct()
    ).all()
    skipped: dict[int, str] = {}
    for ca_id in issuers:
        ca = session.get(CaRow, ca_id)
        assert ca is not None
        if (why := refresh_crl_if_signable(ctx, session, ca)) is not None:
            skipped[ca_id] = why
    return skipped


def _revoked_info(
    row: CertificateRow, now: dt.datetime, skipped: dict[int, str]
) -> CertificateInfo:
    info = certificate_info(row, now)
    return dataclasses.replace(info, crl_skipped=skipped.get(row.issuer_ca_id))


@contextlib.contextmanager
def withdrawn_unless_delivered(ctx: Context, serial: Serial, actor: str) -> Iterator[None]:
    """Around what hands an issued certificate over (with its key, where Trellis generated one
    and keeps no copy): if it fails, the certificate is revoked (superseded) and the failure
    re-raised, whatever it is. Ctrl-C (``cli.launch.Interrupted``) and other ``BaseException``
    included: a certificate its requester never got, or whose key is lost, must not stay live,
    counted against a consumer's limit or a VPN name, and trusted until it expires."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Conflict):  # already withdrawn on the way out
            revoke_certificate(ctx, serial, RevocationReason.SUPERSEDED, actor)
        raise


def revoke_certificate(
    ctx: Context,
    serial: Serial,
    reason: RevocationReason,
    actor: str,
    *,
    invalidity_date: dt.datetime | None = None,
    publish: bool = True,
) -> CertificateInfo:
    """Revoke once: a second revocation is a ``Conflict`` so scripts notice they were late.

    The issuer's CRL is re-signed in the same transaction: when this returns, CRL and OCSP
    already say "revoked". The one exception is an issuer revoked itself whose key is gone: its
    CRL cannot be signed, and the answer's ``crl_skipped`` says why.
    """
    now = ctx.clock.now()
    if invalidity_date is not None and invalidity_date.tzinfo is None:
        raise InvalidInput("the invalidity date needs a time zone")
    # RFC 5280 §5.3.2: when the key is known or suspected to have been compromised, or the
    # certificate otherwise became invalid: a date still to come says neither.
    if invalidity_date is not None and invalidity_date > now:
        raise InvalidInput(
            f"the invalidity date {invalidity_date.isoformat()} is in the future: it is when"
            " the key was (or may have been) compromised"
        )
    revocation = Revocation(reason, actor, invalidity_date)
    with Session(ctx.engine) as session:
        # Before the status is read: a second revocation waits for this one and is refused, and
        # a renewal of this certificate either commits first or sees it revoked (ca.store.locks)
        locks.withdrawing(session.connection(), locks.certificate_name(serial.hex))
        row = session.get(CertificateRow, serial.hex, with_for_update=True)
        if row is None:
            raise NotFound(f"no certificate with serial {serial}")
        if row.status != "active":
            raise Conflict(f"certificate {serial} is already revoked")
        # The date a key of this certificate was compromised, or the certificate became
        # invalid: before its validity began, neither had happened yet (RFC 5280 §5.3.2).
        if invalidity_date is not None and invalidity_date < row.not_before:
            raise InvalidInput(
                f"the invalidity date {invalidity_date.isoformat()} is before the certificate"
                f" was valid (notBefore {row.not_before.isoformat()}): it is when the key was"
                " (or may have been) compromised"
            )
        skipped = _revoke_rows(ctx, session, [row.serial], revocation, now)
        session.commit()
        session.refresh(row)
        info = _revoked_info(row, now, skipped)
    if publish:  # callers that rewrite the files themselves (and report them) pass False
        publish_revocations(ctx, {row.authority})
    return info


def revoke_identity(
    ctx: Context,
    spiffe_id: SpiffeId,
    reason: RevocationReason,
    actor: str,
    *,
    progress: Progress | None = None,
) -> list[CertificateInfo]:
    """Revoke every live (active, unexpired) certificate of one identity, all or nothing.
    ``progress`` counts certificates; the last one counts once all of them are committed."""
    now = ctx.clock.now()
    revocation = Revocation(reason, actor)
    with Session(ctx.engine) as session:
        # Before the certificates are read: a renewal of one of them under way commits first,
        # and its certificate is revoked with the others, or it waits and is refused. A
        # SELECT ... FOR UPDATE alone could not lock what it committed later (ca.store.locks).
        locks.withdrawing(session.connection(), locks.identity_name(str(spiffe_id)))
        rows = session.exec(
            select(CertificateRow)
            .where(
                CertificateRow.spiffe_id == str(spiffe_id),
                CertificateRow.status == "active",
                col(CertificateRow.not_after) > now,
            )
            .with_for_update()
        ).all()
        if not rows:
            raise NotFound(f"no live certificates for {spiffe_id}")
        serials = [row.serial for row in rows]
        skipped = _revoke_rows(ctx, session, serials, revocation, now, progress)
        session.commit()
        report(progress, len(serials), len(serials))
        for row in rows:
            session.refresh(row)
        infos = [_revoked_info(row, now, skipped) for row in rows]
    publish_revocations(ctx, {row.authority for row in rows})
    return infos


def publish_revocations(ctx: Context, authorities: set[str]) -> list[str]:
    """Push fresh CRLs to the files programs read (OpenVPN's crl-verify, nginx's ssl_crl) right
    after a revocation commits, whichever command revoked. Failures are logged, not raised: the
    revocation stands, and the scheduled jobs retry the files. Returned, each as a sentence that
    names no server path (``TrellisError.public``), for callers whose answer reports them."""
    from ca import gateway, openvpn  # feature modules import this one

    with Session(ctx.engine) as session:
        purposes = {
            name: row.purpose
            for name in authorities
            if (row := session.get(AuthorityRow, name)) is not None
        }
    failures = []
    for name, purpose in purposes.items():
        try:
            if purpose == "openvpn":
                openvpn.write_crl_file(ctx, name)
            elif purpose == "gateway":
                gateway.refresh_truststores(ctx)
        except TrellisError as error:
            log.warning("revoked, but could not rewrite the %s CRL files: %s", name, error.detail)
            failures.append(f"the {name} CRL files were not rewritten: {error.public}")
    return failures
