"""Registration entries: which SPIFFE IDs may be issued, with which DNS names and lifetimes."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlmodel import Session, col, select

from ca import audit
from ca.authority import MESH, load_authority
from ca.config import Context
from ca.csr import check_dns_name
from ca.durations import Ttl, svid_ttl
from ca.errors import Conflict, InvalidInput, NotFound, PolicyViolation
from ca.identity import SpiffeId, TrustDomain
from ca.store import locks
from ca.store.models import EntryRow, TokenRow

__all__ = [
    "DEFAULT_MAX_TTL",
    "Entry",
    "EntryParams",
    "check_not_reserved",
    "create_entry",
    "delete_entry",
    "get_entry",
    "list_entries",
]

DEFAULT_MAX_TTL = Ttl(24 * 3600)
MAX_DNS_NAMES = 32
# Identities Trellis issues to itself (its serving certificate); nobody may register them.
RESERVED_PREFIX = "/trellis"


def check_not_reserved(spiffe_id: SpiffeId) -> None:
    """Refuse Trellis's own identities: an SVID for ``/trellis/server`` would let its holder
    pose as the CA's serving endpoint to every client that pins the bundle."""
    if spiffe_id.path == RESERVED_PREFIX or spiffe_id.path.startswith(RESERVED_PREFIX + "/"):
        raise PolicyViolation(f"paths under {RESERVED_PREFIX}/ are reserved for Trellis itself")


@dataclass(frozen=True, slots=True)
class EntryParams:
    spiffe_id: SpiffeId
    dns_names: Sequence[str] = ()
    ttl: Ttl | None = None
    max_ttl: Ttl | None = None


@dataclass(frozen=True, slots=True)
class Entry:
    id: str
    spiffe_id: SpiffeId
    dns_names: tuple[str, ...]
    ttl: Ttl
    max_ttl: Ttl
    created_at: dt.datetime
    disabled_at: dt.datetime | None = None

    @property
    def enabled(self) -> bool:
        return self.disabled_at is None


def _entry(row: EntryRow) -> Entry:
    return Entry(
        id=row.id,
        spiffe_id=SpiffeId.parse(row.spiffe_id),
        dns_names=tuple(name for name in row.dns_names.split(",") if name),
        ttl=Ttl(row.ttl_seconds),
        max_ttl=Ttl(row.max_ttl_seconds),
        created_at=row.created_at,
        disabled_at=row.disabled_at,
    )


def create_entry(ctx: Context, params: EntryParams, *, actor: str = "local") -> Entry:
    authority = load_authority(ctx, MESH)
    trust_domain = TrustDomain(authority.trust_domain)
    spiffe_id = params.spiffe_id
    if not spiffe_id.member_of(trust_domain):
        raise PolicyViolation(f"{spiffe_id} is not in this CA's trust domain {trust_domain}")
    if spiffe_id.is_trust_domain_id:
        raise PolicyViolation("a workload identity needs a path: spiffe://<td> names the CA itself")
    check_not_reserved(spiffe_id)
    if len(params.dns_names) > MAX_DNS_NAMES:
        raise InvalidInput(f"at most {MAX_DNS_NAMES} DNS names per entry")
    dns = tuple(dict.fromkeys(check_dns_name(name) for name in params.dns_names))
    max_ttl = params.max_ttl or DEFAULT_MAX_TTL
    ttl = params.ttl or min(Ttl(authority.svid_ttl_seconds), max_ttl)
    if ttl > max_ttl:
        raise InvalidInput(f"the entry's TTL {ttl} exceeds its max TTL {max_ttl}")
    svid_ttl(max_ttl, "the entry's max TTL")
    svid_ttl(ttl, "the entry's TTL" if params.ttl else "the entry's TTL (the CA's SVID TTL)")
    row = EntryRow(
        id=str(uuid.uuid4()),
        authority=MESH,
        spiffe_id=str(spiffe_id),
        dns_names=",".join(dns),
        ttl_seconds=ttl.seconds,
        max_ttl_seconds=max_ttl.seconds,
        created_at=ctx.clock.now(),
    )
    with Session(ctx.engine) as session:
        if session.exec(select(EntryRow).where(EntryRow.spiffe_id == row.spiffe_id)).first():
            raise Conflict(f"an entry for {spiffe_id} already exists")
        session.add(row)
        audit.record(
            session,
            "entry.created",
            row.spiffe_id,
            actor=actor,
            at=row.created_at,
            detail={"id": row.id, "dns": row.dns_names, "ttl": row.ttl_seconds},
        )
        try:
            session.commit()
        except sa.exc.IntegrityError:
            raise Conflict(f"an entry for {spiffe_id} already exists") from None
        session.refresh(row)
        return _entry(row)


def _parse_id(entry_id: str) -> str:
    try:
        return str(uuid.UUID(entry_id))
    except ValueError:
        raise NotFound(f"registration entry {entry_id[:40]!r} does not exist") from None


def get_entry(ctx: Context, entry_id: str) -> Entry:
    with Session(ctx.engine) as session:
        row = session.get(EntryRow, _parse_id(entry_id))
    if row is None:
        raise NotFound(f"registration entry {entry_id[:40]!r} does not exist")
    return _entry(row)


def list_entries(ctx: Context) -> list[Entry]:
    with Session(ctx.engine) as session:
        rows = session.exec(select(EntryRow).order_by(EntryRow.spiffe_id)).all()
    return [_entry(row) for row in rows]


def delete_entry(ctx: Context, entry_id: str, *, actor: str = "local") -> Entry:
    """Delete an entry and its join tokens. Its certificates stay valid until they expire or are
    revoked, but can no longer be renewed (renewal requires the entry).

    An issuance under way for the entry (a join, a renewal) is recorded before the deletion
    commits or waits for it and is refused: none is recorded after (``ca.store.locks``). A
    second deletion waits for the first and finds nothing to delete (404)."""
    entry_id = _parse_id(entry_id)
    with Session(ctx.engine) as session:
        locks.withdrawing(session.connection(), locks.entry_name(entry_id))
        row = session.get(EntryRow, entry_id)
        if row is None:
            raise NotFound(f"registration entry {entry_id[:40]!r} does not exist")
        entry = _entry(row)
        session.execute(sa.delete(TokenRow).where(col(TokenRow.entry_id) == row.id))
        session.delete(row)
        audit.record(
            session,
            "entry.deleted",
            row.spiffe_id,
            actor=actor,
            at=ctx.clock.now(),
            detail={"id": row.id},
        )
        session.commit()
    return entry


def set_entry_enabled(ctx: Context, entry_id: str, enabled: bool, *, actor: str = "local") -> Entry:
    """A disabled entry issues nothing (no join, no renewal) until enabled again: the way to stop
    a revoked identity from coming straight back with a fresh certificate. An issuance under
    way for it is recorded before the change commits or waits for it and is refused
    (``ca.store.locks``).

    Idempotent, as ``ca.gateway.disable_consumer``: an entry already in the state asked for is
    returned as it is (a disabled one keeps the time it was disabled) and nothing is recorded,
    so the audit trail holds one ``entry.disabled`` per actual change."""
    entry_id = _parse_id(entry_id)
    with Session(ctx.engine) as session:
        locks.withdrawing(session.connection(), locks.entry_name(entry_id))
        row = session.get(EntryRow, entry_id)
        if row is None:
            raise NotFound(f"registration entry {entry_id[:40]!r} does not exist")
        if (row.disabled_at is None) == enabled:
            return _entry(row)
        row.disabled_at = None if enabled else ctx.clock.now()
        session.add(row)
        audit.record(
            session,
            "entry.enabled" if enabled else "entry.disabled",
            row.spiffe_id,
            actor=actor,
            at=ctx.clock.now(),
            detail={"id": row.id},
        )
        session.commit()
        session.refresh(row)
        return _entry(row)
