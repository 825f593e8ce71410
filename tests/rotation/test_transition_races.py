"""Every CA transition of an authority takes its rotation lock and reads the state under it
(docs/rotation.md): an emergency revocation racing a rotation, or another emergency revocation,
on one real database. Each race is made to happen: one side is held inside its transaction
(``tests.ca.racekit``) while the other runs.

Regression (a probe with three ``trellis serve`` replicas on one PostgreSQL): the revocation
took no rotation lock, so an activation that had read the state before it committed retired the
revoked CA (state ``retired``, ``revoked_at`` still set) and activated its successor beside the
fresh replacement; stray active intermediates piled up and, once expired, made ``/readyz`` 503
on every replica for good."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
import sqlalchemy as sa

import ca.emergency
import ca.rotation
from ca.clock import FixedClock
from ca.config import Context
from ca.emergency import IntermediateJustRevoked, IntermediateRevoked, revoke_intermediate
from ca.errors import Conflict
from ca.readiness import check_issuing_cas
from ca.revocation import RevocationReason
from ca.rotation import RotationInProgress, Transition, rotate
from ca.serial import Serial
from ca.store.models import CaRow
from tests.ca.racekit import first_held
from tests.ca.test_crl import crl_of, listed
from tests.rotation.rotkit import BOTH_DATABASES, activate_moment, ca_rows, events, only

COMPROMISE = RevocationReason.KEY_COMPROMISE


def _key_file(ctx: Context, row: CaRow) -> Path:
    return ctx.settings.data_dir / "keys" / f"{row.key_ref}.pem"


def _prepared_successor(ctx: Context, clock: FixedClock) -> tuple[CaRow, CaRow]:
    """The active intermediate and the successor the scheduled rotation prepared for it, at
    the moment that successor is due to be activated."""
    old = only(ctx, "intermediate", "active")
    clock.current = activate_moment(old) - dt.timedelta(seconds=20)
    assert [t.event for t in rotate(ctx)] == ["prepared"]
    successor = only(ctx, "intermediate", "prepared")
    clock.current = activate_moment(old)
    return old, successor


def _revoke(ctx: Context) -> IntermediateRevoked:
    return revoke_intermediate(ctx, actor="test", reason=COMPROMISE)


def _row(ctx: Context, serial: str) -> CaRow:
    (row,) = [r for r in ca_rows(ctx) if r.serial == serial]
    return row


def _assert_revoked(ctx: Context, serial: str) -> None:
    row = _row(ctx, serial)
    assert (row.state, row.revocation_reason) == ("revoked", COMPROMISE.value), row
    assert row.revoked_at is not None
    assert Serial.parse(serial).value in listed(crl_of(ctx, "root"))


def _assert_one_fresh_issuer(ctx: Context, result: IntermediateRevoked) -> None:
    (active,) = ca_rows(ctx, state="active")
    assert active.serial == result.new_serial.hex
    check_issuing_cas(ctx)  # /readyz's question


@BOTH_DATABASES
def test_an_activation_that_holds_the_lock_first_cannot_undo_the_revocation_after_it(
    drill_ctx: Context, clock: FixedClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The activation read the state and is inside its transaction; the revocation waits for
    it, then revokes the CA the operator saw active (retired by now) and the successor the
    activation made active: both were keyed before the emergency."""
    old, successor = _prepared_successor(drill_ctx, clock)

    activation, revocation = first_held(
        monkeypatch,
        ca.rotation,
        "load_ca_key",
        lambda: rotate(drill_ctx),
        lambda: _revoke(drill_ctx),
    )

    assert isinstance(activation, list), activation
    assert sorted(t.event for t in activation if isinstance(t, Transition)) == [
        "activated",
        "retired",
    ]
    assert isinstance(revocation, IntermediateRevoked), revocation
    assert revocation.revoked_serial.hex == old.serial
    assert revocation.also_revoked == (Serial.parse(successor.serial),)
    _assert_revoked(drill_ctx, old.serial)
    _assert_revoked(drill_ctx, successor.serial)
    _assert_one_fresh_issuer(drill_ctx, revocation)
    # the next rotation prepares a fresh successor; nothing revoked comes back
    assert [t.event for t in rotate(drill_ctx, force=True)] == ["prepared"]
    assert [t.event for t in rotate(drill_ctx, force=True)] == ["retired", "activated"]
    _assert_revoked(drill_ctx, old.serial)
    _assert_revoked(drill_ctx, successor.serial)
    assert len(ca_rows(drill_ctx, state="active")) == 1


@BOTH_DATABASES
def test_an_activation_during_a_revocation_waits_or_is_told_to_try_again(
    drill_ctx: Context, clock: FixedClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe's race: the revocation is inside its transaction when a forced rotation asks
    to activate the prepared successor. That rotation finds the lock held (PostgreSQL: 409 at
    once) or waits for it (SQLite) and then finds the successor revoked: it never retires the
    revoked CA or activates a second intermediate."""
    old, successor = _prepared_successor(drill_ctx, clock)

    revocation, activation = first_held(
        monkeypatch,
        ca.emergency,
        "sign_new_ca",
        lambda: _revoke(drill_ctx),
        lambda: rotate(drill_ctx, force=True),
    )

    assert isinstance(revocation, IntermediateRevoked), revocation
    assert revocation.revoked_serial.hex == old.serial
    assert revocation.also_revoked == (Serial.parse(successor.serial),)
    if isinstance(activation, RotationInProgress):
        assert drill_ctx.engine.dialect.name == "postgresql"
    else:  # it waited, and then prepared the next successor, a fresh one
        assert isinstance(activation, list), activation
        assert [t.event for t in activation if isinstance(t, Transition)] == ["prepared"]
    _assert_revoked(drill_ctx, old.serial)
    _assert_revoked(drill_ctx, successor.serial)
    _assert_one_fresh_issuer(drill_ctx, revocation)
    old_events = [e for ca_id, e in events(drill_ctx) if ca_id == old.id]
    assert old_events == ["created", "revoked"]


@BOTH_DATABASES
def test_a_second_revocation_that_waited_is_a_conflict_naming_the_replacement(
    drill_ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the second request answered 503 "no active intermediate to revoke" (CLI:
    exit 7, "run trellis init"). An operator retrying that would revoke the fresh replacement:
    it is a conflict (409, exit 6) that names the replacement, and nothing changes."""
    old = only(drill_ctx, "intermediate", "active")
    keys = sorted((drill_ctx.settings.data_dir / "keys").iterdir())

    first, second = first_held(
        monkeypatch,
        ca.emergency,
        "sign_new_ca",
        lambda: _revoke(drill_ctx),
        lambda: _revoke(drill_ctx),
    )

    assert isinstance(first, IntermediateRevoked), first
    assert first.revoked_serial.hex == old.serial
    assert isinstance(second, IntermediateJustRevoked), second
    assert isinstance(second, Conflict)
    assert (
        f"the intermediate {old.serial} of authority 'mesh' was just revoked by another "
        f"request; the replacement is {first.new_serial.hex}"
    ) in str(second)
    assert sorted(r.state for r in ca_rows(drill_ctx)) == ["active", "revoked"]
    _assert_revoked(drill_ctx, old.serial)
    _assert_one_fresh_issuer(drill_ctx, first)
    assert len(list((drill_ctx.settings.data_dir / "keys").iterdir())) == len(keys) + 1


@BOTH_DATABASES
def test_a_successor_prepared_before_the_emergency_is_revoked_and_its_key_destroyed(
    drill_ctx: Context, clock: FixedClock
) -> None:
    """docs/revocation.md promises a freshly keyed intermediate: the successor the scheduler
    prepared from the same key store is suspect too. It used to survive the revocation and be
    activated at its time."""
    old, successor = _prepared_successor(drill_ctx, clock)
    assert _key_file(drill_ctx, successor).exists()

    result = _revoke(drill_ctx)

    assert result.also_revoked == (Serial.parse(successor.serial),)
    _assert_revoked(drill_ctx, old.serial)
    _assert_revoked(drill_ctx, successor.serial)
    assert not _key_file(drill_ctx, successor).exists()
    assert ca_rows(drill_ctx, state="prepared") == []
    _assert_one_fresh_issuer(drill_ctx, result)
    with drill_ctx.engine.connect() as connection:
        audit = connection.execute(
            sa.text("SELECT detail FROM audit_log WHERE event = 'ca.revoked' AND subject = :s"),
            {"s": f"mesh/intermediate/{successor.serial}"},
        ).all()
    (detail,) = [json.loads(row[0]) for row in audit]
    assert detail["emergency"] is True and detail["reason"] == COMPROMISE.value
    assert "prepared, never active; its key is destroyed" in detail["why"]
    # its activation time comes: the fresh intermediate stays; the next successor is new
    assert rotate(drill_ctx) == []
    prepared = rotate(drill_ctx, force=True)
    assert [t.event for t in prepared] == ["prepared"]
    assert prepared[0].serial not in (old.serial, successor.serial)
    _assert_revoked(drill_ctx, successor.serial)
