"""The published trust bundle: which roots relying parties trust, and its sequence number.

The bundle is stored (``bundle_state``) rather than recomputed per request, so every replica
serves the same bytes with the same sequence, and the sequence changes exactly when the content
does (SPIFFE bundle ``spiffe_sequence`` semantics). ``sync_bundle`` recomputes it inside the
transaction that changed a CA's state, and the rotation job calls it so time-based pruning of
expired roots also bumps the sequence.

``<data dir>/bundle.pem`` is the mesh bundle as a file, for operators and relying parties on the
host; every command that changes the mesh's trust anchors rewrites it (``write_bundle_file``), so
it is current whether or not a server is running.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

from sqlmodel import Session, col, select

from ca.config import Context
from ca.errors import NotInitialised
from ca.files import write_atomic
from ca.store.models import BundleStateRow, CaRow

__all__ = [
    "EXPIRED_GRACE",
    "TRUSTED_ROOT_STATES",
    "Bundle",
    "read_bundle",
    "sync_bundle",
    "trust_anchors",
    "write_bundle_file",
]

# Roots stay in the bundle this long after expiring, so a relying party's clock skew or a stale
# certificate in flight produces an "expired" error rather than "unknown authority".
EXPIRED_GRACE = dt.timedelta(hours=1)
TRUSTED_ROOT_STATES = ("active", "prepared", "retiring")


class Bundle:
    __slots__ = ("authority", "pem", "sequence")

    def __init__(self, authority: str, sequence: int, pem: bytes) -> None:
        self.authority = authority
        self.sequence = sequence
        self.pem = pem


def trust_anchors(session: Session, authority: str, now: dt.datetime) -> list[CaRow]:
    return list(
        session.exec(
            select(CaRow)
            .where(
                CaRow.authority == authority,
                CaRow.role == "root",
                col(CaRow.state).in_(TRUSTED_ROOT_STATES),
                col(CaRow.not_after) > now - EXPIRED_GRACE,
            )
            .order_by(col(CaRow.not_before), col(CaRow.id))
        ).all()
    )


def sync_bundle(
    session: Session, authority: str, now: dt.datetime, *, after: int = 0
) -> BundleStateRow:
    """Recompute the bundle in the caller's transaction; bump the sequence only on change.

    A new bundle starts at ``after + 1``: ``init --force`` passes the replaced bundle's
    sequence, as a SPIFFE federation peer refuses a bundle of the same trust domain whose
    sequence went backwards."""
    pem = "".join(row.cert_pem for row in trust_anchors(session, authority, now))
    digest = hashlib.sha256(pem.encode()).hexdigest()
    state = session.get(BundleStateRow, authority, with_for_update=True)
    if state is None:
        state = BundleStateRow(
            authority=authority, sequence=after + 1, digest=digest, pem=pem, updated_at=now
        )
    elif state.digest != digest:
        state.sequence, state.digest, state.pem, state.updated_at = (
            state.sequence + 1,
            digest,
            pem,
            now,
        )
    else:
        return state
    session.add(state)
    session.flush()
    return state


def read_bundle(ctx: Context, authority: str) -> Bundle:
    with Session(ctx.engine) as session:
        state = session.get(BundleStateRow, authority)
    if state is None:
        raise NotInitialised(f"authority {authority!r} has no trust bundle: run 'trellis init'")
    return Bundle(authority, state.sequence, state.pem.encode())


def write_bundle_file(ctx: Context) -> Path:
    """Write the mesh bundle to ``<data dir>/bundle.pem`` unless it holds those bytes already
    (the scheduled jobs call this every few seconds: no rewrite, no fsync, when nothing changed)."""
    path = ctx.settings.data_dir / "bundle.pem"
    pem = read_bundle(ctx, "mesh").pem
    try:
        current = path.read_bytes()
    except FileNotFoundError:
        current = None
    if current != pem:
        write_atomic(path, pem)
    return path
