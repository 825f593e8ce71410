"""Creating an authority (root + issuing intermediate) and loading it, unlocked, for issuance.

An authority is one CA hierarchy with one purpose. This issue's only purpose is the SPIFFE mesh
(``mesh``); OpenVPN and gateway authorities reuse the same machinery with their own names.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from cryptography import x509
from sqlmodel import Session, col, select

from ca import audit
from ca.bundle import read_bundle, sync_bundle, trust_anchors
from ca.cas import ca_handle
from ca.checks import check_ca
from ca.clock import utc
from ca.config import Context
from ca.durations import Ttl
from ca.errors import Conflict, InvalidInput, NotFound, NotInitialised, TrellisError, Unavailable
from ca.identity import TrustDomain
from ca.keys import KeyHandle, KeyType, Signer
from ca.pem import certs_pem
from ca.profiles import (
    BACKDATE,
    CaSpec,
    RevocationUrls,
    ca_builder,
    ca_common_name,
    ca_subject,
    sign,
)
from ca.serial import Serial
from ca.store import db, locks
from ca.store.core import prepared, table
from ca.store.models import (
    AuthorityRow,
    BundleStateRow,
    CaEventRow,
    CaRow,
    CertificateRow,
    CrlRow,
    EntryRow,
    IstioClusterRow,
    OcspResponderRow,
    RootRotationRow,
    TokenRow,
)

__all__ = [
    "GATEWAY",
    "MESH",
    "AuthorityExists",
    "AuthorityParams",
    "Issuer",
    "IssuerChanged",
    "OtherPurpose",
    "StillActive",
    "active_issuer",
    "bundle_pem",
    "check_keys",
    "check_name",
    "check_params",
    "check_purpose",
    "init_authority",
    "initialising",
    "load_authority",
    "no_such_authority",
    "record_event",
    "roots_of",
    "signing_issuer",
    "trust_domain_as_is",
]

log = logging.getLogger("trellis.authority")

MESH = "mesh"
GATEWAY = "gateway"
# The authorities an instance knows by name before they exist: asking for one before its init
# command ran is asking a Trellis not set up yet (503, naming the command). Any other name with
# no authority row names nothing (404): an OpenVPN authority is named by its init.
_INIT_COMMANDS = {MESH: "trellis init", GATEWAY: "trellis gateway init"}
DEFAULT_ROOT_TTL = Ttl(10 * 365 * 86400)
DEFAULT_CA_TTL = Ttl(7 * 86400)
DEFAULT_SVID_TTL = Ttl(3600)


PURPOSES = ("spiffe", "openvpn", "gateway")
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
# The names whose purpose is fixed before they exist. Their inits, and everything that finds
# the mesh or the gateway, go by the name alone: an OpenVPN authority called ``gateway`` was
# taken by ``trellis gateway init`` for its own, and the VPN's clients passed the gateway's
# truststore (docs/gateway.md: the two hierarchies are separate).
_RESERVED = {MESH: ("spiffe", "the SPIFFE mesh"), GATEWAY: ("gateway", "the API gateway")}


@dataclass(frozen=True, slots=True)
class AuthorityParams:
    """One CA hierarchy. ``spiffe`` authorities have a trust domain and their CAs carry its
    SPIFFE ID; ``openvpn`` and ``gateway`` ones have none, so nothing they issue can ever pass
    as an SVID, and no SVID chains to them."""

    trust_domain: TrustDomain | None
    root_key_type: KeyType = KeyType.EC_P384
    key_type: KeyType = KeyType.EC_P256
    ca_ttl: Ttl = DEFAULT_CA_TTL
    svid_ttl: Ttl = DEFAULT_SVID_TTL
    root_ttl: Ttl = DEFAULT_ROOT_TTL
    force: bool = False
    name: str = MESH
    key_backend: str | None = None  # None: the configured default (TRELLIS_KEY_BACKEND)
    purpose: str = "spiffe"
    actor: str = "init"  # who set it up, in the audit trail: ``cli`` or ``admin-token:<id>``
    # When the init was asked for (a command's start): ``force`` replaces only an authority
    # made before then, never one another init made meanwhile. None (an in-process caller):
    # only one replaced while this init waited for its turn is refused.
    given_at: dt.datetime | None = None

    @property
    def label(self) -> str:
        """What CA common names start with: the trust domain, or the authority name."""
        return self.trust_domain.name if self.trust_domain else self.name


@dataclass(frozen=True, slots=True)
class Issuer:
    """An unlocked issuing CA with its rendered chain and bundle, cached per process."""

    ca_id: int
    authority: str
    trust_domain: TrustDomain | None  # None for openvpn and gateway authorities
    certificate: x509.Certificate
    signer: Signer
    chain: tuple[x509.Certificate, ...]  # the issuing CA first, then cross-signed roots if any
    roots: tuple[x509.Certificate, ...]
    chain_pem: bytes
    bundle_pem: bytes
    bundle_sequence: int
    default_svid_ttl: Ttl

    def spiffe_trust_domain(self) -> TrustDomain:
        """The trust domain, for operations only SPIFFE authorities support."""
        if self.trust_domain is None:
            raise InvalidInput(f"authority {self.authority!r} issues no SPIFFE identities")
        return self.trust_domain


def no_such_authority(name: str) -> NotInitialised | NotFound:
    """The error for an authority that has no row (``_INIT_COMMANDS``)."""
    command = _INIT_COMMANDS.get(name)
    if command is not None:
        return NotInitialised(f"authority {name!r} does not exist: run '{command}' first")
    return NotFound(f"no authority named {name[:64]!r}")


def load_authority(ctx: Context, name: str = MESH) -> AuthorityRow:
    with Session(ctx.engine) as session:
        row = session.get(AuthorityRow, name)
    if row is None:
        raise no_such_authority(name)
    return row


def check_name(name: str, purpose: str) -> None:
    """Whether an authority of ``purpose`` may be called ``name`` (``_RESERVED``)."""
    if purpose not in PURPOSES:
        raise InvalidInput(f"unknown authority purpose {purpose!r}")
    if not _NAME.match(name):
        raise InvalidInput("an authority name is lower-case letters, digits and '-', at most 32")
    owner = _RESERVED.get(name)
    if owner is not None and owner[0] != purpose:
        raise InvalidInput(
            f"the authority name {name!r} is reserved for {owner[1]}: give the {purpose}"
            " authority another name"
        )


class OtherPurpose(Conflict):
    """The authority of a name is one of another purpose than asked for. Not an
    ``AuthorityExists``: ``trellis init --exists-ok`` is not content with it, and no init,
    forced or not, replaces it."""


def check_purpose(row: AuthorityRow | None, purpose: str) -> None:
    """An authority found by its name is one of ``purpose``, or nothing an init of that purpose
    may complete, reuse or replace (a database from before ``_RESERVED`` may hold one)."""
    if row is not None and row.purpose != purpose:
        raise _other_purpose(row.name, row.purpose, purpose)


def _other_purpose(name: str, found: str, purpose: str) -> OtherPurpose:
    return OtherPurpose(
        f"authority {name!r} has purpose {found}, not {purpose}: it is never used as one,"
        " and no init, forced or not, replaces it"
    )


def check_params(params: AuthorityParams) -> None:
    """What ``init_authority`` refuses; callable first by whoever must set nothing up before."""
    check_name(params.name, params.purpose)
    if (params.purpose == "spiffe") != (params.trust_domain is not None):
        raise InvalidInput("a trust domain is required for SPIFFE authorities and only for them")
    # SPIRE's rule of thumb: an SVID should live at most a sixth of its issuer's life, otherwise
    # SVIDs get silently clamped to the CA's expiry and renew in a storm before every rotation.
    if params.svid_ttl.seconds * 6 > params.ca_ttl.seconds:
        if params.purpose != "spiffe":  # no SVIDs, no SVID TTL: only the CA TTL can change
            raise InvalidInput(
                f"the CA TTL {params.ca_ttl} is too short for the {params.purpose} authority"
                f" {params.name!r}:"
                f" give a CA TTL of {Ttl(params.svid_ttl.seconds * 6)} or more"
            )
        raise InvalidInput(
            f"SVID TTL {params.svid_ttl} is more than a sixth of the CA TTL {params.ca_ttl}: "
            "raise the CA TTL or lower the SVID TTL"
        )
    if params.ca_ttl >= params.root_ttl:
        raise InvalidInput("the intermediate CA TTL must be shorter than the root's")


def sign_new_ca(
    ctx: Context,
    handle: KeyHandle,
    *,
    common_name: str,
    params: AuthorityParams,
    ttl: Ttl,
    issuer: tuple[x509.Certificate, Signer] | None,
) -> x509.Certificate:
    signer = ctx.keys.load(handle)
    now = ctx.clock.now()
    not_after = now + ttl.delta
    if issuer is not None:
        not_after = min(not_after, issuer[0].not_valid_after_utc)
    spec = CaSpec(
        subject=ca_subject("Trellis", common_name),
        public_key=signer.public_key(),
        spiffe_id=params.trust_domain.id() if params.trust_domain else None,
        serial=Serial.generate(),
        not_before=now - BACKDATE,
        not_after=not_after,
        path_length=None if issuer is None else 0,
        issuer=None if issuer is None else issuer[0],
        urls=(
            RevocationUrls.under(ctx.settings.public_url, params.name, issuer[0].serial_number)
            if issuer is not None and ctx.settings.public_url
            else None
        ),
    )
    cert = sign(ca_builder(spec), signer if issuer is None else issuer[1])
    check_ca(
        cert,
        cert if issuer is None else issuer[0],
        params.trust_domain.id() if params.trust_domain else None,
    )
    return cert


def ca_row_for(
    name: str, role: str, cert: x509.Certificate, handle: KeyHandle, now: dt.datetime
) -> CaRow:
    return CaRow(
        authority=name,
        role=role,
        state="active",
        serial=format(cert.serial_number, "x"),
        subject=cert.subject.rfc4514_string(),
        key_backend=handle.backend,
        key_ref=handle.ref,
        key_type=handle.key_type.value,
        cert_pem=certs_pem([cert]).decode(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        created_at=now,
    )


def destroy_quietly(ctx: Context, handles: list[KeyHandle]) -> None:
    """Clean up keys made by a failed operation without hiding why it failed (the backend that
    failed may well fail the clean-up too; then the keys are logged for an operator)."""
    for handle in handles:
        try:
            ctx.keys.destroy(handle)
        except Exception:
            log.warning("could not destroy key %s/%s after a failure", handle.backend, handle.ref)


def _wipe(session: Session, name: str, *, actor: str, now: dt.datetime) -> list[KeyHandle]:
    """``init --force``: forget one authority's rows; returns its keys to destroy after commit.
    What it forgot is recorded in the audit trail, in the same transaction. The CRL number
    counters of its CAs' names (``CrlIssuerRow``) stay: the new CAs bear the same names and
    must number their CRLs above the old ones' (RFC 5280 §5.2.3)."""
    cas = session.exec(select(CaRow).where(CaRow.authority == name)).all()
    ca_ids = [row.id for row in cas]
    replaced = session.get(AuthorityRow, name)
    entry_count = session.execute(
        sa.select(sa.func.count()).select_from(EntryRow).where(col(EntryRow.authority) == name)
    ).scalar_one()
    token_count = session.execute(
        sa.select(sa.func.count())
        .select_from(TokenRow)
        .where(col(TokenRow.entry_id).in_(select(EntryRow.id).where(EntryRow.authority == name)))
    ).scalar_one()
    if replaced is not None or cas:
        audit.record(
            session,
            "authority.reinitialised",
            name,
            actor=actor,
            at=now,
            detail={
                "old_trust_domain": replaced.trust_domain if replaced else None,
                "entries_removed": entry_count,
                "join_tokens_removed": token_count,
                "old_cas": [f"{row.role}/{row.serial}" for row in cas],
            },
        )
    responders = session.exec(
        select(OcspResponderRow).where(col(OcspResponderRow.ca_id).in_(ca_ids))
    ).all()
    rows: list[CaRow | OcspResponderRow] = [*cas, *responders]
    old = [ca_handle(row) for row in rows]
    entries = select(EntryRow.id).where(EntryRow.authority == name)
    for statement in (
        sa.delete(TokenRow).where(col(TokenRow.entry_id).in_(entries)),
        sa.delete(EntryRow).where(col(EntryRow.authority) == name),
        sa.delete(CaEventRow).where(col(CaEventRow.authority) == name),
        sa.delete(CrlRow).where(col(CrlRow.ca_id).in_(ca_ids)),
        sa.delete(OcspResponderRow).where(col(OcspResponderRow.ca_id).in_(ca_ids)),
        sa.delete(CertificateRow).where(col(CertificateRow.authority) == name),
        sa.delete(IstioClusterRow).where(col(IstioClusterRow.authority) == name),
        sa.delete(RootRotationRow).where(col(RootRotationRow.authority) == name),
        sa.delete(BundleStateRow).where(col(BundleStateRow.authority) == name),
        sa.delete(CaRow).where(col(CaRow.authority) == name),
        sa.delete(AuthorityRow).where(col(AuthorityRow.name) == name),
    ):
        session.execute(statement)
    return old


class AuthorityExists(Conflict):
    """The authority an init would create exists (``trellis init --exists-ok`` is content with
    that), or, for ``force``, is no longer the one the init set out to replace."""


def roots_of(session: Session, name: str) -> frozenset[str]:
    """Which authority ``name`` is, as an init sees it: its roots' serials (random, so a
    re-initialised authority never has the old ones); empty while there is none."""
    serials = session.exec(
        select(CaRow.serial).where(CaRow.authority == name, CaRow.role == "root")
    ).all()
    return frozenset(serials)


def initialising(session: Session, name: str) -> None:
    """The first statements of a transaction that creates or replaces authority ``name``: the
    database's write lock on SQLite, the authority's advisory lock on PostgreSQL
    (``ca.store.locks``). Two inits at once (replicas starting together, two REST calls) then
    take turns, and the second sees what the first committed before it makes anything: a check
    before the lock let both make keys and the second fail on the primary key, or two
    ``--force`` both replace the CA and both report their own root."""
    connection = session.connection()
    locks.begin_write(connection)
    locks.claim(connection, [locks.authority_name(name)], shared=False)


def _made_since(row: AuthorityRow | None, given_at: dt.datetime | None) -> bool:
    """Whether ``row`` was made after ``given_at``, by an init that ran while this one started
    up: three ``trellis init --force`` started together each spend a second importing, and the
    first commits before the others have read anything. Compared to the microsecond (the row's
    ``created_at`` is the wall clock just before its commit, not the whole-second ``Clock``):
    in whole seconds an init that committed in the second the others were given counted as made
    before them, and a second one replaced it, both reporting success. An init given after
    another committed still replaces that one."""
    if row is None or given_at is None:
        return False
    return utc(row.created_at) > utc(given_at)


def init_authority(ctx: Context, params: AuthorityParams) -> Issuer:
    """Create root and issuing intermediate in one transaction; a failure leaves no keys behind.
    ``params.actor`` is who created it (and, with ``force``, replaced the old one) in the audit
    trail. An authority of another purpose under ``params.name`` is refused (``OtherPurpose``),
    also with ``force``: a name typed into one init never replaces the mesh or the gateway.

    Inits of one authority take turns (``initialising``); the one that waited raises
    ``AuthorityExists`` without making a key when the first created the authority, and, with
    ``force``, when the authority it set out to replace was replaced meanwhile (or made after
    ``params.given_at``): one ``--force`` wins, never two each reporting a root of their own."""
    check_params(params)
    backend = ctx.keys.new_keys_backend(params.key_backend)  # 400, not 503: see its docstring
    seen = frozenset[str]()
    if params.force:  # what it replaces: read before it waits for its turn
        with Session(ctx.engine) as session:
            seen = roots_of(session, params.name)
    created: list[KeyHandle] = []
    try:
        with Session(ctx.engine) as session:
            initialising(session, params.name)
            existing = session.get(AuthorityRow, params.name)
            check_purpose(existing, params.purpose)
            if existing is not None and not params.force:
                raise AuthorityExists(
                    f"authority {params.name!r} already exists: only a forced init replaces it "
                    "(this destroys its keys, certificates and, for the mesh, entries and their"
                    " join tokens; admin tokens serve the whole instance and stay valid)"
                )
            if params.force and (
                roots_of(session, params.name) != seen or _made_since(existing, params.given_at)
            ):
                raise AuthorityExists(
                    f"another init made authority {params.name!r} after this one was given:"
                    " it was not replaced again (run it again to replace that one)"
                )
            replaced = session.exec(
                select(BundleStateRow.sequence).where(BundleStateRow.authority == params.name)
            ).first()
            now = ctx.clock.now()
            old_keys = (
                _wipe(session, params.name, actor=params.actor, now=now) if params.force else []
            )
            root_key = ctx.keys.create(params.root_key_type, f"{params.name}-root", backend)
            created.append(root_key)
            int_key = ctx.keys.create(params.key_type, f"{params.name}-intermediate", backend)
            created.append(int_key)
            root = sign_new_ca(
                ctx,
                root_key,
                common_name=ca_common_name(params.label, "root"),
                params=params,
                ttl=params.root_ttl,
                issuer=None,
            )
            intermediate = sign_new_ca(
                ctx,
                int_key,
                common_name=ca_common_name(params.label, "intermediate"),
                params=params,
                ttl=params.ca_ttl,
                issuer=(root, ctx.keys.load(root_key)),
            )
            authority = AuthorityRow(
                name=params.name,
                purpose=params.purpose,
                trust_domain=params.trust_domain.name if params.trust_domain else "",
                key_backend=backend,
                ca_ttl_seconds=params.ca_ttl.seconds,
                svid_ttl_seconds=params.svid_ttl.seconds,
                created_at=now,
            )
            session.add(authority)
            session.flush()
            root_row = ca_row_for(params.name, "root", root, root_key, now)
            session.add(root_row)
            session.flush()
            int_row = ca_row_for(params.name, "intermediate", intermediate, int_key, now)
            int_row.parent_id = root_row.id
            session.add(int_row)
            session.flush()
            for row in (root_row, int_row):
                record_event(session, row, "created", params.actor, now)
            sync_bundle(session, params.name, now, after=replaced or 0)
            authority.created_at = dt.datetime.now(dt.UTC)  # when it is made: _made_since
            session.commit()
    except BaseException:
        destroy_quietly(ctx, created)
        raise
    for handle in old_keys:
        ctx.keys.destroy(handle)
    ctx.cache.clear()
    return active_issuer(ctx, params.name)


def _certificate(row: CaRow) -> x509.Certificate:
    return x509.load_pem_x509_certificate(row.cert_pem.encode())


def record_event(
    session: Session,
    row: CaRow,
    event: str,
    actor: str,
    now: dt.datetime,
    *,
    detail: dict[str, Any] | None = None,
) -> None:
    assert row.id is not None
    session.add(CaEventRow(authority=row.authority, ca_id=row.id, event=event, at=now, actor=actor))
    audit.record(
        session,
        f"ca.{event}",
        f"{row.authority}/{row.role}/{row.serial}",
        actor=actor,
        at=now,
        detail={"state": row.state, "not_after": row.not_after.isoformat(), **(detail or {})},
    )


def _chain_extras(session: Session, intermediate: CaRow, now: dt.datetime) -> list[CaRow]:
    """Cross-signed certificates for the intermediate's root, issued by other trusted roots: during
    a root rotation they let a relying party that trusts only the other root build a path."""
    trusted = {row.id for row in trust_anchors(session, intermediate.authority, now)}
    crosses = session.exec(
        select(CaRow).where(
            CaRow.role == "cross",
            CaRow.cross_for_id == intermediate.parent_id,
            col(CaRow.not_after) > now,
        )
    ).all()
    return [row for row in crosses if row.parent_id in trusted]


_CA, _BUNDLE = table(CaRow), table(BundleStateRow)
# Built once (see ca.store.core): every issuance asks it.
_ACTIVE = (
    sa.select(_CA.c.id, _BUNDLE.c.sequence)
    .join(_BUNDLE, _BUNDLE.c.authority == _CA.c.authority)
    .where(
        _CA.c.authority == sa.bindparam("authority"),
        _CA.c.role == "intermediate",
        _CA.c.state == "active",
    )
    .order_by(_CA.c.not_after.desc())
    .limit(1)
)


def trust_domain_as_is(url: str) -> TrustDomain | None:
    """The mesh CA's trust domain in the database at ``url``, or None where it has none, read
    before its schema is settled: ``trellis init --exists-ok`` refuses another trust domain
    without migrating an older schema, which cannot be undone (``db.SchemaPolicy``). The
    ``authority`` table is as revision 0001 made it, so this reads any revision. A ``mesh`` of
    another purpose (``check_purpose``) is refused here too, before anything is migrated."""
    with db.read_as_is(url) as connection:
        if connection is None or not sa.inspect(connection).has_table("authority"):
            return None
        authority = table(AuthorityRow)
        found = connection.execute(
            sa.select(authority.c.purpose, authority.c.trust_domain).where(authority.c.name == MESH)
        ).first()
    if found is None:
        return None
    if found.purpose != "spiffe":
        raise _other_purpose(MESH, found.purpose, "spiffe")
    return TrustDomain.parse(found.trust_domain) if found.trust_domain else None


def active_issuer(ctx: Context, name: str = MESH) -> Issuer:
    """The issuing CA to sign with now; unlocked once and cached until the active CA or the
    published bundle changes. Every call asks the database which CA is active (one small Core
    query), so a rotation or an emergency revocation on another replica applies at once."""
    with ctx.reads.connect() as connection:
        current = connection.execute(_ACTIVE, {"authority": name}).first()
    if current is not None:
        ctx.cache[("active", name)] = (current[0], current[1])
        cached = ctx.cache.get(("issuer", current[0], current[1]))
        if isinstance(cached, Issuer):
            return cached
    return _load_active_issuer(ctx, name)


def signing_issuer(ctx: Context, name: str = MESH) -> Issuer:
    """The issuer the last commit found active, without asking the database again: for
    issuances that record their certificate with ``StillActive`` as the commit's guard, which
    is where a rotation or an emergency revocation on another replica is caught (the
    certificate is then signed again). Asking before every signature was 8 % of an issuance's
    CPU (docs/benchmarks.md); the guard asks once per commit, inside the transaction that
    records the certificate, which is also later than the question it replaces."""
    known = ctx.cache.get(("active", name))
    if isinstance(known, tuple):
        cached = ctx.cache.get(("issuer", *known))
        if isinstance(cached, Issuer):
            return cached
    return active_issuer(ctx, name)


class IssuerChanged(Unavailable):
    """The CA a certificate was signed with stopped being the active one before it was recorded:
    the issuance signs again (and answers 503 if it changes twice in a row)."""


@dataclass(frozen=True, slots=True)
class StillActive:
    """A group-commit guard (``ca.store.batch.Guard``): ``issuer`` is still its authority's
    active CA, with the same published bundle, in the transaction that records what it signed.
    Equal for all the certificates one issuer signed, so a batch asks once."""

    ctx: Context = field(compare=False, repr=False)
    authority: str
    ca_id: int
    bundle_sequence: int

    @classmethod
    def of(cls, ctx: Context, issuer: Issuer) -> StillActive:
        return cls(ctx, issuer.authority, issuer.ca_id, issuer.bundle_sequence)

    def __call__(self, connection: sa.Connection) -> None:
        current = prepared(_ACTIVE).first(connection, {"authority": self.authority})
        if current is None or (current[0], current[1]) != (self.ca_id, self.bundle_sequence):
            self.ctx.cache.pop(("active", self.authority), None)
            raise IssuerChanged(f"the active CA of {self.authority!r} changed during issuance")


def _load_active_issuer(ctx: Context, name: str) -> Issuer:
    with Session(ctx.engine) as session:
        row = session.exec(
            select(CaRow)
            .where(CaRow.authority == name, CaRow.role == "intermediate", CaRow.state == "active")
            .order_by(col(CaRow.not_after).desc())
        ).first()
        state = session.get(BundleStateRow, name)
        if row is None or row.id is None or state is None:
            if session.get(AuthorityRow, name) is None:
                raise no_such_authority(name)
            raise NotInitialised(f"authority {name!r} has no active issuing CA: run 'trellis init'")
        cache_key = ("issuer", row.id, state.sequence)
        cached = ctx.cache.get(cache_key)
        if isinstance(cached, Issuer):
            return cached
        authority = session.get(AuthorityRow, name)
        assert authority is not None
        extras = _chain_extras(session, row, ctx.clock.now())
    certificate = _certificate(row)
    signer = ctx.keys.load(ca_handle(row), certified=certificate.public_key())
    chain = (certificate, *(_certificate(extra) for extra in extras))
    bundle = state.pem.encode()
    issuer = Issuer(
        ca_id=row.id,
        authority=name,
        trust_domain=TrustDomain(authority.trust_domain) if authority.trust_domain else None,
        certificate=certificate,
        signer=signer,
        chain=chain,
        roots=tuple(x509.load_pem_x509_certificates(bundle)),
        chain_pem=certs_pem(chain),
        bundle_pem=bundle,
        bundle_sequence=state.sequence,
        default_svid_ttl=Ttl(authority.svid_ttl_seconds),
    )
    ctx.cache[cache_key] = issuer
    return issuer


def check_keys(ctx: Context) -> list[TrellisError]:
    """Unlock every CA key that may be used (active and prepared CAs of every authority), so a
    missing key file or a wrong passphrase stops start-up instead of the first signature.

    An active CA's key that cannot be used is raised: that authority cannot issue (or sign its
    CRLs, or prepare the next intermediate). A prepared intermediate's is returned instead: the
    active one issues on, and the activation that would need the key stops when due
    (``Rotator.activate``), which the ``ca-rotation`` job reports; refusing to start would take
    away a server that can issue."""
    with Session(ctx.engine) as session:
        rows = session.exec(select(CaRow).where(col(CaRow.state).in_(("active", "prepared")))).all()
    problems: list[TrellisError] = []
    for row in rows:
        if row.role == "cross":
            continue
        try:
            ctx.keys.load(ca_handle(row), certified=_certificate(row).public_key())
        except TrellisError as exc:
            if row.state != "prepared":
                raise
            log.warning(
                "%s: the prepared intermediate %s cannot be activated: %s",
                row.authority,
                row.serial[:12],
                exc.detail,
            )
            problems.append(exc)
    return problems


def bundle_pem(ctx: Context, name: str = MESH) -> bytes:
    """The trust bundle (roots) relying parties verify SVIDs with, as published: read without
    unlocking the issuing key, which serves no part of it. A replica that cannot load that key
    (one without the new intermediate's key file, docs/deploy.md) answered ``GET /v1/bundle``
    503 while serving ``/v1/bundle.jwks`` and ``/v1/bundles``."""
    return read_bundle(ctx, name).pem
