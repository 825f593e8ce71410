"""CA rotation without downtime: intermediates move prepared → active → retired on SPIRE's
schedule, and roots are replaced by explicit, re-runnable steps with cross-signing.

Intermediate timeline, lifetime L (defaults; both configurable in ``RotationPolicy``):

    notBefore
      ...  prepare at notAfter - min(L/2, 30d): the next CA is created and validated
      ...  activate at notAfter - min(L/6, 7d): the next CA issues; this one is retired
           (still valid: SVIDs it issued keep verifying until they expire)
    notAfter

Every transition runs in one transaction that first takes the authority's rotation lock
(``rotation_lock``) and re-reads the state, so replicas running the same job do each transition
once. The emergency revocation (``ca.emergency``) and the root rotation's steps take the same
lock: a rotation never retires a CA just revoked, nor activates a successor it discarded.
"""

from __future__ import annotations

import datetime as dt
import zlib
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID
from sqlmodel import Session, col, select

from ca.authority import (
    MESH,
    AuthorityParams,
    ca_row_for,
    destroy_quietly,
    no_such_authority,
    record_event,
    sign_new_ca,
)
from ca.bundle import sync_bundle, trust_anchors, write_bundle_file
from ca.cas import ca_certificate, ca_signer, load_ca_key
from ca.config import Context
from ca.durations import Ttl
from ca.errors import Conflict, InternalError, NotInitialised
from ca.identity import TrustDomain
from ca.keys import KeyHandle, KeyType, Signer
from ca.profiles import ca_common_name, sign
from ca.serial import Serial
from ca.store.models import AuthorityRow, CaRow, RootRotationRow

__all__ = [
    "LOCK_WAIT",
    "AuthorityStatus",
    "CaStatus",
    "RotationInProgress",
    "RotationPolicy",
    "Rotator",
    "Transition",
    "authority_params",
    "authority_status",
    "ca_rows",
    "prepare_at",
    "rotate",
    "rotation_lock",
    "validate_new_ca",
]


@dataclass(frozen=True, slots=True)
class RotationPolicy:
    prepare_fraction: float = 1 / 2
    prepare_cap: dt.timedelta = dt.timedelta(days=30)
    activate_fraction: float = 1 / 6
    activate_cap: dt.timedelta = dt.timedelta(days=7)

    def prepare_at(self, not_before: dt.datetime, not_after: dt.datetime) -> dt.datetime:
        life = not_after - not_before
        return not_after - min(life * self.prepare_fraction, self.prepare_cap)

    def activate_at(self, not_before: dt.datetime, not_after: dt.datetime) -> dt.datetime:
        life = not_after - not_before
        return not_after - min(life * self.activate_fraction, self.activate_cap)


def prepare_at(policy: RotationPolicy, row: CaRow) -> dt.datetime:
    return policy.prepare_at(row.not_before, row.not_after)


@dataclass(frozen=True, slots=True)
class Transition:
    event: str  # prepared | activated | retired | root-published | root-switched | root-retired
    # | cross-signed | cross-revoked
    serial: str
    at: dt.datetime


# How long an emergency revocation waits for the rotation lock on PostgreSQL: SQLite's busy
# timeout (ca.store.db), far longer than any transition holds it.
LOCK_WAIT = 10.0


class RotationInProgress(Conflict):
    """The authority's rotation lock is held elsewhere (another replica's or command's rotation,
    or on SQLite any writer holding the database past the busy timeout). A caller is told to try
    again (409, exit 6), never that nothing was due: it does not know. The scheduled job skips
    its run, as it does while another replica runs the job: the next one comes in seconds."""


def rotation_lock(session: Session, authority: str, *, wait: bool = False) -> None:
    """Hold the authority's rotation lock until the transaction ends, or raise
    ``RotationInProgress`` if another process holds it (or, on SQLite, keeps the database busy
    past the busy timeout). Every CA transition of the authority takes it first and reads the
    state after it (docs/rotation.md): prepare, activate, retire, the root rotation's steps and
    the emergency revocation, so none acts on a state another has just changed.

    PostgreSQL: an advisory lock for the authority, tried (``wait`` false: a rotation that does
    not get it is told to try again, the scheduled job skips a run) or waited for up to
    ``LOCK_WAIT`` (``wait``: an emergency revocation, which must not be turned away by a
    routine rotation; an operator told "try again" might retry after the lock holder changed
    what "the active intermediate" is). SQLite: the database's write lock, taken before the
    state is read (``BEGIN IMMEDIATE``), waited for up to the busy timeout either way. pysqlite
    begins a transaction only at the first write, so without it two processes would both read
    "no rotation yet", both publish, and the second would fail on the unique ``root_rotation``
    row (or do a step twice)."""
    if session.get_bind().dialect.name == "sqlite":
        try:
            session.execute(sa.text("BEGIN IMMEDIATE"))
        except sa.exc.OperationalError:
            raise _in_progress(authority, "the database stayed busy for the busy timeout") from None
        return
    key = 0x7E11 << 32 | zlib.crc32(authority.encode())
    if wait:
        # SET LOCAL: the timeout ends with this transaction, like the lock.
        session.execute(sa.text(f"SET LOCAL lock_timeout = '{int(LOCK_WAIT * 1000)}ms'"))
        try:
            session.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
        except sa.exc.OperationalError:
            raise _in_progress(authority, f"its lock was held for {LOCK_WAIT:g} s") from None
        return
    if not session.execute(sa.text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": key}).scalar():
        raise _in_progress(authority, "its lock is held")


def _in_progress(authority: str, why: str) -> RotationInProgress:
    return RotationInProgress(
        f"another rotation of authority {authority!r} is running ({why}): try again"
    )


def validate_new_ca(cert: x509.Certificate, signer: Signer) -> None:
    """SPIRE's rule: a new CA key proves itself by signing a throwaway certificate that then
    verifies against the new CA certificate, before anything depends on it."""
    probe = KeyType.EC_P256.generate()
    start = cert.not_valid_before_utc
    leaf = sign(
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "trellis CA validation")]))
        .issuer_name(cert.subject)
        .public_key(probe.public_key())
        .serial_number(Serial.generate().value)
        .not_valid_before(start)
        .not_valid_after(min(start + dt.timedelta(minutes=1), cert.not_valid_after_utc)),
        signer,
    )
    try:
        leaf.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise InternalError(f"the new CA failed validation: {exc}") from None


def ca_rows(session: Session, authority: str, role: str, state: str) -> list[CaRow]:
    return list(
        session.exec(
            select(CaRow)
            .where(CaRow.authority == authority, CaRow.role == role, CaRow.state == state)
            .order_by(col(CaRow.not_after).desc())
        ).all()
    )


def authority_params(auth: AuthorityRow, key_type: KeyType) -> AuthorityParams:
    return AuthorityParams(
        trust_domain=TrustDomain(auth.trust_domain) if auth.trust_domain else None,
        key_type=key_type,
        ca_ttl=Ttl(auth.ca_ttl_seconds),
        svid_ttl=Ttl(auth.svid_ttl_seconds),
        name=auth.name,
        purpose=auth.purpose,
    )


class Rotator:
    """One transaction's worth of rotation work for one authority."""

    def __init__(self, ctx: Context, session: Session, authority: str, actor: str) -> None:
        auth = session.get(AuthorityRow, authority)
        if auth is None:
            raise no_such_authority(authority)
        self.ctx, self.session, self.auth, self.actor = ctx, session, auth, actor
        self.now = ctx.clock.now()
        self.created: list[KeyHandle] = []
        self.done: list[Transition] = []

    def event(self, row: CaRow, event: str, detail: dict[str, Any] | None = None) -> None:
        record_event(self.session, row, event, self.actor, self.now, detail=detail)
        self.done.append(Transition(event, row.serial, self.now))

    def prepare_intermediate(self, root: CaRow, key_type: KeyType, backend: str) -> CaRow:
        handle = self.ctx.keys.create(key_type, f"{self.auth.name}-intermediate", backend)
        self.created.append(handle)
        params = authority_params(self.auth, key_type)
        cert = sign_new_ca(
            self.ctx,
            handle,
            common_name=ca_common_name(params.label, "intermediate"),
            params=params,
            ttl=params.ca_ttl,
            issuer=(ca_certificate(self.ctx, root), ca_signer(self.ctx, root)),
        )
        validate_new_ca(cert, self.ctx.keys.load(handle))
        row = ca_row_for(self.auth.name, "intermediate", cert, handle, self.now)
        row.state, row.parent_id = "prepared", root.id
        self.session.add(row)
        self.session.flush()
        self.event(row, "prepared")
        return row

    def activate(self, new: CaRow) -> None:
        """``new`` issues from now on: its key is loaded first, afresh (a prepared key file
        may have been replaced, or a Transit key deleted, since it was validated), so that a
        key that cannot sign stops the rotation, with the old intermediate still active.

        Every intermediate of the authority that is active at this moment (read under the
        rotation lock) is retired, and only those: a revoked one stays revoked, and there is
        never more than one active (the ``uq_ca_one_active_intermediate`` index holds it)."""
        load_ca_key(self.ctx, new)
        for old in ca_rows(self.session, self.auth.name, "intermediate", "active"):
            old.state = "retired"
            self.session.add(old)
            self.session.flush()  # before the successor's activation: the unique index
            self.event(old, "retired")
        new.state = "active"
        self.session.add(new)
        self.session.flush()
        self.event(new, "activated")


def rotate(
    ctx: Context,
    authority: str = MESH,
    *,
    force: bool = False,
    policy: RotationPolicy | None = None,
    actor: str = "scheduler",
) -> list[Transition]:
    """Do whatever transitions are due now (idempotent); ``force`` does the next one regardless.

    A process that was down past a transition catches up here: an expired or missing active
    intermediate is replaced at once. Raises ``RotationInProgress`` if another process holds
    the authority's rotation lock: whether anything was due is then unknown.
    """
    policy = policy or RotationPolicy()
    rotator: Rotator | None = None
    try:
        with Session(ctx.engine) as session:
            rotation_lock(session, authority)
            rotator = Rotator(ctx, session, authority, actor)
            now = rotator.now
            roots = ca_rows(session, authority, "root", "active")
            if not roots:
                raise NotInitialised(f"authority {authority!r} has no active root")
            root = roots[0]
            active = next(iter(ca_rows(session, authority, "intermediate", "active")), None)
            prepared = next(iter(ca_rows(session, authority, "intermediate", "prepared")), None)
            template = active or prepared
            key_type = KeyType(template.key_type) if template else KeyType.EC_P256
            backend = template.key_backend if template else ctx.keys.default
            if prepared is not None and (
                prepared.parent_id != root.id or prepared.not_after <= now
            ):
                # Prepared under a root that no longer issues, or outlived while this process
                # was down: never activate it; prepare a fresh one instead.
                prepared.state = "retired"
                session.add(prepared)
                rotator.event(prepared, "retired")
                prepared = None
            due_prepare = active is None or now >= prepare_at(policy, active)
            due_activate = active is None or now >= policy.activate_at(
                active.not_before, active.not_after
            )
            if active is not None and active.parent_id != root.id:
                due_prepare = due_activate = True  # a root switch: move under the new root now
            if force and active is not None:
                # A forced call performs exactly the next transition (drills, incidents).
                due_prepare, due_activate = prepared is None, prepared is not None
            if prepared is None and due_prepare:
                prepared = rotator.prepare_intermediate(root, key_type, backend)
            if prepared is not None and due_activate:
                rotator.activate(prepared)
            sync_bundle(session, authority, now)
            session.commit()
    except BaseException:
        if rotator is not None:
            destroy_quietly(ctx, rotator.created)
        raise
    if rotator.done:
        ctx.cache.clear()  # this process sees its own transitions at once
    if authority == MESH:
        write_bundle_file(ctx)  # pruning an expired root changes the bundle
    return rotator.done


def trusted_root_count(ctx: Context, authority: str = MESH) -> int:
    with Session(ctx.engine) as session:
        return len(trust_anchors(session, authority, ctx.clock.now()))


@dataclass(frozen=True, slots=True)
class CaStatus:
    serial: str
    role: str
    state: str
    subject: str
    not_before: dt.datetime
    not_after: dt.datetime
    key_type: str
    key_backend: str
    next_transition: str | None
    next_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class AuthorityStatus:
    name: str
    trust_domain: str
    bundle_sequence: int
    cas: tuple[CaStatus, ...]
    root_rotation: str | None  # published | switched | retired
    root_switch_after: dt.datetime | None


def authority_status(
    ctx: Context, authority: str = MESH, *, policy: RotationPolicy | None = None
) -> AuthorityStatus:
    """Every CA that still matters (not long expired) with its state and next transition."""
    policy = policy or RotationPolicy()
    now = ctx.clock.now()
    with Session(ctx.engine) as session:
        auth = session.get(AuthorityRow, authority)
        if auth is None:
            raise no_such_authority(authority)
        rows = session.exec(
            select(CaRow)
            .where(CaRow.authority == authority, col(CaRow.not_after) > now - dt.timedelta(days=1))
            .order_by(col(CaRow.role), col(CaRow.not_before))
        ).all()
        rotation = session.get(RootRotationRow, authority)
        bundle = sync_bundle(session, authority, now)
        session.commit()
        has_prepared = any(r.role == "intermediate" and r.state == "prepared" for r in rows)
        cas = []
        for row in rows:
            event, at = _next(policy, row, has_prepared, rotation)
            cas.append(
                CaStatus(
                    serial=row.serial,
                    role=row.role,
                    state=row.state,
                    subject=row.subject,
                    not_before=row.not_before,
                    not_after=row.not_after,
                    key_type=row.key_type,
                    key_backend=row.key_backend,
                    next_transition=event,
                    next_at=at,
                )
            )
        return AuthorityStatus(
            name=authority,
            trust_domain=auth.trust_domain,
            bundle_sequence=bundle.sequence,
            cas=tuple(cas),
            root_rotation=rotation.step if rotation else None,
            root_switch_after=rotation.switch_after if rotation else None,
        )


def _next(
    policy: RotationPolicy, row: CaRow, has_prepared: bool, rotation: RootRotationRow | None
) -> tuple[str | None, dt.datetime | None]:
    if row.role == "intermediate" and row.state == "active":
        if has_prepared:
            return "successor activates", policy.activate_at(row.not_before, row.not_after)
        return "successor prepared", prepare_at(policy, row)
    if row.role == "intermediate" and row.state in ("retired", "revoked"):
        return "expires", row.not_after
    if row.role != "root" or rotation is None:
        return None, None
    if rotation.step == "published" and row.id == rotation.new_root_id:
        return "switch (trellis authority rotate-root --step)", rotation.switch_after
    if rotation.step == "switched" and row.id == rotation.old_root_id:
        return "retire (trellis authority rotate-root --step)", None
    return None, None
