"""An authority's name goes with its purpose: ``mesh`` is the SPIFFE mesh's, ``gateway`` the API
gateway's, and no init takes an authority of another purpose for its own, completes it or
replaces it. On SQLite and PostgreSQL: what is refused must leave every row as it was."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlmodel import SQLModel

from ca import gateway
from ca.authority import (
    GATEWAY,
    MESH,
    AuthorityExists,
    AuthorityParams,
    OtherPurpose,
    active_issuer,
    init_authority,
    load_authority,
    trust_domain_as_is,
)
from ca.config import Context
from ca.errors import Conflict, InvalidInput
from ca.identity import TrustDomain
from ca.openvpn import InitParams, init_openvpn
from tests.gateway.conftest import ACME
from tests.gateway.gwkit import partner_csr

TD = TrustDomain.parse("example.org")


def snapshot(ctx: Context) -> tuple[dict[str, list[str]], dict[str, bytes]]:
    """Every row of every table, and every file under the data dir (keys, sealed secrets)."""
    with ctx.engine.connect() as connection:
        rows = {
            table.name: sorted(repr(tuple(row)) for row in connection.execute(sa.select(table)))
            for table in SQLModel.metadata.sorted_tables
        }
    data_dir = ctx.settings.data_dir
    files = (
        {str(p.relative_to(data_dir)): p.read_bytes() for p in data_dir.rglob("*") if p.is_file()}
        if data_dir.exists()
        else {}
    )
    return rows, files


def made_by_an_older_trellis(ctx: Context, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """``trellis openvpn init --name NAME`` as Trellis ran it before the names were reserved."""
    with monkeypatch.context() as patched:
        patched.setattr("ca.authority._RESERVED", {})
        init_openvpn(ctx, InitParams(name=name))
    assert load_authority(ctx, name).purpose == "openvpn"


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("name", [MESH, GATEWAY])
def test_openvpn_may_not_take_the_mesh_or_gateway_name(
    bare_ctx: Context, name: str, force: bool
) -> None:
    before = snapshot(bare_ctx)
    with pytest.raises(InvalidInput, match=f"name {name!r} is reserved"):
        init_openvpn(bare_ctx, InitParams(name=name, force=force))
    with pytest.raises(InvalidInput, match=f"name {name!r} is reserved"):
        init_authority(bare_ctx, AuthorityParams(None, name=name, purpose="openvpn", force=force))
    assert snapshot(bare_ctx) == before


def test_the_reserved_names_are_each_one_purpose(bare_ctx: Context) -> None:
    before = snapshot(bare_ctx)
    with pytest.raises(InvalidInput, match="reserved for the API gateway"):
        init_authority(bare_ctx, AuthorityParams(TD, name=GATEWAY))
    with pytest.raises(InvalidInput, match="reserved for the SPIFFE mesh"):
        init_authority(bare_ctx, AuthorityParams(None, name=MESH, purpose="gateway"))
    assert snapshot(bare_ctx) == before


def test_the_mesh_inits_after_an_openvpn_mesh_was_refused(bare_ctx: Context) -> None:
    """Issue 2: the refused VPN left nothing that 'trellis init' trips over."""
    with pytest.raises(InvalidInput):
        init_openvpn(bare_ctx, InitParams(name=MESH))
    assert trust_domain_as_is(bare_ctx.settings.effective_database_url) is None
    assert init_authority(bare_ctx, AuthorityParams(TD)).trust_domain == TD
    assert trust_domain_as_is(bare_ctx.settings.effective_database_url) == TD


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_mesh_init_refuses_an_older_openvpn_mesh(
    bare_ctx: Context, monkeypatch: pytest.MonkeyPatch, force: bool
) -> None:
    made_by_an_older_trellis(bare_ctx, monkeypatch, MESH)
    before = snapshot(bare_ctx)
    with pytest.raises(OtherPurpose, match="'mesh' has purpose openvpn, not spiffe") as refused:
        init_authority(bare_ctx, AuthorityParams(TD, force=force))
    # Not "exists": trellis init --exists-ok would have taken that for its own CA
    assert not isinstance(refused.value, AuthorityExists)
    with pytest.raises(OtherPurpose):  # what --exists-ok reads before it migrates
        trust_domain_as_is(bare_ctx.settings.effective_database_url)
    assert snapshot(bare_ctx) == before


def test_gateway_init_refuses_an_older_openvpn_gateway(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 1: it took the VPN's CA for its own half-made init and 'completed' it."""
    made_by_an_older_trellis(ctx, monkeypatch, GATEWAY)
    before = snapshot(ctx)
    with pytest.raises(OtherPurpose, match="'gateway' has purpose openvpn, not gateway"):
        gateway.init_gateway(ctx, gateway.GatewayParams())
    assert snapshot(ctx) == before


def test_a_gateway_made_of_a_vpn_ca_issues_nothing(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database where an older 'trellis gateway init' completed over the VPN's CA: neither
    partner certificates nor truststores come from that CA any more."""
    made_by_an_older_trellis(ctx, monkeypatch, GATEWAY)
    with monkeypatch.context() as patched:
        patched.setattr("ca.gateway.check_purpose", lambda row, purpose: None)
        gateway.init_gateway(ctx, gateway.GatewayParams())
        gateway.add_consumer(ctx, ACME)
    before = snapshot(ctx)
    with pytest.raises(OtherPurpose):
        gateway.issue_certificate(ctx, gateway.CertRequest(ACME, "tests", csr_pem=partner_csr()[1]))
    for kind in gateway.TruststoreFormat:
        with pytest.raises(OtherPurpose):
            gateway.build_truststore(ctx, kind)
    with pytest.raises(OtherPurpose):
        gateway.add_consumer(ctx, gateway.ConsumerName("other"))
    assert snapshot(ctx) == before


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_no_init_replaces_an_authority_of_another_purpose(ctx: Context, force: bool) -> None:
    init_openvpn(ctx, InitParams(name="vpn2"))
    init_authority(ctx, AuthorityParams(TrustDomain.parse("other.example"), name="other"))
    before = snapshot(ctx)
    with pytest.raises(OtherPurpose, match="'vpn2' has purpose openvpn, not spiffe"):
        init_authority(ctx, AuthorityParams(TD, name="vpn2", force=force))
    with pytest.raises(OtherPurpose, match="'other' has purpose spiffe, not openvpn"):
        init_openvpn(ctx, InitParams(name="other", force=force))
    with pytest.raises(OtherPurpose, match="'other' has purpose spiffe, not openvpn"):
        init_authority(ctx, AuthorityParams(None, name="other", purpose="openvpn", force=force))
    assert snapshot(ctx) == before


def test_every_init_of_its_own_purpose_still_works(ctx: Context) -> None:
    """The mesh, an OpenVPN authority of another name and the gateway, each plain, again, and
    forced where it can be."""
    mesh_root = active_issuer(ctx).roots[0]
    with pytest.raises(AuthorityExists):
        init_authority(ctx, AuthorityParams(TD))
    assert active_issuer(ctx, MESH).roots[0] == mesh_root
    assert init_authority(ctx, AuthorityParams(TD, force=True)).roots[0] != mesh_root

    first = init_openvpn(ctx, InitParams(name="vpn2"))
    vpn_root = active_issuer(ctx, "vpn2").roots[0]
    with pytest.raises(Conflict, match="only a forced init replaces it"):
        init_openvpn(ctx, InitParams(name="vpn2"))
    again = init_openvpn(ctx, InitParams(name="vpn2", force=True))
    assert again.authority == first.authority == "vpn2"
    assert active_issuer(ctx, "vpn2").roots[0] != vpn_root

    status = gateway.init_gateway(ctx, gateway.GatewayParams())
    assert load_authority(ctx, GATEWAY).purpose == "gateway"
    with pytest.raises(Conflict, match="exists already"):
        gateway.init_gateway(ctx, gateway.GatewayParams())
    assert gateway.gateway_status(ctx).root == status.root
    assert len({active_issuer(ctx, name).roots[0] for name in (MESH, "vpn2", GATEWAY)}) == 3


def test_gateway_init_still_completes_its_own_half_made_init(bare_ctx: Context) -> None:
    """A crash between the gateway's CAs and its policy: running it again records the policy."""
    made = init_authority(bare_ctx, AuthorityParams(None, name=GATEWAY, purpose="gateway"))
    status = gateway.init_gateway(bare_ctx, gateway.GatewayParams())
    assert status.root == made.roots[0]
