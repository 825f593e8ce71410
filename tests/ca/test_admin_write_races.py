"""The same admin write made twice at the same moment: the first is done, the second is told
so (docs/api.md: a second revocation is 409, a second deletion or removal 404), with one audit
record between them. The first is held inside its transaction while the second runs
(``tests.ca.racekit``). Both databases."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import Session

from ca import audit, certs, gateway
from ca.certs import revoke_certificate
from ca.config import Context
from ca.entries import delete_entry
from ca.errors import Conflict, NotFound, TrellisError
from ca.federation import Federation, FederationParams, Profile, add_federation, remove_federation
from ca.identity import TrustDomain
from ca.revocation import RevocationReason
from ca.store.models_gateway import GatewayTruststoreRow
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


def test_a_federation_removed_twice_at_once_is_removed_once(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second removal had found the row the first was deleting: both were answered 200
    and recorded, and its DELETE matched nothing (an SAWarning, an error under -W error)."""
    partner = TrustDomain("partner.example")
    add_federation(
        ctx, FederationParams(partner, "https://partner.example/bundle", Profile.HTTPS_WEB)
    )

    first, second = first_held(
        monkeypatch,
        audit,
        "record",
        lambda: remove_federation(ctx, partner),
        lambda: remove_federation(ctx, partner),
    )

    assert isinstance(first, Federation), first
    assert isinstance(second, NotFound), second
    assert records(ctx, "federation.removed") == 1


def test_a_truststore_forgotten_twice_at_once_is_forgotten_once(
    ctx: Context, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "truststore.pem"
    with Session(ctx.engine) as session:
        row = GatewayTruststoreRow(
            node=ctx.settings.node_name,
            path=str(path),
            format=gateway.TruststoreFormat.PEM.value,
            written_at=ctx.clock.now(),
        )
        session.add(row)
        session.commit()

    first, second = first_held(
        monkeypatch,
        audit,
        "record",
        lambda: gateway.remove_truststore(ctx, path),
        lambda: gateway.remove_truststore(ctx, path),
    )

    assert isinstance(first, gateway.RecordedTruststore), first
    assert isinstance(second, NotFound), second
    assert records(ctx, "gateway.truststore-removed") == 1
