"""What ``/readyz`` asks of the issuing CAs: can every one this instance serves issue now?

Two questions. Is every active intermediate valid at this moment (``check_issuing_cas``)? An
expired one (its successor's activation failed, or the scheduler could not run) or one not valid
yet (this host's clock is behind) refuses every issuance, however usable its key is. And can
every key this instance signs with sign now, and is none of them at risk
(``check_issuing_keys``)?

Every authority's keys (the mesh's, and the gateway's and OpenVPN's where they are set up) are
checked, not only the mesh's: a replica whose gateway key file is missing (revoked and replaced
on another replica) fails every gateway issuance while the mesh issues fine. The check signs
nothing: each active intermediate's key is unlocked once per process (``ca_signer``, which
proves it is the certificate's key), and each backend then checks cheaply every key that signs
now (``ca.cas.signing_keys``: the active roots and intermediates, and their OCSP responders'
keys in Vault): a stat per key file; for Vault, one ``capabilities-self`` call and a read per
key, which finds a key gone, replaced, or made exportable or deletable behind Trellis's back
(``VaultKeyBackend.check_key``, the question ``trellis vault check`` asks too). ``/readyz`` is
polled, so a passing verdict is reused for ``READY_FOR`` seconds; a failing one is not, so that
a replica is back in rotation at the first probe after its key store is.

And is the database's schema still this code's (``check_schema``)? During a rolling upgrade the
first new replica migrates it while the old ones run on: those are taken out of rotation, and
stop their scheduled jobs (``ca.scheduler``), until the rollout replaces them.
"""

from __future__ import annotations

import time

from sqlmodel import Session, col, select

from ca.cas import ca_signer, signing_keys
from ca.clock import utc
from ca.config import Context
from ca.errors import Unavailable
from ca.store.db import SCHEMA_HEADS, newer_schema
from ca.store.models import CaRow

__all__ = ["READY_FOR", "check_issuing_cas", "check_issuing_keys", "check_schema"]

READY_FOR = 5.0  # seconds
_KEY = ("readiness", "issuing-keys")
_SCHEMA_KEY = ("readiness", "schema")


def check_schema(ctx: Context) -> None:
    """Raise ``Unavailable`` if a newer Trellis has migrated the database since this process
    started: its code no longer matches the tables (its jobs failed on ``job_run`` every 2 s
    and rewrote the new replicas' records). Asked by every scheduler tick and ``/readyz``
    probe, so a passing verdict is reused for ``READY_FOR`` seconds: one small query at most
    that often. Raises SQLAlchemy's error when the database cannot be reached."""
    now = time.monotonic()
    passed = ctx.cache.get(_SCHEMA_KEY)
    if isinstance(passed, float) and now - passed < READY_FOR:
        return
    ctx.cache.pop(_SCHEMA_KEY, None)
    newer = newer_schema(ctx.reads)
    if newer is not None:
        ours = ",".join(sorted(SCHEMA_HEADS))
        raise Unavailable(
            f"the database schema {newer} is newer than this version's {ours}:"
            " this replica is outdated"
        )
    ctx.cache[_SCHEMA_KEY] = now


def check_issuing_keys(ctx: Context) -> None:
    """Raise the reason (a ``TrellisError``, ``Unavailable`` mostly) if some issuing key cannot
    sign now."""
    now = time.monotonic()
    passed = ctx.cache.get(_KEY)
    if isinstance(passed, float) and now - passed < READY_FOR:
        return
    ctx.cache.pop(_KEY, None)
    _check(ctx)
    ctx.cache[_KEY] = now


def check_issuing_cas(ctx: Context, authority: str | None = None) -> None:
    """Raise ``Unavailable`` if some authority's (or ``authority``'s) issuing intermediate is
    missing or outside its validity at this moment: ``ca.issue.validity_window`` refuses every
    issuance then, so the replica is not ready. Asked at every probe (one small query), never
    cached: expiry comes with the clock, not with a change anyone makes."""
    now = ctx.clock.now()
    rows = [row for row in _issuing(ctx) if authority in (None, row.authority)]
    if authority is not None and not rows:
        raise Unavailable(f"authority {authority!r} has no active issuing CA")
    for row in rows:
        which = f"the issuing CA of authority {row.authority!r} ({row.serial[:12]})"
        if now < utc(row.not_before):
            raise Unavailable(
                f"{which} is not valid until {utc(row.not_before).isoformat()}: "
                "is this host's clock behind?"
            )
        if now >= utc(row.not_after):
            raise Unavailable(
                f"{which} expired at {utc(row.not_after).isoformat()}: "
                "nothing can be issued until it rotates"
            )


def _issuing(ctx: Context) -> list[CaRow]:
    """Each authority's issuing CA: its active intermediate, the one ``ca.authority``'s
    ``active_issuer`` signs with (the latest to expire) should there ever be more than one.
    A stray active row (left by a transition that raced, before every transition took the
    rotation lock) is not what issues, so its expiry must not make every replica unready for
    good."""
    with Session(ctx.engine) as session:
        rows = session.exec(
            select(CaRow)
            .where(CaRow.role == "intermediate", CaRow.state == "active")
            .order_by(col(CaRow.not_after).desc())
        ).all()
    issuing: dict[str, CaRow] = {}
    for row in rows:
        issuing.setdefault(row.authority, row)
    return list(issuing.values())


def _check(ctx: Context) -> None:
    for row in _issuing(ctx):
        ca_signer(ctx, row)
    ctx.keys.check(signing_keys(ctx, prepared=False))
