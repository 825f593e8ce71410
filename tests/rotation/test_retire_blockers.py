"""What holds a root's retirement up (docs/rotation.md, step 3): only certificates of the old
hierarchy still in use. Trellis's own serving certificate, replaced at the switch, is revoked
(superseded) by the replica that replaced it, and a refusal names what it waits for."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlmodel import Session

from ca.clock import FixedClock
from ca.config import Context, Settings, build_context
from ca.errors import Conflict
from ca.jobs import renew_server_certificate
from ca.root_rotation import rotate_root
from ca.serving import REPLACED_BY, ensure_server_certificate
from ca.store.models import CertificateRow
from tests.ca.svidkit import enrol
from tests.conftest import PASSPHRASE
from tests.rotation.rotkit import BOTH_DATABASES, SQLITE_ONLY, SVID_TTL
from tests.rotation.test_root_rotation import OVERLAP, switch_after

SECOND = dt.timedelta(seconds=1)
SERVER_ID = "spiffe://example.org/trellis/server"


def row(ctx: Context, serial: object) -> CertificateRow:
    with Session(ctx.engine) as session:
        found = session.get(CertificateRow, str(serial))
    assert found is not None
    return found


@pytest.fixture
def replica_b(drill_ctx: Context, clock: FixedClock, tmp_path: Path) -> Iterator[Context]:
    """A second ``trellis serve`` on the same database: its own data directory (and so its own
    serving pair), the same CA keys."""
    data_dir = tmp_path / "replica-b"
    data_dir.mkdir(mode=0o700)
    (data_dir / "keys").symlink_to(drill_ctx.settings.data_dir / "keys")  # one key store
    settings = Settings(
        data_dir=data_dir,
        database_url=drill_ctx.settings.database_url,
        key_passphrase=SecretStr(PASSPHRASE),
        node_name="node-b",
    )
    ctx = build_context(settings, clock=clock)
    yield ctx
    ctx.writes.close()
    ctx.close()


@BOTH_DATABASES
def test_retire_waits_for_svids_not_for_the_serving_certificate_the_switch_replaced(
    drill_ctx: Context, clock: FixedClock
) -> None:
    """The switch gives the serving certificate a new issuer, so the `server-certificate` job
    issues a new one, and the old one stayed valid until the old intermediate expired (7 days
    by default): the retirement was refused that long, "stay valid until <date>", naming
    nothing. Now the replaced one is revoked, and the retirement waits for the SVIDs only."""
    first = ensure_server_certificate(drill_ctx).issued
    assert first is not None
    rotate_root(drill_ctx, overlap=OVERLAP)
    switch_at = switch_after(drill_ctx)
    clock.current = switch_at - SECOND
    last_old = enrol(drill_ctx, "spiffe://example.org/r/last-old").svid
    clock.current = switch_at
    rotate_root(drill_ctx, step=True)

    assert renew_server_certificate(drill_ctx).startswith("renewed the serving certificate")
    replaced = row(drill_ctx, first)
    assert (replaced.status, replaced.revocation_reason, replaced.revoked_by) == (
        "revoked",
        "superseded",
        REPLACED_BY,
    )
    assert renew_server_certificate(drill_ctx) == "serving certificate current"

    assert last_old.expires_at == switch_at - SECOND + SVID_TTL.delta
    clock.current = last_old.expires_at - SECOND
    with pytest.raises(Conflict) as refused:
        rotate_root(drill_ctx, step=True)
    assert refused.value.detail == (
        "1 certificate(s) from the old hierarchy stay valid until "
        f"{last_old.expires_at.isoformat()}: {last_old.serial} spiffe://example.org/r/last-old "
        f"({row(drill_ctx, last_old.serial).profile}, until {last_old.expires_at.isoformat()})"
        "; retiring the old root now would break them: wait until they expire, revoke those "
        "no longer in use, or force the step"
    )

    clock.current = last_old.expires_at
    assert rotate_root(drill_ctx, step=True).step == "retired"


@SQLITE_ONLY
def test_a_replica_revokes_only_its_own_replaced_certificate_and_the_refusal_names_the_other(
    drill_ctx: Context, replica_b: Context, clock: FixedClock
) -> None:
    """Each replica serves its own pair: replica A's renewal after the switch revokes the
    certificate in A's files, never B's, which B still presents. B (gone, say) then holds the
    retirement up, and the refusal names its serving certificate, latest to expire first,
    so the operator knows what to revoke; five are named, the rest counted."""
    a_first = ensure_server_certificate(drill_ctx).issued
    b_first = ensure_server_certificate(replica_b).issued
    assert a_first is not None and b_first is not None and a_first != b_first
    rotate_root(drill_ctx, overlap=OVERLAP)
    clock.current = switch_after(drill_ctx) - SECOND
    svids = [enrol(drill_ctx, f"spiffe://example.org/r/{n}").svid for n in range(6)]
    clock.current += SECOND
    rotate_root(drill_ctx, step=True)

    assert renew_server_certificate(drill_ctx).startswith("renewed the serving certificate")
    assert row(drill_ctx, a_first).status == "revoked"
    b_row = row(drill_ctx, b_first)
    assert b_row.status == "active"

    clock.current = svids[-1].expires_at + SECOND  # the SVIDs are gone, B's certificate is not
    with pytest.raises(Conflict) as refused:
        rotate_root(drill_ctx, step=True)
    until = b_row.not_after.isoformat()
    assert refused.value.detail.startswith(
        f"1 certificate(s) from the old hierarchy stay valid until {until}: "
        f"{b_first} {SERVER_ID} (server, until {until}); "
    )

    clock.current = svids[-1].expires_at - SECOND  # all seven: five named, B's first
    with pytest.raises(Conflict) as refused:
        rotate_root(drill_ctx, step=True)
    detail = refused.value.detail
    assert detail.startswith(f"7 certificate(s) from the old hierarchy stay valid until {until}")
    assert detail.index(str(b_first)) < min(detail.index(str(s.serial)) for s in svids[:4])
    assert sum(str(s.serial) in detail for s in svids) == 4
    assert " and 2 more; " in detail
    assert detail.endswith(
        "wait until they expire, revoke those no longer in use, or force the step"
    )

    assert renew_server_certificate(replica_b).startswith("renewed the serving certificate")
    assert row(drill_ctx, b_first).status == "revoked"
    clock.current = svids[-1].expires_at
    assert rotate_root(drill_ctx, step=True).step == "retired"
