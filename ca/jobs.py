"""Scheduled maintenance, run by ``trellis serve``'s scheduler (and callable by hand).

Each job is idempotent and safe to run on several replicas at once: CRL re-signing takes a row
lock and re-checks whether it is still due, nonce pruning only deletes what has expired.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlmodel import Session, col

from ca.config import Context
from ca.crl import refresh_stale_crls
from ca.store.models import RenewalNonceRow

__all__ = ["JOBS", "Job", "prune_renewal_nonces", "resign_crls"]

log = logging.getLogger("trellis.jobs")


def resign_crls(ctx: Context) -> str:
    refreshed = refresh_stale_crls(ctx)
    for crl in refreshed:
        log.info("re-signed CRL #%d of CA %s", crl.number, crl.ca_serial)
    return f"re-signed {len(refreshed)} CRL(s)"


def prune_renewal_nonces(ctx: Context) -> str:
    """A spent proof's jti is only needed until the proof itself expires."""
    with Session(ctx.engine) as session:
        result = session.execute(
            sa.delete(RenewalNonceRow).where(col(RenewalNonceRow.expires_at) < ctx.clock.now())
        )
        session.commit()
    return f"pruned {result.rowcount} spent renewal proof(s)"  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Job:
    name: str
    every_seconds: int
    run: Callable[[Context], str]


JOBS = (
    Job("crl-resign", 300, resign_crls),
    Job("prune-renewal-nonces", 3600, prune_renewal_nonces),
)
