"""What an operator sees while PostgreSQL refuses Trellis's database (played here by
``ALLOW_CONNECTIONS false`` on the test's own database and its connections ended: the shared
server, and every other test's database, stay up): each failed issuance is counted as
``unavailable``, ``/metrics`` still answers with the per-process counters and says the
database state is missing, and the request log names the database's reason.
And a database that holds the state queries (a lock) leaves the scrape bounded."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from ca.config import Context
from ca.store import db
from tests.api.restkit import Rest, make_csr
from tests.api.test_metrics import Samples, _samples, _value

pytestmark = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)

ISSUED = "trellis_certificates_issued_total"
REFUSED = "is not currently accepting connections"  # PostgreSQL's reason


def _names(samples: Samples) -> set[str]:
    return {name for name, _labels in samples}


@pytest.fixture
def refused_database(ctx: Context) -> Iterator[None]:
    """Trellis's database refuses every connection until the test ends."""
    name = ctx.engine.url.database
    admin = sa.create_engine(
        ctx.engine.url.set(database="postgres"),
        poolclass=sa.pool.NullPool,
        isolation_level="AUTOCOMMIT",
    )

    def allow(allowed: bool) -> None:
        with admin.connect() as connection:
            connection.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {allowed}'))
            if not allowed:
                connection.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = :name"
                    ),
                    {"name": name},
                )

    allow(False)
    try:
        yield
    finally:
        allow(True)
        admin.dispose()


def test_issuances_failed_by_the_database_are_counted_as_unavailable(
    rest: Rest, ctx: Context, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    monkeypatch.setattr(db, "IDLE_PING_SECONDS", 3600.0)  # the pools' dead connections are used
    token = rest.join_token(rest.create_entry(), uses=5)
    svid = rest.enrol("spiffe://example.org/renewing")
    labels = {"authority": "mesh", "profile": "x509-svid", "result": "unavailable"}
    before = _value(_samples(rest.client), ISSUED, **labels)
    request.getfixturevalue("refused_database")

    csr = make_csr()[1]
    failed = [rest.request_svid(token, csr) for _ in range(3)]
    failed.append(rest.renew(svid, csr))
    assert [response.status_code for response in failed] == [503] * 4, failed[-1].text
    assert {response.json()["code"] for response in failed} == {"unavailable"}

    assert _value(_samples(rest.client), ISSUED, **labels) == before + 4  # once each


def test_metrics_answer_without_the_database_and_say_so(
    rest: Rest, ctx: Context, request: pytest.FixtureRequest
) -> None:
    rest.enrol()
    up = _samples(rest.client)
    assert _value(up, "trellis_state_up") == 1.0
    assert "trellis_active_certificates" in _names(up)
    request.getfixturevalue("refused_database")

    down = _samples(rest.client)  # 200 (``_scrape``), not the 503 of a failed query
    assert _value(down, "trellis_state_up") == 0.0
    assert ("trellis_state_up", frozenset()) in down
    assert not _names(down) & {
        "trellis_active_certificates",
        "trellis_ca_expiry_seconds",
        "trellis_crl_next_update_seconds",
        "trellis_job_last_success",
    }
    issued = {"authority": "mesh", "profile": "x509-svid", "result": "issued"}
    assert _value(down, ISSUED, **issued) == _value(up, ISSUED, **issued) >= 1


def test_the_log_names_the_database_reason_and_readyz_its_kind(
    rest: Rest, ctx: Context, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
) -> None:
    token = rest.join_token(rest.create_entry())
    request.getfixturevalue("refused_database")
    with caplog.at_level(logging.ERROR, logger="trellis.api"):
        # The first meets a pooled connection that was ended ("terminating connection due to
        # administrator command"), the second a refused new one.
        for _ in range(2):
            assert rest.request_svid(token, make_csr()[1]).status_code == 503
    lines = [r.getMessage() for r in caplog.records if r.name == "trellis.api"]
    assert any(line.startswith("database unavailable: ") and REFUSED in line for line in lines)
    assert all("\n" not in line for line in lines)

    # /readyz is public: it names the kind of failure, not the driver's words (libpq's name
    # the database's host and user); the log has those.
    ready = rest.client.get("/readyz")
    assert ready.status_code == 503
    database = ready.json()["detail"]["database"]
    assert database == "unavailable: OperationalError", database


def test_a_scrape_held_by_a_locked_table_is_bounded(rest: Rest, ctx: Context) -> None:
    """An ACCESS EXCLUSIVE lock (a migration's, a hand-run ``LOCK TABLE``) holds every read
    of the table: the state is left out after ``STATE_QUERY_TIMEOUT_MS``, the counters served."""
    rest.enrol()
    locker = sa.create_engine(ctx.engine.url, poolclass=sa.pool.NullPool)
    release = threading.Event()

    def hold() -> None:
        with locker.connect() as connection, connection.begin():
            connection.execute(sa.text("LOCK TABLE certificate IN ACCESS EXCLUSIVE MODE"))
            locked.set()
            release.wait(15)  # the old scrape waited for it: for ever, but for this

    locked = threading.Event()
    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert locked.wait(10)
        started = time.monotonic()
        samples = _samples(rest.client)
        took = time.monotonic() - started
    finally:
        release.set()
        holder.join()
        locker.dispose()
    assert _value(samples, "trellis_state_up") == 0.0
    assert "trellis_active_certificates" not in _names(samples)
    assert took < 10, took
