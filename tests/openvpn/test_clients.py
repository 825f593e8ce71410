"""Client profiles on the ``ca`` level: what the .ovpn holds, one live certificate per name,
renewal, offboarding and the CRL file, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest
from cryptography import x509
from sqlmodel import Session, select

from ca import certs
from ca.authority import active_issuer
from ca.clock import FixedClock
from ca.config import Context
from ca.errors import Conflict, InternalError, InvalidInput, NotFound
from ca.openvpn import (
    CLIENT_PROFILE,
    PENDING_TIMEOUT,
    WITHDRAWN_BY,
    ClientRequest,
    ServerRequest,
    TlsCrypt,
    VpnName,
    add_client,
    get_config,
    list_clients,
    renew_client,
    revoke_client,
)
from ca.pem import certs_pem
from ca.revocation import RevocationReason
from ca.serial import Serial
from ca.store.models import CertificateRow
from ca.store.models_openvpn import OpenVpnClientRow
from ca.tlscryptv2 import ClientKey, MetadataType, ServerKey, StaticKey, unwrap_client_key
from cli.launch import Interrupted
from tests.conftest import issued_total
from tests.openvpn.conftest import REMOTE
from tests.openvpn.vpnkit import DATA, assert_vpn_leaf, crls_in, normalise, parse_profile


def _add(ctx: Context, name: str, **kwargs: object) -> bytes:
    return add_client(ctx, ClientRequest(VpnName(name), **kwargs)).ovpn  # type: ignore[arg-type]


def _server_key(ctx: Context) -> ServerKey:
    from ca.openvpn import server_config

    files = server_config(ctx, ServerRequest())
    return ServerKey.from_pem(files["tls-crypt-v2.key"])


def test_profile_is_a_complete_inline_client_config(vpn: Context, clock: FixedClock) -> None:
    ovpn = _add(vpn, "alice")
    assert normalise(ovpn) == (DATA / "alice.ovpn.golden").read_text(encoding="utf-8")
    profile = parse_profile(ovpn)
    assert profile.directives[:11] == [
        "client",
        "dev tun",
        "proto udp",
        f"remote {REMOTE} 1194",
        "nobind",
        "persist-key",
        "persist-tun",
        "remote-cert-tls server",
        f"verify-x509-name {REMOTE} name",
        "tls-version-min 1.2",
        "verb 3",
    ]
    assert set(profile.blocks) == {"ca", "cert", "key", "tls-crypt-v2"}
    issuer = active_issuer(vpn, "vpn")
    # <ca>: the VPN chain, intermediate then root; nothing from the mesh
    assert profile.certificates("ca") == [issuer.certificate, *issuer.roots]
    assert not set(profile.certificates("ca")) & set(active_issuer(vpn).roots)
    leaf, *chain = profile.certificates("cert")
    assert chain == [issuer.certificate]
    assert_vpn_leaf(leaf, issuer.certificate, "alice", "client")
    assert leaf.not_valid_after_utc == clock.now() + dt.timedelta(days=30)
    assert profile.private_key().public_key() == leaf.public_key()  # type: ignore[attr-defined]
    # <tls-crypt-v2>: a key of this client's own, wrapped with the server's key, stamped now
    client_key = ClientKey.from_pem(profile.blocks["tls-crypt-v2"])
    unwrapped = unwrap_client_key(_server_key(vpn), client_key)
    assert unwrapped.metadata.type is MetadataType.TIMESTAMP
    assert unwrapped.metadata.created_at == clock.now()
    other = parse_profile(_add(vpn, "bob")).blocks["tls-crypt-v2"]
    assert ClientKey.from_pem(other).kc != client_key.kc


def test_shared_tls_crypt_profile(vpn: Context) -> None:
    from ca.openvpn import server_config

    profile = parse_profile(_add(vpn, "legacy", tls_crypt=TlsCrypt.SHARED))
    assert set(profile.blocks) == {"ca", "cert", "key", "tls-crypt"}
    shared = StaticKey.from_pem(server_config(vpn, ServerRequest())["tls-crypt.key"])
    assert StaticKey.from_pem(profile.blocks["tls-crypt"]) == shared


def test_a_name_has_one_live_certificate(vpn: Context, clock: FixedClock) -> None:
    _add(vpn, "alice")
    with pytest.raises(Conflict, match="already has a live certificate"):
        _add(vpn, "alice")
    _add(vpn, "Alice")  # OpenVPN compares common names case-sensitively
    revoke_client(vpn, VpnName("alice"))
    _add(vpn, "alice")  # offboarded names may come back
    clock.advance(dt.timedelta(days=31))  # ... and so may expired ones
    _add(vpn, "alice")
    statuses = [(c.name, c.status) for c in list_clients(vpn)]
    assert statuses == [("Alice", "expired"), ("alice", "active")]


def test_the_remote_host_is_never_a_client_name_while_it_is_the_default_server_cn(
    vpn_unconfigured: Context,
) -> None:
    """No server CN configured: profiles pin the remote host, and the server certificate will
    be issued for it, so a client may not take that name (it could pose as the server)."""
    from ca.openvpn import ConfigureParams, configure, issue_server_cert

    configure(vpn_unconfigured, ConfigureParams(remote=REMOTE))
    with pytest.raises(Conflict, match="server's CN"):
        _add(vpn_unconfigured, REMOTE)
    assert list_clients(vpn_unconfigured) == []
    issued = issue_server_cert(vpn_unconfigured, ServerRequest())  # the default CN is free
    assert issued.common_name == REMOTE


def test_the_server_cn_is_never_a_client_name(vpn: Context) -> None:
    with pytest.raises(Conflict, match="server's CN"):
        _add(vpn, REMOTE)
    _add(vpn, "carol")
    with pytest.raises(Conflict, match="client name"):
        from ca.openvpn import issue_server_cert

        issue_server_cert(vpn, ServerRequest(common_name=VpnName("carol")))


def test_concurrent_adds_of_one_name_one_wins(vpn: Context) -> None:
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def add() -> None:
        barrier.wait()
        try:
            _add(vpn, "zoe")
            outcomes.append("ok")
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=add) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(outcomes) == ["conflict"] * 5 + ["ok"]
    assert [c.status for c in list_clients(vpn)] == ["active"]


def test_a_failed_issuance_gives_the_name_back(
    vpn: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: object) -> object:
        raise InternalError("self-check failed")

    monkeypatch.setattr("ca.openvpn.issue_tls_leaf", broken)
    with pytest.raises(InternalError):
        _add(vpn, "dave")
    monkeypatch.undo()
    assert list_clients(vpn) == []
    _add(vpn, "dave")


@pytest.mark.parametrize(
    "failure", [RuntimeError("out of memory"), Interrupted()], ids=["error", "ctrl-c"]
)
def test_a_profile_that_fails_after_its_certificate_withdraws_it(
    vpn: Context, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    """The certificate was issued, its key (generated here, kept nowhere) never reached a
    profile: it stayed live, the name was given back, and a second live certificate could be
    issued under it."""

    def broken(*_args: object) -> bytes:
        raise failure

    monkeypatch.setattr("ca.openvpn.private_key_pem", broken)
    with pytest.raises(type(failure)):
        _add(vpn, "dave")
    monkeypatch.undo()
    with Session(vpn.engine) as session:
        (withdrawn,) = session.exec(
            select(CertificateRow).where(CertificateRow.profile == CLIENT_PROFILE)
        ).all()
    assert (withdrawn.status, withdrawn.revoked_by) == ("revoked", WITHDRAWN_BY)
    assert list_clients(vpn) == []
    _add(vpn, "dave")


def test_a_crashed_issuance_holds_the_name_only_for_a_while(
    vpn: Context, clock: FixedClock
) -> None:
    with Session(vpn.engine) as session:
        now = clock.now()
        row = OpenVpnClientRow(
            authority="vpn", name="erin", tls_crypt="v2", claimed_at=now, created_at=now
        )
        session.add(row)
        session.commit()
    assert [c.status for c in list_clients(vpn)] == ["pending"]
    with pytest.raises(Conflict, match="being issued"):
        _add(vpn, "erin")
    clock.advance(PENDING_TIMEOUT)
    _add(vpn, "erin")


def test_renewal_supersedes_the_previous_certificate(vpn: Context, crl_file: Path) -> None:
    first = parse_profile(_add(vpn, "frank", tls_crypt=TlsCrypt.SHARED))
    old_serial = Serial(first.certificates("cert")[0].serial_number)
    renewed = renew_client(vpn, ClientRequest(VpnName("frank")))
    assert renewed.tls_crypt is TlsCrypt.SHARED  # kept unless asked otherwise
    new = parse_profile(renewed.ovpn)
    assert new.blocks["key"] != first.blocks["key"]
    old = certs.get_certificate(vpn, old_serial)
    assert old.status is certs.CertStatus.REVOKED
    assert old.revocation_reason is RevocationReason.SUPERSEDED
    [client] = list_clients(vpn)
    assert (client.serial, client.status) == (renewed.serial.hex, "active")
    listed = [r.serial_number for crl in crls_in(crl_file.read_bytes()) for r in crl]
    assert listed == [old_serial.value]
    switched = renew_client(vpn, ClientRequest(VpnName("frank"), tls_crypt=TlsCrypt.V2))
    assert "tls-crypt-v2" in parse_profile(switched.ovpn).blocks


def test_renewal_refuses_unknown_and_revoked_names(vpn: Context) -> None:
    with pytest.raises(NotFound):
        renew_client(vpn, ClientRequest(VpnName("ghost")))
    _add(vpn, "grace")
    revoke_client(vpn, VpnName("grace"))
    with pytest.raises(Conflict, match="was revoked"):
        renew_client(vpn, ClientRequest(VpnName("grace")))


def test_revocation_rewrites_the_crl_file_at_once(vpn: Context, crl_file: Path) -> None:
    alice = parse_profile(_add(vpn, "alice")).certificates("cert")[0]
    _add(vpn, "bob")
    issuer = active_issuer(vpn, "vpn")
    before = crls_in(crl_file.read_bytes())
    assert [crl.issuer for crl in before] == [issuer.certificate.subject, issuer.roots[0].subject]
    assert all(len(crl) == 0 for crl in before)
    result = revoke_client(vpn, VpnName("alice"), reason=RevocationReason.KEY_COMPROMISE)
    assert result.crl_path == crl_file.resolve()
    assert [info.serial.value for info in result.revoked] == [alice.serial_number]
    intermediate_crl, root_crl = crls_in(crl_file.read_bytes())
    assert intermediate_crl.is_signature_valid(issuer.certificate.public_key())  # type: ignore[arg-type]
    assert root_crl.is_signature_valid(issuer.roots[0].public_key())  # type: ignore[arg-type]
    [entry] = list(intermediate_crl)
    assert entry.serial_number == alice.serial_number
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason is x509.ReasonFlags.key_compromise
    assert crl_file.stat().st_mode & 0o777 == 0o644
    with pytest.raises(Conflict, match="client alice is already revoked"):  # exit 6, 409
        revoke_client(vpn, VpnName("alice"))
    with pytest.raises(NotFound, match="no live certificate"):
        revoke_client(vpn, VpnName("nobody"))
    assert [(c.name, c.status) for c in list_clients(vpn)] == [
        ("alice", "revoked"),
        ("bob", "active"),
    ]


def test_without_a_crl_path_revocation_still_revokes(vpn_unconfigured: Context) -> None:
    from ca.openvpn import ConfigureParams, configure

    configure(vpn_unconfigured, ConfigureParams(remote=REMOTE))
    assert get_config(vpn_unconfigured).crl_path is None
    _add(vpn_unconfigured, "henry")
    result = revoke_client(vpn_unconfigured, VpnName("henry"))
    assert result.crl_path is None and len(result.revoked) == 1


def test_clients_need_a_remote_and_an_openvpn_authority(
    vpn_unconfigured: Context, ctx: Context
) -> None:
    with pytest.raises(Conflict, match="configure the remote first"):
        _add(vpn_unconfigured, "ivy")
    with pytest.raises(NotFound, match="openvpn init"):
        add_client(ctx, ClientRequest(VpnName("ivy"), authority="mesh"))


def test_key_types(vpn: Context) -> None:
    from ca.keys import KeyType

    for key_type in (KeyType.RSA_2048, KeyType.ED25519, KeyType.EC_P384):
        profile = parse_profile(_add(vpn, f"k-{key_type.value}", key_type=key_type))
        leaf = profile.certificates("cert")[0]
        assert KeyType.of(leaf.public_key()) is key_type  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        VpnName("bad name")


def test_certificates_are_recorded_with_cn_identity(vpn: Context) -> None:
    _add(vpn, "judy")
    [info] = certs.list_certificates(vpn, status=certs.CertStatus.ACTIVE)
    assert (info.identity, info.profile) == ("CN=judy", "openvpn-client")
    pem = certs_pem([parse_profile(_add(vpn, "kim")).certificates("cert")[0]]).decode()
    assert any(i.certificate_pem == pem for i in certs.list_certificates(vpn))


def test_the_vpn_intermediate_rotates(vpn: Context) -> None:
    """The VPN authority rotates like every authority (the ca-rotation job); clients of the
    retired intermediate stay valid, new ones come from the new intermediate."""
    from ca.rotation import rotate

    old = parse_profile(_add(vpn, "lena")).certificates("cert")[1]
    assert [t.event for t in rotate(vpn, "vpn", force=True)] == ["prepared"]
    assert "activated" in {t.event for t in rotate(vpn, "vpn", force=True)}
    new = parse_profile(_add(vpn, "mike")).certificates("cert")[1]
    assert new != old
    assert [c.status for c in list_clients(vpn)] == ["active", "active"]


def test_each_outcome_is_counted_once(vpn: Context) -> None:
    """``trellis_certificates_issued_total`` as for SVIDs (``ca.issue.counted``): a name held
    by a live certificate was refused without being counted."""
    results = ("issued", "conflict")
    before = {r: issued_total("vpn", "openvpn-client", r) for r in results}
    add_client(vpn, ClientRequest(VpnName("ida")))
    with pytest.raises(Conflict):
        add_client(vpn, ClientRequest(VpnName("ida")))
    after = {r: issued_total("vpn", "openvpn-client", r) for r in results}
    assert {r: after[r] - before[r] for r in results} == {"issued": 1, "conflict": 1}
