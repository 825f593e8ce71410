"""The same admin write made twice at the same moment: the first is done, the second is told
so (docs/api.md: a second revocation is 409, a second deletion 404), with one audit record
between them. The first is held inside its transaction while the second runs
(``tests.ca.racekit``). Both databases."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from ca import audit, certs
from ca.certs import revoke_certificate
from ca.config import Context
from ca.entries import delete_entry
from ca.errors import Conflict, NotFound, TrellisError
from ca.revocation import RevocationReason
from ca.tokens import revoke_token
from tests.ca.racekit import first_held
from tests.ca.svidkit import enrol, join_secret

WEB = "spiffe://example.org/web"


def records(ctx: Context, event: str) -> int:
    with ctx.engine.connect() as connection:
        found = connection.execute(
            sa.text("SELECT count(*) FROM audit_log WHERE event = :event"), {"event": event}
        )
        return int(found.scalar_one())


def test_a_token_revoked_twice_at_once_is_revoked_once(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_id, _ = join_secret(ctx, enrol(ctx, WEB).entry)

    first, second = first_held(
        monkeypatch,
        audit,
        "record",
        lambda: revoke_token(ctx, token_id),
        lambda: revoke_token(ctx, token_id),
    )

    assert not isinstance(first, Exception), first
    assert isinstance(second, Conflict), second
    assert records(ctx, "token.revoked") == 1


def test_an_entry_deleted_twice_at_once_is_deleted_once(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry_id = enrol(ctx, WEB).entry.id

    first, second = first_held(
        monkeypatch,
        audit,
        "record",
        lambda: delete_entry(ctx, entry_id),
        lambda: delete_entry(ctx, entry_id),
    )

    assert not isinstance(first, Exception), first
    assert isinstance(second, NotFound), second
    assert records(ctx, "entry.deleted") == 1


def test_a_certificate_revoked_twice_at_once_keeps_the_first_reason_and_says_so(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second revocation, with another reason, is refused: it had been answered 200 with a
    reason that was never stored."""
    serial = enrol(ctx, WEB).svid.serial

    first, second = first_held(
        monkeypatch,
        certs,
        "refresh_crl_if_signable",
        lambda: revoke_certificate(ctx, serial, RevocationReason.KEY_COMPROMISE, "admin"),
        lambda: revoke_certificate(ctx, serial, RevocationReason.SUPERSEDED, "admin"),
    )

    assert not isinstance(first, TrellisError), first
    assert isinstance(second, Conflict), second
    stored = certs.get_certificate(ctx, serial).revocation_reason
    assert stored is RevocationReason.KEY_COMPROMISE
    assert records(ctx, "certificate.revoked") == 1
