"""Certificate revocation lists: one v2 CRL per CA, re-signed on every revocation.

The CRL of a CA is regenerated inside the transaction that revokes something it issued, so once
a revocation commits, the stored CRL already lists it; every replica serves the stored row, so
replicas agree as soon as they read the database. A scheduled job re-signs CRLs well before
``nextUpdate`` (an expired CRL makes OpenVPN and nginx refuse everybody).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, SQLModel, col, select

from ca.cas import ca_certificate, ca_signer, find_crl_issuer
from ca.config import Context
from ca.errors import Unavailable
from ca.keys import PrivateKey
from ca.profiles import BACKDATE
from ca.revocation import RevocationReason
from ca.store.models import CaRow, CertificateRow, CrlIssuerRow, CrlRow

__all__ = [
    "CRL_LIFETIME",
    "Crl",
    "build_crl",
    "current_crl",
    "refresh_crl",
    "refresh_crl_if_signable",
    "refresh_stale_crls",
]

log = logging.getLogger("trellis.crl")

CRL_LIFETIME = dt.timedelta(hours=24)
# Re-sign when less than this much of a CRL's life is left; the scheduler runs far more often.
REFRESH_BEFORE = CRL_LIFETIME * 2 / 3


@dataclass(frozen=True, slots=True)
class Crl:
    ca_serial: str
    number: int
    this_update: dt.datetime
    next_update: dt.datetime
    der: bytes

    @property
    def pem(self) -> bytes:
        crl = x509.load_der_x509_crl(self.der)
        return crl.public_bytes(serialization.Encoding.PEM)


def _entry(
    serial: str, revoked_at: dt.datetime, reason: str | None, invalidity: dt.datetime | None
) -> x509.RevokedCertificate:
    builder = (
        x509.RevokedCertificateBuilder().serial_number(int(serial, 16)).revocation_date(revoked_at)
    )
    # RFC 5280 §5.3.1: the reason code "unspecified" SHOULD be omitted rather than stated.
    if reason and reason != RevocationReason.UNSPECIFIED.value:
        builder = builder.add_extension(
            x509.CRLReason(RevocationReason(reason).flag), critical=False
        )
    if invalidity is not None:
        builder = builder.add_extension(
            x509.InvalidityDate(invalidity.replace(tzinfo=None)), critical=False
        )
    return builder.build()


def _revoked(session: Session, ca: CaRow, now: dt.datetime) -> list[x509.RevokedCertificate]:
    """Revoked and not yet expired: expired certificates drop off (RFC 5280 §3.3 permits it).
    A root's CRL lists its revoked intermediates and anything else it signed (Istio plug-in
    intermediates are recorded as certificates issued by the root)."""
    rows = session.execute(
        sa.select(
            col(CertificateRow.serial),
            col(CertificateRow.revoked_at),
            col(CertificateRow.revocation_reason),
            col(CertificateRow.invalidity_date),
        ).where(
            col(CertificateRow.issuer_ca_id) == ca.id,
            col(CertificateRow.status) == "revoked",
            col(CertificateRow.not_after) > now,
        )
    ).all()
    entries = [_entry(serial, at, reason, invalid) for serial, at, reason, invalid in rows]
    if ca.role == "root":
        cas = session.exec(
            select(CaRow).where(
                CaRow.parent_id == ca.id,
                col(CaRow.revoked_at).is_not(None),
                col(CaRow.not_after) > now,
            )
        ).all()
        entries += [
            _entry(c.serial, c.revoked_at, c.revocation_reason, None) for c in cas if c.revoked_at
        ]
    return entries


def _insert(session: Session, table: type[SQLModel]) -> postgresql.Insert | sqlite.Insert:
    """INSERT with the ON CONFLICT clauses of the session's database."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def _next_number(session: Session, issuer_name: str, floor: int) -> int:
    """The next CRL number under ``issuer_name``, in one statement that also locks the name's
    counter until commit (``CrlIssuerRow``: RFC 5280 §5.2.3 counts per issuer name, which the
    CAs that succeed one another share). Concurrent signers under one name, on one replica or
    several, get increasing numbers in commit order; a name's first CRL is numbered 1.

    ``floor``: above any number the instance a backup was taken of signed before it was
    restored here (``ca.restored.crl_numbers_from``)."""
    bumped = col(CrlIssuerRow.number) + 1
    statement = (
        _insert(session, CrlIssuerRow)
        .values(name=issuer_name, number=max(1, floor))
        .on_conflict_do_update(
            index_elements=["name"], set_={"number": sa.case((bumped > floor, bumped), else_=floor)}
        )
        .returning(col(CrlIssuerRow.number))
    )
    number: int = session.execute(statement).scalar_one()
    return number


def _highest_stored(session: Session, issuer_name: str) -> int:
    """The highest number of a CRL stored under ``issuer_name``. Never above the name's counter
    when Trellis of this schema signed them all; above it when a Trellis from before the counter
    (schema 0018) went on serving after ``trellis migrate`` (docs/operations.md lets an
    outdated server serve on): it numbered each CA's CRLs on from its own, and the counter,
    behind, gave a number already used, for another CRL (RFC 5280 §5.2.3: they only grow)."""
    highest = session.execute(
        sa.select(sa.func.max(CrlRow.number))
        .join(CaRow, col(CaRow.id) == col(CrlRow.ca_id))
        .where(col(CaRow.subject) == issuer_name)
    ).scalar_one()
    return int(highest or 0)


def _locked_row(session: Session, ca_id: int, this_update: dt.datetime) -> CrlRow:
    """The CA's CRL row, locked. A missing row is created first with INSERT ... ON CONFLICT DO
    NOTHING: locking a row that does not exist yet would lock nothing. Its number 0 says "no CRL
    yet" until the caller stores the first one, in the same transaction."""
    session.execute(
        _insert(session, CrlRow)
        .values(ca_id=ca_id, number=0, this_update=this_update, next_update=this_update, der=b"")
        .on_conflict_do_nothing(index_elements=["ca_id"])
    )
    row = session.get(CrlRow, ca_id, with_for_update=True, populate_existing=True)
    assert row is not None
    return row


def build_crl(
    issuer: x509.Certificate,
    key: PrivateKey,
    hash_algorithm: hashes.SHA256 | hashes.SHA384 | None,
    *,
    number: int,
    this_update: dt.datetime,
    next_update: dt.datetime,
    revoked: Sequence[x509.RevokedCertificate] = (),
) -> bytes:
    """A signed v2 CRL (DER) of ``issuer`` (RFC 5280 §5): the issuer's subject as CRL issuer,
    a CRL number (§5.2.3) and an authority key identifier equal to the issuer's subject key
    identifier (§5.2.1: conforming CRL issuers MUST include it)."""
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        # All entries at once: add_revoked_certificate copies the builder's list on every call,
        # which made 100k entries take ~7 s instead of ~1 s (docs/benchmarks-revocation.md).
        x509.CertificateRevocationListBuilder(revoked_certificates=list(revoked))
        .issuer_name(issuer.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )
    return builder.sign(key, hash_algorithm).public_bytes(serialization.Encoding.DER)


def refresh_crl(ctx: Context, session: Session, ca: CaRow, *, final: bool = False) -> CrlRow:
    """Build and store a new CRL for ``ca`` inside the caller's transaction.

    ``final``: the last CRL of a CA whose key is about to be destroyed (a retired root), valid
    until the CA itself expires, since nothing can re-sign it (RFC 5280 §5.1.2.5 lets nextUpdate
    be any later time); ``refresh_stale_crls`` never finds it due.

    The number comes from the counter of the CA's issuer name (``_next_number``), whose row
    lock (PostgreSQL) orders concurrent revocations on several replicas, and re-signings by the
    CAs that share the name, so CRL numbers under a name stay strictly increasing; SQLite
    serialises writers anyway. The key is loaded before any lock is taken.

    thisUpdate is backdated by ``BACKDATE``, as issued certificates' notBefore is, and for the
    same reason: a CRL is checked by the relying party's clock, and OpenVPN's ``crl-verify``
    and nginx's ``ssl_crl`` (OpenSSL, no leeway) refuse one whose thisUpdate is still ahead of
    it as "not yet valid", and with it every client of the CA until that clock catches up. A
    CRL is re-signed on every revocation, so a relying party a few seconds behind would refuse
    everyone after each one. RFC 5280 §5.1.2.4 calls thisUpdate the CRL's issue date and sets no
    bound on it; it is never before the CA's own notBefore. The entries revoked in the last
    ``BACKDATE`` have a revocationDate after it, which nothing in §5.1.2.4 or §5.3 forbids.
    nextUpdate counts from the signing time, so a CRL's validity ends ``CRL_LIFETIME`` after it
    was signed, as documented.
    """
    assert ca.id is not None
    now = ctx.clock.now()
    signer = ca_signer(ctx, ca)
    issuer = ca_certificate(ctx, ca)
    this_update = max(now - BACKDATE, issuer.not_valid_before_utc)
    floor = max(ctx.crl_floor, _highest_stored(session, ca.subject) + 1)
    number = _next_number(session, ca.subject, floor)
    current = _locked_row(session, ca.id, this_update)
    next_update = issuer.not_valid_after_utc if final else now + CRL_LIFETIME
    der = build_crl(
        issuer,
        signer.private_key,
        signer.hash_algorithm,
        number=number,
        this_update=this_update,
        next_update=next_update,
        revoked=_revoked(session, ca, now),
    )
    current.number, current.this_update = number, this_update
    current.next_update, current.der = next_update, der
    session.add(current)
    session.flush()
    return current


def refresh_crl_if_signable(ctx: Context, session: Session, ca: CaRow) -> str | None:
    """Re-sign ``ca``'s CRL in the caller's transaction; or, for a revoked CA whose key cannot
    be had (an emergency revocation after the key was deleted), skip it and say why.

    Only the root's key is needed to revoke an intermediate (docs/revocation.md): the root's CRL
    lists it, so verifiers refuse everything under it whatever its own CRL says, and revoking
    what it issued must not fail because that CRL cannot be signed. The key is tried first, so
    a skipped CA leaves nothing of a CRL behind in the transaction. An active CA is never
    skipped: its CRL is what verifiers read, so a revocation it cannot publish fails.

    The skip is logged at info, as an expected state: a revocation hands the reason to whoever
    asked (``crl_skipped``, the CLI's one ``warning:`` line, docs/revocation.md), and the
    scheduled job meets that CA every minute. A warning here also reached a CLI command's
    stderr as a bare line (Python's last-resort handler) beside that command's own."""
    if ca.state == "revoked":
        try:
            ca_signer(ctx, ca)
        except Unavailable as error:
            # The reason is also the answer of a REST revocation: the path is in the log only.
            log.info("CRL of revoked CA %s not re-signed: %s", ca.serial, error.detail)
            return error.public
    refresh_crl(ctx, session, ca)
    return None


def _as_crl(ca: CaRow, row: CrlRow) -> Crl:
    return Crl(ca.serial, row.number, row.this_update, row.next_update, row.der)


def current_crl(ctx: Context, authority: str, selector: str) -> Crl:
    """The stored CRL, created or re-signed first if it is missing or due.

    A stored CRL that is due but still valid is served as it is when the CA's key cannot sign a
    new one (a revoked CA whose key is gone, a key store that is down): it is still the CA's
    latest word, and relying parties are better served by it than by an error until it
    expires. Only a missing or expired one makes the read fail."""
    now = ctx.clock.now()
    with Session(ctx.engine) as session:
        ca = find_crl_issuer(session, authority, selector)
        row = session.get(CrlRow, ca.id)
        if row is not None and row.next_update - now > REFRESH_BEFORE:
            return _as_crl(ca, row)
        stored = _as_crl(ca, row) if row is not None and row.number > 0 else None
        try:
            crl = _as_crl(ca, refresh_crl(ctx, session, ca))
        except Unavailable as error:
            if stored is None or stored.next_update <= now:
                raise
            # A revoked CA's key that is gone is an expected state (logged when it was skipped),
            # not a fault to report on every read.
            log.log(
                logging.INFO if ca.state == "revoked" else logging.WARNING,
                "CRL #%d of CA %s served as stored (valid until %s): not re-signed: %s",
                stored.number,
                ca.serial,
                stored.next_update.isoformat(),
                error.detail,
            )
            return stored
        session.commit()
        return crl


def refresh_stale_crls(ctx: Context) -> list[Crl]:
    """The scheduled job: re-sign every unexpired CA's CRL that is missing or due. A revoked
    CA whose key is gone cannot sign one and is skipped, logged (``refresh_crl_if_signable``):
    it must not hold back the others."""
    refreshed: list[Crl] = []
    now = ctx.clock.now()
    with Session(ctx.engine) as session:
        # A cross certificate issues nothing of its own: its subject root's CRL covers what that
        # key signed (and a retired root's key, which a cross certificate names, is destroyed).
        cas = session.exec(
            select(CaRow).where(col(CaRow.not_after) > now, CaRow.role != "cross")
        ).all()
        for ca in cas:
            row = session.get(CrlRow, ca.id)
            due = row is None or row.next_update - now <= REFRESH_BEFORE
            if due and refresh_crl_if_signable(ctx, session, ca) is None:
                row = session.get(CrlRow, ca.id)
                assert row is not None
                refreshed.append(_as_crl(ca, row))
        session.commit()
    return refreshed
