"""Two inits of one authority at the same moment, as replicas starting together against one
database run them: one creates (or, with ``force``, replaces) the CA, the other is told it
exists (409, exit 6; ``init --exists-ok`` is content with that) and leaves no key behind. The
first is held inside its transaction while the second runs (``tests.ca.racekit``); the second
runs in a data dir of its own, as a replica does. Both databases."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import Session, select

from ca import authority, gateway, openvpn
from ca.authority import AuthorityParams, Issuer, init_authority
from ca.clock import FixedClock
from ca.config import Context, Settings, build_context
from ca.errors import Conflict
from ca.pem import fingerprint
from ca.store.models import CaRow
from ca.store.models_openvpn import OpenVpnRow
from ca.tlscryptv2 import SecretVault
from tests.ca.conftest import PASSPHRASE, TRUST_DOMAIN
from tests.ca.racekit import first_held


@pytest.fixture
def replica(bare_ctx: Context, tmp_path: Path, clock: FixedClock) -> Iterator[Context]:
    """Another Trellis on the same database, with a data dir of its own."""
    settings = Settings(
        data_dir=tmp_path / "replica",
        database_url=bare_ctx.settings.database_url,
        key_passphrase=PASSPHRASE,  # type: ignore[arg-type]
    )
    other = build_context(settings, clock=clock)
    yield other
    other.close()


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def roots(ctx: Context, name: str) -> set[str]:
    with Session(ctx.engine) as session:
        found = session.exec(
            select(CaRow.serial).where(CaRow.authority == name, CaRow.role == "root")
        )
        return set(found.all())


def serial_of(issuer: Issuer) -> str:
    return format(issuer.roots[0].serial_number, "x")


def test_two_inits_at_once_make_one_ca_and_the_second_is_told_it_exists(
    bare_ctx: Context, replica: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second had made its keys and failed on the authority's primary key (exit 8 "the
    database cannot be used", 500 over REST), or won and left the first to fail so."""
    first, second = first_held(
        monkeypatch,
        authority,
        "sign_new_ca",
        lambda: init_authority(bare_ctx, AuthorityParams(TRUST_DOMAIN)),
        lambda: init_authority(replica, AuthorityParams(TRUST_DOMAIN)),
    )

    assert isinstance(first, Issuer), first
    assert isinstance(second, Conflict), second
    assert isinstance(second, authority.AuthorityExists)  # what 'init --exists-ok' accepts
    assert roots(bare_ctx, authority.MESH) == {serial_of(first)}
    assert files(replica.settings.data_dir / "keys") == []


def test_two_forced_inits_at_once_replace_the_ca_once(
    ctx: Context, replica: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both replaced it, each reporting a root of its own (or the second failed on a foreign
    key): one wins, the other replaced nothing and made no key."""
    old = roots(ctx, authority.MESH)
    force = AuthorityParams(TRUST_DOMAIN, force=True)

    first, second = first_held(
        monkeypatch,
        authority,
        "sign_new_ca",
        lambda: init_authority(ctx, force),
        lambda: init_authority(replica, force),
    )

    assert isinstance(first, Issuer), first
    assert isinstance(second, Conflict), second
    assert isinstance(second, authority.AuthorityExists)  # what 'init --exists-ok' accepts
    assert roots(ctx, authority.MESH) == {serial_of(first)} != old
    assert files(replica.settings.data_dir / "keys") == []


def test_a_forced_init_after_another_replaces_that_one(ctx: Context) -> None:
    """Taking turns is not refusing: a ``--force`` that starts after another ended replaces
    what that one made, as it always did."""
    force = AuthorityParams(TRUST_DOMAIN, force=True)
    first = init_authority(ctx, force)
    second = init_authority(ctx, force)

    assert fingerprint(first.roots[0]) != fingerprint(second.roots[0])
    assert roots(ctx, authority.MESH) == {serial_of(second)}


def test_a_forced_init_given_before_another_committed_is_refused(ctx: Context) -> None:
    """Three ``init --force`` given together: the first committed in the second the others
    were given, one of them read the roots only after that commit, and the whole-second
    ``created_at`` counted that CA as made before it was given: it replaced it too, and two
    reported success with different roots. One given after the commit still replaces it."""
    given = dt.datetime.now(dt.UTC)
    first = init_authority(ctx, AuthorityParams(TRUST_DOMAIN, force=True))

    with pytest.raises(authority.AuthorityExists, match="after this one was given"):
        init_authority(ctx, AuthorityParams(TRUST_DOMAIN, force=True, given_at=given))
    assert roots(ctx, authority.MESH) == {serial_of(first)}

    later = init_authority(
        ctx, AuthorityParams(TRUST_DOMAIN, force=True, given_at=dt.datetime.now(dt.UTC))
    )
    assert roots(ctx, authority.MESH) == {serial_of(later)} != {serial_of(first)}


def test_two_gateway_inits_at_once_create_it_once(
    bare_ctx: Context, replica: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three ``POST /v1/gateway/init`` on three replicas: one 201, the others 500 ``internal``
    (an IntegrityError); now 409, as a second init after the first is."""
    first, second = first_held(
        monkeypatch,
        authority,
        "sign_new_ca",
        lambda: gateway.init_gateway(bare_ctx, gateway.GatewayParams()),
        lambda: gateway.init_gateway(replica, gateway.GatewayParams()),
    )

    assert isinstance(first, gateway.GatewayStatus), first
    assert isinstance(second, Conflict), second
    assert "exists already" in str(second)
    assert files(replica.settings.data_dir / "keys") == []


def test_two_openvpn_inits_at_once_create_it_once(
    bare_ctx: Context, replica: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = first_held(
        monkeypatch,
        authority,
        "sign_new_ca",
        lambda: openvpn.init_openvpn(bare_ctx, openvpn.InitParams()),
        lambda: openvpn.init_openvpn(replica, openvpn.InitParams()),
    )

    assert isinstance(first, openvpn.OpenVpnConfig), first
    assert isinstance(second, Conflict), second
    assert "OpenVPN authority 'vpn' exists: only a forced init replaces it" in str(second)
    assert files(replica.settings.data_dir / "keys") == []
    assert files(replica.settings.data_dir / "secrets") == []


def test_a_forced_openvpn_init_that_lost_its_ca_records_no_keys(
    bare_ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first made its CA and was making its tls-crypt keys when a second ``--force``
    replaced that CA: both went on to record their keys and both reported success. The first
    is refused now, and its keys go again; the deployment left is the second's, whole."""
    openvpn.init_openvpn(bare_ctx, openvpn.InitParams())
    force = openvpn.InitParams(force=True)

    first, second = first_held(
        monkeypatch,
        SecretVault,
        "put",
        lambda: openvpn.init_openvpn(bare_ctx, force),
        lambda: openvpn.init_openvpn(bare_ctx, force),
    )

    assert isinstance(second, openvpn.OpenVpnConfig), second
    assert isinstance(first, Conflict), first
    with Session(bare_ctx.engine) as session:
        row = session.get(OpenVpnRow, openvpn.OPENVPN)
        assert row is not None
        recorded = [f"{ref}.sealed" for ref in sorted((row.tls_crypt_ref, row.tls_crypt_v2_ref))]
    assert files(bare_ctx.settings.data_dir / "secrets") == recorded  # and nothing else
