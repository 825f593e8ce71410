"""The OpenVPN server certificate is renewed by schedule into its server-config directory."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlmodel import Session, select

from ca.authority import active_issuer
from ca.clock import FixedClock
from ca.config import Context
from ca.durations import Ttl
from ca.errors import Conflict, Unavailable
from ca.jobs import job_named
from ca.openvpn import (
    OPENVPN,
    REPLACED_BY,
    SERVER_PROFILE,
    WITHDRAWN_BY,
    ClientRequest,
    ServerRequest,
    VpnName,
    add_client,
    get_config,
    issue_server_cert,
    renew_server_certificates,
    server_config,
    write_files,
)
from ca.root_rotation import rotate_root
from ca.store.models import CertificateRow
from cli.launch import Interrupted
from tests.conftest import interrupt_a_rename
from tests.openvpn.conftest import REMOTE
from tests.openvpn.vpnkit import crls_in, parse_profile
from tests.rotation.rotkit import needs_openssl, openssl_verify
from tests.selfsigned import self_signed


def _serial(directory: Path) -> int:
    return x509.load_pem_x509_certificates((directory / "server.crt").read_bytes())[0].serial_number


def test_server_certificate_is_renewed_in_place_after_two_thirds(
    vpn: Context, clock: FixedClock, tmp_path: Path
) -> None:
    out = tmp_path / "server"
    write_files(server_config(vpn, ServerRequest(ttl=Ttl.parse("30d")), out_dir=out), out)
    first = _serial(out)
    assert renew_server_certificates(vpn) == []  # fresh: nothing due
    clock.advance(dt.timedelta(days=19))
    assert job_named("openvpn-server-certificate").run(vpn) == "nothing due"
    clock.advance(dt.timedelta(days=1, hours=1))  # past 20 of 30 days
    renewed = renew_server_certificates(vpn)
    assert len(renewed) == 1 and renewed[0].startswith("vpn: ")
    second = _serial(out)
    assert second != first
    cert = x509.load_pem_x509_certificates((out / "server.crt").read_bytes())[0]
    key = serialization.load_pem_private_key((out / "server.key").read_bytes(), None)
    assert cert.public_key() == key.public_key()  # the pair on disk matches
    assert (out / "server.key").stat().st_mode & 0o777 == 0o600
    assert cert.not_valid_after_utc - clock.now() > dt.timedelta(days=29)  # same 30-day lifetime
    assert renew_server_certificates(vpn) == []  # and not again


def _cn(directory: Path) -> str:
    leaf = x509.load_pem_x509_certificates((directory / "server.crt").read_bytes())[0]
    return str(leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


def test_the_recorded_directory_is_judged_by_its_own_certificate(
    vpn: Context, clock: FixedClock, tmp_path: Path
) -> None:
    """A second server's certificate (``server-cert --cn --out B``, a year) says nothing about
    the one in the recorded directory A (3 minutes): A's is renewed, with A's own CN."""
    a, b = tmp_path / "a", tmp_path / "b"
    request = ServerRequest(common_name=VpnName("vpn-a.example"), ttl=Ttl.parse("3m"))
    write_files(server_config(vpn, request, out_dir=a), a)
    second = issue_server_cert(vpn, ServerRequest(common_name=VpnName("vpn-b.example")))
    write_files({"server.crt": second.certificate_pem, "server.key": second.key_pem}, b)
    first = _serial(a)
    clock.advance(dt.timedelta(minutes=2, seconds=30))
    assert len(renew_server_certificates(vpn)) == 1
    assert _serial(a) != first and _cn(a) == "vpn-a.example"
    assert _serial(b) == second.serial.value  # not touched


def test_a_second_server_with_a_shorter_life_does_not_rename_the_first(
    vpn: Context, clock: FixedClock, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    three = Ttl.parse("3m")
    request = ServerRequest(common_name=VpnName("vpn-a.example"), ttl=three)
    write_files(server_config(vpn, request, out_dir=a), a)
    second = issue_server_cert(vpn, ServerRequest(common_name=VpnName("vpn-b.example"), ttl=three))
    write_files({"server.crt": second.certificate_pem, "server.key": second.key_pem}, b)
    assert get_config(vpn).server_cn == "vpn-a.example"  # what profiles pin
    clock.advance(dt.timedelta(minutes=2, seconds=30))
    renew_server_certificates(vpn)
    assert _cn(a) == "vpn-a.example"
    assert get_config(vpn).server_cn == "vpn-a.example"


def test_a_foreign_certificate_in_the_directory_is_left_alone(
    vpn: Context, clock: FixedClock, tmp_path: Path
) -> None:
    a = tmp_path / "a"
    write_files(server_config(vpn, ServerRequest(ttl=Ttl.parse("3m")), out_dir=a), a)
    cert = self_signed("elsewhere")[0].public_bytes(serialization.Encoding.PEM)
    (a / "server.crt").write_bytes(cert)
    clock.advance(dt.timedelta(minutes=5))
    assert renew_server_certificates(vpn) == []
    assert (a / "server.crt").read_bytes() == cert


def _server_certificates(ctx: Context) -> list[CertificateRow]:
    with Session(ctx.engine) as session:
        rows = session.exec(select(CertificateRow).where(CertificateRow.profile == SERVER_PROFILE))
        return sorted(rows.all(), key=lambda row: row.not_before)


def test_a_directory_that_cannot_take_the_files_gets_no_certificate(
    vpn: Context, clock: FixedClock, tmp_path: Path
) -> None:
    """The recorded directory replaced by a regular file: each run of the job issued a
    certificate, failed to write its key, and left it live, one more every 5 minutes. Now the
    job fails (``/readyz``) before issuing anything, naming the directory."""
    out = tmp_path / "server"
    write_files(server_config(vpn, ServerRequest(), out_dir=out), out)
    for name in list(out.iterdir()):
        name.unlink()
    out.rmdir()
    out.write_text("not a directory\n")
    for _ in range(2):
        with pytest.raises(Unavailable, match="server directory"):
            job_named("openvpn-server-certificate").run(vpn)
        clock.advance(dt.timedelta(minutes=5))
    assert len(_server_certificates(vpn)) == 1  # the first, from server-config


def test_a_renewal_stopped_between_its_files_withdraws_the_certificate(
    vpn: Context, clock: FixedClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C after one of server.crt and server.key was replaced: the new key stood beside
    the old certificate (openvpn no longer starts), and the new certificate stayed live with
    its key lost. Now both files are as they were and the certificate is revoked."""
    out = tmp_path / "server"
    write_files(server_config(vpn, ServerRequest(ttl=Ttl.parse("3m")), out_dir=out), out)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    clock.advance(dt.timedelta(minutes=2, seconds=30))
    interrupt_a_rename(monkeypatch, out, after=1)
    with pytest.raises(Interrupted):
        renew_server_certificates(vpn)
    monkeypatch.undo()
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # nothing staged
    first, withdrawn = _server_certificates(vpn)
    assert first.status == "active"
    assert (withdrawn.status, withdrawn.revoked_by) == ("revoked", WITHDRAWN_BY)
    assert len(renew_server_certificates(vpn)) == 1  # the next run renews it


def _chain(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


@needs_openssl
def test_the_server_directory_follows_a_root_rotation_to_its_retirement(
    vpn: Context, clock: FixedClock, tmp_path: Path
) -> None:
    """``ca.pem`` and the chain in ``server.crt`` were written once, by ``server-config``:
    after the retire the server trusted only the retired root, so it refused every client
    issued since, and sent the "B signed by A" the retire had revoked. Now the job re-issues
    the certificate at the switch and writes the current chains after each step."""
    out = tmp_path / "server"
    write_files(server_config(vpn, ServerRequest(ttl=Ttl.parse("30d")), out_dir=out), out)
    rotate_root(vpn, OPENVPN, overlap=Ttl.parse("1h"))  # publish: B and "A signed by B"
    key = (out / "server.key").read_bytes()
    assert renew_server_certificates(vpn) == ["vpn: ca.pem chain and server.crt chain"]
    issuer = active_issuer(vpn, OPENVPN)
    assert _chain(out / "ca.pem") == [*issuer.chain, *issuer.roots]
    assert _chain(out / "server.crt")[1:] == list(issuer.chain)
    assert (out / "server.key").read_bytes() == key

    rotate_root(vpn, OPENVPN, step=True, force=True)  # switch: issuing under B
    before = _serial(out)
    renewed = renew_server_certificates(vpn)
    assert _serial(out) != before and renewed[0] == f"vpn: {format(_serial(out), 'x')[:12]}"
    b_signed_by_a = active_issuer(vpn, OPENVPN).chain[1]

    rotate_root(vpn, OPENVPN, step=True, force=True)  # retire: "B signed by A" is revoked
    leaf, key = _chain(out / "server.crt")[0], (out / "server.key").read_bytes()
    renew_server_certificates(vpn)
    issuer = active_issuer(vpn, OPENVPN)
    profile = parse_profile(add_client(vpn, ClientRequest(VpnName("alice"))).ovpn)
    client, *client_chain = profile.certificates("cert")
    accepted = openssl_verify((out / "ca.pem").read_bytes(), client, client_chain, clock.now())
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr  # the server takes alice
    assert _chain(out / "server.crt") == [leaf, issuer.certificate]
    assert b_signed_by_a not in _chain(out / "server.crt") + _chain(out / "ca.pem")
    trusted = profile.blocks["ca"].encode()  # and alice takes the server
    accepted = openssl_verify(trusted, leaf, [issuer.certificate], clock.now(), "sslserver")
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert (out / "server.key").read_bytes() == key
    assert renew_server_certificates(vpn) == []


def test_the_certificate_replaced_at_a_switch_is_revoked_and_the_retirement_goes_ahead(
    vpn: Context, clock: FixedClock, tmp_path: Path, crl_file: Path
) -> None:
    """The job re-issues the server certificate at a root rotation's switch, and the one it
    replaced stayed valid for its 30 days (a year, given ``--ttl 1y``): the retirement was
    refused that long, naming no certificate. Now it is revoked (superseded) and listed on
    the CRL file. The openvpn still running with it is not refused by the clients: their
    profiles check the server's certificate against ``<ca>`` and its name, never a CRL."""
    out = tmp_path / "server"
    write_files(server_config(vpn, ServerRequest(ttl=Ttl.parse("30d")), out_dir=out), out)
    first = _serial(out)
    rotate_root(vpn, OPENVPN, overlap=Ttl.parse("1h"))
    clock.advance(dt.timedelta(hours=1))
    rotate_root(vpn, OPENVPN, step=True)  # switch
    with pytest.raises(Conflict, match=f"1 certificate.*{format(first, 'x')} CN={REMOTE}"):
        rotate_root(vpn, OPENVPN, step=True)

    renewed = renew_server_certificates(vpn)
    assert renewed[0] == f"vpn: {format(_serial(out), 'x')[:12]}" and _serial(out) != first
    replaced = next(r for r in _server_certificates(vpn) if r.serial == format(first, "x"))
    assert (replaced.status, replaced.revocation_reason, replaced.revoked_by) == (
        "revoked",
        "superseded",
        REPLACED_BY,
    )
    listed = {entry.serial_number for crl in crls_in(crl_file.read_bytes()) for entry in crl}
    assert first in listed
    ovpn = add_client(vpn, ClientRequest(VpnName("alice"))).ovpn
    assert b"crl-verify" not in ovpn and b"remote-cert-tls server" in ovpn

    assert rotate_root(vpn, OPENVPN, step=True).step == "retired"  # not forced
