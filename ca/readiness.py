"""What ``/readyz`` asks of the keys: can every issuing key this instance serves sign now?

Every authority's active intermediate (the mesh, and the gateway's and OpenVPN's where they are
set up) is checked, not only the mesh's: a replica whose gateway key file is missing (revoked and
replaced on another replica) fails every gateway issuance while the mesh issues fine. The check
signs nothing: each key is unlocked once per process (``ca_signer``, which proves it is the
certificate's key), and each backend then checks cheaply that it can still sign with it (a stat
per key file; for Vault, one ``capabilities-self`` call and a read per key). ``/readyz`` is
polled, so a passing verdict is reused for ``READY_FOR`` seconds; a failing one is not, so that
a replica is back in rotation at the first probe after its key store is.
"""

from __future__ import annotations

import time

from sqlmodel import Session, select

from ca.cas import ca_certificate, ca_handle, ca_signer
from ca.config import Context
from ca.store.models import CaRow

__all__ = ["READY_FOR", "check_issuing_keys"]

READY_FOR = 5.0  # seconds
_KEY = ("readiness", "issuing-keys")


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


def _check(ctx: Context) -> None:
    with Session(ctx.engine) as session:
        rows = session.exec(
            select(CaRow).where(CaRow.role == "intermediate", CaRow.state == "active")
        ).all()
    for row in rows:
        ca_signer(ctx, row)
    ctx.keys.check([(ca_handle(row), ca_certificate(ctx, row).public_key()) for row in rows])
