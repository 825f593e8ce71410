"""``ca.store.core.Prepared``: the group commit's statements run on the DBAPI cursor write and
read exactly what ``connection.execute`` would, fail with SQLAlchemy's exceptions, and go back
through ``execute`` when something listens to the engine's statements."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import sqlalchemy as sa

from ca import audit
from ca.authority import _ACTIVE, MESH, active_issuer
from ca.config import Context
from ca.grants import _JOINS
from ca.records import _INSERT as CERTIFICATE_INSERT
from ca.store.core import CACHED_KEYS, Prepared, prepared, table
from ca.store.models import CertificateRow
from ca.tokens import _SPEND, hash_secret
from tests.ca.svidkit import add_entry, join_secret, uses_remaining

WEB = "spiffe://example.org/ns/default/sa/web"
_CERTS = table(CertificateRow)


def _certificate_row(ctx: Context, serial: str) -> dict[str, Any]:
    issuer = active_issuer(ctx)
    at = dt.datetime(2026, 11, 26, 12, 34, 56, 789012, tzinfo=dt.UTC)
    return {
        "serial": serial,
        "authority": issuer.authority,
        "issuer_ca_id": issuer.ca_id,
        "profile": "x509-svid",
        "spiffe_id": WEB,
        "entry_id": None,
        "fingerprint_sha256": serial.rjust(64, "0"),
        "not_before": at,
        "not_after": at + dt.timedelta(hours=1),
        "status": "active",
        "requested_by": "token:é✓",
        "cert_pem": "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
        "created_at": at,
    }


def _stored(ctx: Context, serial: str) -> dict[str, Any]:
    with ctx.engine.connect() as connection:
        row = connection.execute(sa.select(_CERTS).where(_CERTS.c.serial == serial)).one()
    return {k: v for k, v in row._asdict().items() if k not in ("serial", "fingerprint_sha256")}


def test_rows_inserted_on_the_cursor_read_back_like_rows_inserted_by_execute(
    ctx: Context,
) -> None:
    with ctx.engine.begin() as connection:
        connection.execute(CERTIFICATE_INSERT, [_certificate_row(ctx, "a1")])
        changed = prepared(CERTIFICATE_INSERT).executemany(
            connection, [_certificate_row(ctx, "b1"), _certificate_row(ctx, "b2")]
        )
    assert changed == 2
    reference = _stored(ctx, "a1")
    assert reference["not_before"] == dt.datetime(2026, 11, 26, 12, 34, 56, 789012, tzinfo=dt.UTC)
    assert _stored(ctx, "b1") == reference
    assert _stored(ctx, "b2") == reference
    # and as the database holds them, before SQLAlchemy reads them (SQLite keeps text)
    with ctx.engine.connect() as connection:
        raw = {
            serial: rest
            for serial, *rest in connection.exec_driver_sql(
                "SELECT serial, not_before, not_after, created_at, entry_id FROM certificate"
                " WHERE serial IN ('a1', 'b1', 'b2')"
            )
        }
    assert raw["b1"] == raw["a1"] and raw["b2"] == raw["a1"]


def test_audit_records_chain_the_same_whichever_way_they_were_inserted(ctx: Context) -> None:
    at = ctx.clock.now()
    entry = audit.entry("test.event", "s", actor="t", at=at, detail={"k": [1, "é"]})
    with ctx.engine.begin() as connection:
        connection.execute(audit.INSERT, [entry])
        prepared(audit.INSERT).executemany(connection, [dict(entry)])
    audit.seal(ctx, settle=dt.timedelta(0))
    result = audit.verify(ctx)
    assert result.ok, result.problems
    mine = [e for e in audit.list_audit(ctx, event="test.event")]
    assert len(mine) == 2
    assert {(e.at, e.actor, e.subject, str(e.detail)) for e in mine} == {
        (at, "t", "s", "{'k': [1, 'é']}")
    }


def test_spending_counts_the_rows_changed_and_refuses_what_a_token_no_longer_has(
    ctx: Context,
) -> None:
    token_id, _ = join_secret(ctx, add_entry(ctx, WEB), uses=3)
    spend = prepared(_SPEND)
    now = ctx.clock.now()
    with ctx.engine.begin() as connection:
        assert spend.executemany(connection, [{"key": token_id, "uses": 2, "now": now}]) == 1
        assert spend.executemany(connection, [{"key": token_id, "uses": 2, "now": now}]) == 0
        assert spend.executemany(connection, [{"key": "nope", "uses": 1, "now": now}]) == 0
    assert uses_remaining(ctx, token_id) == 1
    later = now + dt.timedelta(days=30)  # the token expired: nothing is spent
    with ctx.engine.begin() as connection:
        assert spend.executemany(connection, [{"key": token_id, "uses": 1, "now": later}]) == 0


def test_the_active_ca_check_reads_what_execute_reads(ctx: Context) -> None:
    with ctx.engine.connect() as connection:
        expected = connection.execute(_ACTIVE, {"authority": MESH}).first()
        assert expected is not None
        assert prepared(_ACTIVE).first(connection, {"authority": MESH}) == tuple(expected)
        assert prepared(_ACTIVE).first(connection, {"authority": "nobody"}) is None


def test_a_driver_error_is_sqlalchemys_and_rolls_the_transaction_back(ctx: Context) -> None:
    with pytest.raises(sa.exc.IntegrityError), ctx.engine.begin() as connection:
        prepared(CERTIFICATE_INSERT).executemany(connection, [_certificate_row(ctx, "c1")])
        prepared(CERTIFICATE_INSERT).executemany(connection, [_certificate_row(ctx, "c1")])
    with ctx.engine.connect() as connection:
        count = connection.execute(
            sa.select(sa.func.count()).select_from(_CERTS).where(_CERTS.c.serial == "c1")
        ).scalar_one()
    assert count == 0


def test_a_statement_needing_a_value_it_was_not_given_is_refused(ctx: Context) -> None:
    with ctx.engine.connect() as connection, pytest.raises(ValueError, match="not given"):
        prepared(_ACTIVE).first(connection, {})


def test_with_a_listener_on_the_engine_the_statements_go_through_execute(ctx: Context) -> None:
    seen: list[str] = []

    def listen(_c: object, _cur: object, statement: str, *_rest: object) -> None:
        seen.append(statement.split()[0].upper())

    row = _certificate_row(ctx, "d1")
    sa.event.listen(ctx.engine, "before_cursor_execute", listen)
    try:
        with ctx.engine.begin() as connection:
            prepared(CERTIFICATE_INSERT).executemany(connection, [row])
            active = prepared(_ACTIVE).first(connection, {"authority": MESH})
    finally:
        sa.event.remove(ctx.engine, "before_cursor_execute", listen)
    assert seen == ["INSERT", "SELECT"]
    assert active is not None and active[0] == active_issuer(ctx).ca_id
    assert _stored(ctx, "d1")["requested_by"] == "token:é✓"


def test_lookups_read_back_what_execute_reads_datetimes_included(ctx: Context) -> None:
    secrets = [join_secret(ctx, add_entry(ctx, f"{WEB}/{i}"), uses=2)[1] for i in range(3)]
    keys = [hash_secret(secret) for secret in secrets[:2]] + ["not-a-token"]
    statement = _JOINS.query.statement
    with ctx.engine.connect() as connection:
        expected = {
            row["lookup_key"]: dict(row)
            for row in connection.execute(statement, {"keys": keys}).mappings()
        }
        found = {key: dict(row) for key, row in _JOINS.many(connection, keys).items()}
        one = _JOINS.one(connection, keys[1])
    assert set(found) == set(keys[:2])
    assert found == expected
    assert isinstance(found[keys[0]]["expires_at"], dt.datetime)
    assert found[keys[0]]["expires_at"].tzinfo is not None
    assert one is not None and dict(one) == expected[keys[1]]


def test_a_lookup_keeps_compiled_forms_only_up_to_a_bound(ctx: Context) -> None:
    """One compiled form per number of keys: bounded, whatever number of keys is asked for."""
    lookup = Prepared(_JOINS.query.statement)
    with ctx.engine.connect() as connection:
        for count in (1, 2, CACHED_KEYS, CACHED_KEYS + 1, 3 * CACHED_KEYS):
            assert lookup.rows(connection, {"keys": [f"k{i}" for i in range(count)]}) == []
    assert sorted(n for _, _, ((_, n),) in lookup._compiled) == [1, 2, CACHED_KEYS]
