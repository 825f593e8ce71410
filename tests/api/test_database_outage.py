"""PostgreSQL connections lost under Trellis (a database restart or failover, played here by
``pg_terminate_backend`` on every connection of Trellis's database): an idle pool is checked and
refilled before use, a busy one fails only the request in flight, with a 503 problem, and the
next request works. Real PostgreSQL only (SQLite has no connections to lose)."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from ca.config import Context
from ca.store import db
from tests.api.restkit import Rest, make_csr

pytestmark = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)


def terminate_trellis_connections(ctx: Context) -> int:
    """Kill every server process serving Trellis's pool, from a connection of its own."""
    killer = sa.create_engine(ctx.engine.url, poolclass=sa.pool.NullPool)
    with killer.connect() as connection:
        killed = connection.execute(
            sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalar_one()
    killer.dispose()
    return int(killed)


def test_an_idle_pool_is_pinged_and_refilled_before_use(
    rest: Rest, ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "IDLE_PING_SECONDS", 0.2)
    token = rest.join_token(rest.create_entry(), uses=2)
    assert rest.request_svid(token, make_csr()[1]).status_code == 200
    assert terminate_trellis_connections(ctx) >= 1
    time.sleep(0.3)  # the pool's connections are now "idle": checked before use

    response = rest.request_svid(token, make_csr()[1])
    assert response.status_code == 200, response.text


def test_a_busy_pool_fails_the_request_in_flight_with_503_then_recovers(
    rest: Rest, ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "IDLE_PING_SECONDS", 3600.0)  # no pings: as under load
    token = rest.join_token(rest.create_entry(), uses=2)
    assert rest.request_svid(token, make_csr()[1]).status_code == 200
    assert terminate_trellis_connections(ctx) >= 1

    failed = rest.request_svid(token, make_csr()[1])
    assert failed.status_code == 503, failed.text
    assert failed.headers["content-type"] == "application/problem+json"
    assert failed.json()["detail"] == "the database cannot be reached right now"

    recovered = rest.request_svid(token, make_csr()[1])
    assert recovered.status_code == 200, recovered.text
    with ctx.engine.connect() as connection:
        issued = connection.execute(
            sa.text("SELECT count(*) FROM certificate WHERE profile = 'x509-svid'")
        ).scalar_one()
    assert issued == 2  # the failed request wrote nothing
