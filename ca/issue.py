"""X509-SVID issuance as one visible pipeline.

    authorise (Grant + CSR → identity, names, lifetime)
      → template (``ca.profiles.leaf_builder``, rendered from the issuer's DER: ``ca.leafder``)
      → sign (the active issuer's ``Signer``)
      → self-check (``ca.checks.check_leaf``)
      → persist (one transaction: spend the credential, record the certificate)

A credential is checked twice on purpose: cheaply before signing (so bad callers cost no
signature) and atomically while persisting (so two concurrent uses of a single-use token cannot
both succeed). Nothing is written unless everything before it succeeded.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa
from cryptography import x509
from sqlalchemy.dialects import postgresql, sqlite

from ca import metrics
from ca.authority import MESH, Issuer, IssuerChanged, StillActive, signing_issuer
from ca.checks import check_leaf
from ca.config import Context
from ca.csr import ParsedCsr, parse_csr
from ca.durations import Ttl, svid_ttl
from ca.errors import (
    AuthenticationFailed,
    InternalError,
    PermissionDenied,
    PolicyViolation,
    TrellisError,
    Unavailable,
)
from ca.identity import SpiffeId
from ca.keys import PrivateKey, PublicKey
from ca.leafder import signed_leaf
from ca.pem import certs_pem
from ca.profiles import BACKDATE, LeafSpec, RevocationUrls
from ca.records import issued_rows
from ca.serial import Serial
from ca.store import outage
from ca.store.batch import Guard, Lookup, Need, Rows, Work
from ca.store.core import table
from ca.store.locks import certificate_name, entry_name, identity_name
from ca.store.models import CertificateRow, EntryRow, RenewalNonceRow
from ca.tokens import join_token_use

__all__ = [
    "Grant",
    "IssuedSvid",
    "counted",
    "issue_for_key",
    "issue_svid",
    "issue_svid_async",
    "mint_svid",
    "refused",
    "revocation_urls",
    "under_way",
    "validity_window",
]

log = logging.getLogger("trellis.issue")

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Built once (see ca.store.core). A replayed renewal proof inserts nothing (rowcount 0) instead
# of failing the statement, which on PostgreSQL would abort a transaction shared with others.
_NONCES, _CERTS, _ENTRIES = table(RenewalNonceRow), table(CertificateRow), table(EntryRow)
_SPEND_NONCE = {
    "sqlite": sqlite.insert(_NONCES).on_conflict_do_nothing().returning(_NONCES.c.jti),
    "postgresql": postgresql.insert(_NONCES).on_conflict_do_nothing().returning(_NONCES.c.jti),
}
# What an issuance relies on still standing when it is recorded (``ca.store.batch.Need``),
# read for all the units of a batch at once.
_ACTIVE = Lookup.by(sa.select(_CERTS.c.serial).where(_CERTS.c.status == "active"), _CERTS.c.serial)
_ENABLED = Lookup.by(
    sa.select(_ENTRIES.c.id).where(_ENTRIES.c.disabled_at.is_(None)), _ENTRIES.c.id
)


@dataclass(frozen=True, slots=True)
class Grant:
    """What an authenticated caller may receive: built by authentication, never from input."""

    spiffe_id: SpiffeId
    default_ttl: Ttl
    max_ttl: Ttl
    requested_by: str
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[IpAddress, ...] = ()
    entry_id: str | None = None
    join_token_id: str | None = None  # spent in the issuing transaction
    renewal_nonce: tuple[str, dt.datetime] | None = None  # (jti, expiry) recorded likewise
    renews_serial: str | None = None
    profile: str = "x509-svid"
    authority: str = MESH
    # The CSR a renewal proof was checked against (it is bound to it), as sent and as parsed
    # then: issuing those same bytes needs no second parse (its load and signature check,
    # ~100 µs of a renewal's CPU).
    checked_csr: tuple[bytes, ParsedCsr] | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class IssuedSvid:
    certificate: x509.Certificate
    issuer: Issuer = field(repr=False)
    # Encoded once, for the certificate's row and for the response.
    certificate_pem: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "certificate_pem", certs_pem([self.certificate]))

    @property
    def serial(self) -> Serial:
        return Serial(self.certificate.serial_number)

    @property
    def expires_at(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc

    @property
    def chain_pem(self) -> bytes:
        return self.issuer.chain_pem

    @property
    def bundle_pem(self) -> bytes:
        return self.issuer.bundle_pem


def authorise(grant: Grant, csr: ParsedCsr) -> tuple[str, ...]:
    """The CSR may repeat the granted identity and ask for a subset of the granted DNS names."""
    if csr.spiffe_id is not None and csr.spiffe_id != grant.spiffe_id:
        raise PolicyViolation(
            f"the CSR asks for {csr.spiffe_id} but the credential is for {grant.spiffe_id}"
        )
    not_granted = [name for name in csr.dns_names if name not in grant.dns_names]
    if not_granted:
        raise PolicyViolation(f"DNS names not in the registration entry: {', '.join(not_granted)}")
    # An SVID carries all its entry's DNS names: workloads rarely know them, peers need them.
    return grant.dns_names


def lifetime(grant: Grant, requested: Ttl | None) -> Ttl:
    if requested is None:
        return grant.default_ttl
    svid_ttl(requested, "the requested TTL")
    if requested > grant.max_ttl:
        raise PolicyViolation(
            f"requested TTL {requested} exceeds the maximum {grant.max_ttl} for {grant.spiffe_id}"
        )
    return requested


def validity_window(
    now: dt.datetime, ttl: Ttl, issuer: x509.Certificate
) -> tuple[dt.datetime, dt.datetime]:
    """notBefore is backdated for clock skew; notAfter never passes the issuer's (X509-SVID §5.2
    relying parties reject a chain where it would)."""
    # Both are the server's state, not the caller's fault: 503, so clients retry.
    if now < issuer.not_valid_before_utc:
        raise Unavailable("the issuing CA is not valid yet: is this host's clock behind?")
    not_before = max(now - BACKDATE, issuer.not_valid_before_utc)
    not_after = min(now + ttl.delta, issuer.not_valid_after_utc)
    if not_after <= now:
        raise Unavailable("the issuing CA expires now: nothing can be issued until it rotates")
    return not_before, not_after


def _persist(ctx: Context, grant: Grant, svid: IssuedSvid) -> None:
    ctx.writes.run(*_recording(ctx, grant, svid))


def _recording(
    ctx: Context, grant: Grant, svid: IssuedSvid
) -> tuple[Work, str, Guard, tuple[Need, ...]]:
    """What ``GroupCommit.run`` and ``run_async`` take to record ``svid``: its unit of work, the
    shared row it updates (its join token: see ``GroupCommit.run``), the check that its
    issuer is still the active CA, and what it needs still standing (``_needs``)."""
    lock_key = f"token:{grant.join_token_id}" if grant.join_token_id else ""
    return _writer(ctx, grant, svid), lock_key, StillActive.of(ctx, svid.issuer), _needs(grant)


def _needs(grant: Grant) -> tuple[Need, ...]:
    """Checked again in the transaction that records the certificate, and claimed against the
    writes that withdraw them (``ca.store.locks``): a revocation, a deletion or a disabling
    that landed after authentication wins (docs/revocation.md: a revoked SVID cannot be
    renewed, a disabled entry gets nothing)."""
    needs: list[Need] = []
    if grant.renews_serial is not None:
        needs.append(
            Need(
                _ACTIVE,
                grant.renews_serial,
                AuthenticationFailed("the certificate presented for renewal is no longer valid"),
                (certificate_name(grant.renews_serial), identity_name(str(grant.spiffe_id))),
            )
        )
    if grant.entry_id is not None:
        needs.append(
            Need(
                _ENABLED,
                grant.entry_id,
                PermissionDenied(
                    f"the registration entry for {grant.spiffe_id} was deleted or disabled"
                ),
                (entry_name(grant.entry_id),),
            )
        )
    return tuple(needs)


def _writer(ctx: Context, grant: Grant, svid: IssuedSvid) -> Work:
    """One unit of a group commit (``ca.store.batch``), Core statements only. Every refusal
    comes from a conditional statement that changed nothing, so refusing one unit never undoes
    another's; a single grant carries one credential to spend at most. A join token's use is
    spent with the batch's other uses (``Rows.spend``): the unit does not update the token
    itself.

    The rows are made here, before the transaction: a batch's units run while it holds the
    write lock (SQLite has one for all workers), and what needs no database (PEM, fingerprint,
    JSON) need not make the other workers wait."""
    if grant.join_token_id is not None and grant.renewal_nonce is not None:
        raise AssertionError("a grant spends one credential")
    now = ctx.clock.now()
    spend = join_token_use(grant.join_token_id, now) if grant.join_token_id is not None else None
    inserts = issued_rows(
        svid.certificate,
        pem=svid.certificate_pem,
        authority=grant.authority,
        issuer_ca_id=svid.issuer.ca_id,
        profile=grant.profile,
        identity=str(grant.spiffe_id),
        requested_by=grant.requested_by,
        now=now,
        entry_id=grant.entry_id,
        event="certificate.renewed" if grant.renews_serial else "certificate.issued",
        detail={"renews": grant.renews_serial},
    )

    def write(connection: sa.Connection, rows: Rows) -> None:
        # The certificate renewed and the entry were checked by the batch (``_needs``).
        if grant.renewal_nonce is not None:
            jti, expires = grant.renewal_nonce
            spent = connection.execute(
                _SPEND_NONCE[connection.dialect.name], {"jti": jti, "expires_at": expires}
            )
            if spent.first() is None:  # (rowcount is -1 here on psycopg)
                raise AuthenticationFailed("this renewal proof has already been used")
        if spend is not None:
            rows.spend(spend)
        for insert in inserts:
            rows.add(insert)

    return write


def revocation_urls(ctx: Context, issuer: Issuer) -> RevocationUrls | None:
    """CDP/AIA for what ``issuer`` signs, when Trellis has a public URL."""
    public_url = ctx.settings.public_url
    if not public_url:
        return None
    return RevocationUrls.under(public_url, issuer.authority, issuer.certificate.serial_number)


def _signed(
    ctx: Context,
    grant: Grant,
    public_key: PublicKey,
    ttl: Ttl | None = None,
    dns_names: Sequence[str] | None = None,
) -> tuple[x509.Certificate, Issuer]:
    """Template, sign, self-check: everything before the certificate is recorded (which checks
    that ``issuer`` is still the active CA: ``StillActive``)."""
    issuer = signing_issuer(ctx, grant.authority)
    now, granted = ctx.clock.now(), lifetime(grant, ttl)
    not_before, not_after = validity_window(now, granted, issuer.certificate)
    if not_after < now + granted.delta:
        # As SPIRE does: issued, shorter, and said (the answer's expires_at shows it too).
        log.warning(
            "%s: lifetime %s cut to the issuing CA's notAfter %s",
            grant.spiffe_id,
            granted,
            not_after.isoformat(),
        )
    spec = LeafSpec(
        public_key=public_key,
        spiffe_id=grant.spiffe_id,
        serial=Serial.generate(),
        not_before=not_before,
        not_after=not_after,
        issuer=issuer.certificate,
        dns_names=tuple(grant.dns_names if dns_names is None else dns_names),
        ip_addresses=grant.ip_addresses,
        urls=revocation_urls(ctx, issuer),
    )
    cert = signed_leaf(spec, issuer.signer)
    check_leaf(cert, issuer.certificate, grant.spiffe_id)
    return cert, issuer


def issue_for_key(
    ctx: Context,
    grant: Grant,
    public_key: PublicKey,
    ttl: Ttl | None = None,
    dns_names: Sequence[str] | None = None,
) -> IssuedSvid:
    """The pipeline after the CSR: for callers that already hold a verified public key."""

    def sign_and_record() -> IssuedSvid:
        svid = IssuedSvid(*_signed(ctx, grant, public_key, ttl, dns_names))
        _persist(ctx, grant, svid)
        return svid

    try:
        return sign_and_record()
    except IssuerChanged:  # signed by a CA that was rotated meanwhile: once more, with the new
        return sign_and_record()


def failed_as(error: BaseException) -> str | None:
    """The ``result`` an issuance that ``error`` ended is counted under: the error's code, or
    ``unavailable`` (the code of the 503 ``api.problems`` answers) when the database could not
    be used: a database outage failed every issuance without counting one, so the alert on
    failed issuances (docs/operations.md) stayed silent through it. None: not counted (a bug,
    answered 500)."""
    if isinstance(error, TrellisError):
        return error.code
    return Unavailable.code if outage.unreachable(error) else None


def refused(error: BaseException, authority: str = MESH, profile: str = "x509-svid") -> None:
    """Counts an issuance refused outside ``issue_svid``'s measured pipeline: before it had a
    grant (``ca.grants``: a spent, unknown or revoked credential, a malformed proof, or no
    database to look it up in), where ``unauthenticated`` is a result like the others
    (docs/operations.md) and an alert on it sees credential stuffing, or with one but a request
    field that does not parse (a bad ``ttl``)."""
    result = failed_as(error)
    if result is not None:
        metrics.ISSUED.labels(authority, profile, result).inc()


@contextlib.contextmanager
def counted(authority: str, profile: str) -> Iterator[None]:
    """An issuance of ``ca.tlsleaf`` (a gateway consumer's, an OpenVPN client's or server's)
    counted as ``issue_svid``'s are: ``issued`` once it is delivered, or what refused or
    failed it (``refused``). Only ``issued`` was counted, from inside the signing, so a
    disabled consumer, a name already taken or a database outage never showed in the metric,
    and a certificate withdrawn after it was signed (its consumer disabled meanwhile) counted
    as issued."""
    try:
        yield
    except Exception as error:
        refused(error, authority, profile)
        raise
    metrics.ISSUED.labels(authority, profile, "issued").inc()


@contextlib.contextmanager
def _measured(grant: Grant) -> Iterator[None]:
    """``counted`` and the time of an issuance that succeeded, in one context manager: this is
    every issuance's path, and a nested one is another generator and its wrapper per request,
    objects enough to set off one more collection of a worker's young generation in a burst
    (tests/api/test_worker_process.py)."""
    started = time.perf_counter()
    try:
        yield
    except Exception as error:
        refused(error, grant.authority, grant.profile)
        raise
    metrics.ISSUED.labels(grant.authority, grant.profile, "issued").inc()
    metrics.ISSUANCE_SECONDS.labels(grant.authority, grant.profile).observe(
        time.perf_counter() - started
    )


def _parsed(grant: Grant, csr_pem: bytes) -> ParsedCsr:
    """A renewal issues only for the CSR its proof was checked against (``ca.grants``): the
    proof is bound to those bytes, and any others would bypass that binding."""
    if grant.checked_csr is not None and grant.checked_csr[0] == csr_pem:
        return grant.checked_csr[1]
    if grant.renews_serial is not None:
        raise InternalError("a renewal is issued only for the CSR its proof was checked against")
    return parse_csr(csr_pem)


def issue_svid(ctx: Context, grant: Grant, csr_pem: bytes, ttl: Ttl | None = None) -> IssuedSvid:
    with _measured(grant):
        csr = _parsed(grant, csr_pem)
        return issue_for_key(ctx, grant, csr.public_key, ttl, authorise(grant, csr))


def under_way(ctx: Context) -> contextlib.AbstractContextManager[None]:
    """Around an issuance on an event loop, from its credential lookup to
    ``issue_svid_async``: the loop's group commit then knows one more certificate is coming,
    and a PostgreSQL batch ready meanwhile waits a little for it instead of committing without
    it (``GroupCommit.expecting``)."""
    return ctx.writes.expecting()


async def issue_svid_async(
    ctx: Context, grant: Grant, csr_pem: bytes, ttl: Ttl | None = None
) -> IssuedSvid:
    """``issue_svid`` for an event loop, when ``ctx.signs_locally``: the same steps in place,
    and the certificate recorded in a commit shared with the other requests the loop has ready
    (``GroupCommit.run_async``); returns once it is committed."""
    with _measured(grant):
        csr = _parsed(grant, csr_pem)
        dns_names = authorise(grant, csr)

        async def sign_and_record() -> IssuedSvid:
            svid = IssuedSvid(*_signed(ctx, grant, csr.public_key, ttl, dns_names))
            await ctx.writes.run_async(*_recording(ctx, grant, svid))
            return svid

        try:
            return await sign_and_record()
        except IssuerChanged:  # as in issue_for_key
            return await sign_and_record()


def mint_svid(
    ctx: Context, grant: Grant, private_key: PrivateKey, ttl: Ttl | None = None
) -> IssuedSvid:
    """``trellis svid mint``: the admin generated the key locally, so there is no CSR to verify."""
    return issue_for_key(ctx, grant, private_key.public_key(), ttl)
