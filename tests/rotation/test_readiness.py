"""``/readyz`` and the issuing CA's validity (docs/operations.md "Health"): a replica whose
active intermediate has expired, or is not valid yet, issues nothing, so it is not ready,
however usable its key is."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from api.app import create_app
from ca.clock import FixedClock, utc
from ca.config import Context
from ca.errors import Unavailable
from ca.readiness import check_issuing_cas, check_issuing_keys
from ca.rotation import rotate
from tests.ca.svidkit import enrol
from tests.rotation.rotkit import BOTH_DATABASES, SQLITE_ONLY, activate_moment, only

SECOND = dt.timedelta(seconds=1)


@SQLITE_ONLY
def test_readyz_is_unready_once_the_active_intermediate_has_expired(
    drill_ctx: Context, clock: FixedClock
) -> None:
    active = only(drill_ctx, "intermediate", "active")
    with TestClient(create_app(drill_ctx)) as client:
        clock.current = utc(active.not_after) - SECOND  # its last second: it still issues
        enrol(drill_ctx, "spiffe://example.org/w/last-second")
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["detail"]["ca"] == "ok"

        clock.current = utc(active.not_after)  # no rotation ran: nothing can be issued now
        with pytest.raises(Unavailable, match="expires now"):
            enrol(drill_ctx, "spiffe://example.org/w/too-late")
        ready = client.get("/readyz")
        assert ready.status_code == 503, ready.text
        body = ready.json()
        assert body["status"] == "unavailable"
        assert body["detail"]["keys"] == "ok", "the key still signs: the CA is what is wrong"
        assert body["detail"]["ca"] == (
            f"the issuing CA of authority 'mesh' ({active.serial[:12]}) expired at "
            f"{utc(active.not_after).isoformat()}: nothing can be issued until it rotates"
        )


@SQLITE_ONLY
def test_readyz_is_unready_before_the_active_intermediate_is_valid(
    drill_ctx: Context, clock: FixedClock
) -> None:
    active = only(drill_ctx, "intermediate", "active")
    clock.current = utc(active.not_before) - SECOND  # this host's clock behind the CA's
    with TestClient(create_app(drill_ctx)) as client:
        with pytest.raises(Unavailable, match="not valid yet"):
            enrol(drill_ctx, "spiffe://example.org/w/early")
        ready = client.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert "is not valid until" in ready.json()["detail"]["ca"]

        clock.current = utc(active.not_before)
        assert client.get("/readyz").status_code == 200


@BOTH_DATABASES
def test_a_stray_active_intermediate_that_expired_is_not_the_issuing_ca(
    drill_ctx: Context, clock: FixedClock
) -> None:
    """Regression: racing transitions (before they all took the rotation lock) left extra rows
    in state ``active``; once one of them expired every replica's /readyz was 503 for good,
    though the intermediate that issues (the latest to expire) was fine. A database that still
    has such a row (migration 0019 mends them; here its index is dropped to make one) is judged
    by the CA that issues."""
    old = only(drill_ctx, "intermediate", "active")
    clock.current = activate_moment(old)
    rotate(drill_ctx, force=True)
    rotate(drill_ctx, force=True)
    new = only(drill_ctx, "intermediate", "active")
    assert new.serial != old.serial
    with drill_ctx.engine.begin() as connection:
        connection.execute(sa.text("DROP INDEX IF EXISTS uq_ca_one_active_intermediate"))
        connection.execute(
            sa.text("UPDATE ca SET state = 'active' WHERE serial = :s"), {"s": old.serial}
        )
    clock.current = utc(old.not_after) + SECOND  # the stray has expired; the issuer has not

    check_issuing_cas(drill_ctx)
    check_issuing_keys(drill_ctx)
    assert enrol(
        drill_ctx, "spiffe://example.org/w/after"
    ).svid.issuer.certificate.serial_number == (int(new.serial, 16))
