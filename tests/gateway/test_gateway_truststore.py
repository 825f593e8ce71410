"""Truststores for each gateway and the nginx server block: contents checked with cryptography
and with ``openssl verify`` (nginx's ssl_crl is OpenSSL's CRL_CHECK_ALL), recorded paths
rewritten on revocation and refresh, rotation and emergencies reflected."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ca import gateway
from ca.authority import active_issuer
from ca.clock import FixedClock
from ca.config import Context
from ca.emergency import revoke_intermediate
from ca.errors import InvalidInput, NotInitialised
from ca.keys import KeyType
from ca.revocation import RevocationReason
from ca.rotation import rotate
from ca.store.models import CaRow
from tests.gateway.conftest import ACME
from tests.gateway.gwkit import load_crls, openssl, partner_csr
from tests.selfsigned import self_signed

F = gateway.TruststoreFormat


def issue(ctx: Context) -> gateway.IssuedGatewayCertificate:
    return gateway.issue_certificate(
        ctx, gateway.CertRequest(ACME, "tests", csr_pem=partner_csr()[1])
    )


def pem_certs(data: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(data)


def test_pem_and_aws_hold_the_chain_up_to_the_root(gw_lite: Context) -> None:
    status = gateway.gateway_status(gw_lite)
    for format in (F.PEM, F.AWS):
        store = gateway.build_truststore(gw_lite, format)
        assert list(store.files) == ["truststore.pem"]
        assert pem_certs(store.files["truststore.pem"]) == [status.intermediate, status.root]


def test_aws_refuses_what_api_gateway_refuses(lite_ctx: Context) -> None:
    """An RSA-2048 hierarchy passes; an RSA-1024 CA (API Gateway wants >= 2048) does not."""
    gateway.init_gateway(
        lite_ctx, gateway.GatewayParams(key_type=KeyType.RSA_2048, root_key_type=KeyType.RSA_2048)
    )
    store = gateway.build_truststore(lite_ctx, F.AWS)
    assert len(pem_certs(store.files["truststore.pem"])) == 2
    with pytest.raises(InvalidInput, match="AWS truststore requirements"):
        gateway._check_aws([CaRow(serial="ab", cert_pem=_rsa1024_ca_pem())])  # type: ignore[call-arg]


def _rsa1024_ca_pem() -> str:
    cert, _ = self_signed("old CA", key=rsa.generate_private_key(65537, 1024), serial=1)
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_nginx_has_a_crl_for_every_ca_in_the_path(gw: Context, tmp_path: Path) -> None:
    """``openssl verify -crl_check_all`` is what nginx's ssl_crl does: with the intermediate's
    CRL only, every client fails ("unable to get certificate CRL")."""
    live, revoked = issue(gw), issue(gw)
    gateway.revoke_gateway_certificate(gw, revoked.serial, RevocationReason.KEY_COMPROMISE, "t")
    status = gateway.gateway_status(gw)
    written = gateway.write_truststore(gw, F.NGINX, tmp_path / "nginx")
    assert written == [tmp_path / "nginx" / "crl.pem", tmp_path / "nginx" / "client-ca.pem"]
    ca_file, crl_file = tmp_path / "nginx" / "client-ca.pem", tmp_path / "nginx" / "crl.pem"
    assert pem_certs(ca_file.read_bytes()) == [status.intermediate, status.root]
    crls = load_crls(crl_file.read_bytes())
    assert [crl.issuer for crl in crls] == [status.intermediate.subject, status.root.subject]
    for crl, signer in zip(crls, (status.intermediate, status.root), strict=True):
        assert crl.is_signature_valid(signer.public_key())  # type: ignore[arg-type]
    assert crls[0].get_revoked_certificate_by_serial_number(revoked.serial.value) is not None

    leaf, bad = tmp_path / "live.pem", tmp_path / "revoked.pem"
    leaf.write_bytes(live.certificate_pem)
    bad.write_bytes(revoked.certificate_pem)
    strict = ("verify", "-x509_strict", "-purpose", "sslclient", "-crl_check_all")
    ok = openssl(*strict, "-CAfile", str(ca_file), "-CRLfile", str(crl_file), str(leaf))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    refused = openssl(*strict, "-CAfile", str(ca_file), "-CRLfile", str(crl_file), str(bad))
    assert refused.returncode != 0 and "certificate revoked" in refused.stdout + refused.stderr
    only_intermediate = tmp_path / "one.pem"
    only_intermediate.write_bytes(crls[0].public_bytes(serialization.Encoding.PEM))
    partial = openssl(
        *strict, "-CAfile", str(ca_file), "-CRLfile", str(only_intermediate), str(leaf)
    )
    assert partial.returncode != 0
    assert "unable to get certificate CRL" in partial.stdout + partial.stderr
    # and the two hierarchies do not meet: a gateway leaf does not verify against the mesh bundle
    mesh_bundle = tmp_path / "mesh.pem"
    mesh_bundle.write_bytes(active_issuer(gw).bundle_pem)
    crossed = openssl("verify", "-CAfile", str(mesh_bundle), "-untrusted", str(ca_file), str(leaf))
    assert crossed.returncode != 0


def test_kong_gets_one_pem_per_ca_entity_and_a_readme(gw_lite: Context, tmp_path: Path) -> None:
    status = gateway.gateway_status(gw_lite)
    gateway.write_truststore(gw_lite, F.KONG, tmp_path / "kong")
    names = sorted(p.name for p in (tmp_path / "kong").iterdir())
    root = f"root-{format(status.root.serial_number, 'x')[:16]}.pem"
    intermediate = f"intermediate-{format(status.intermediate.serial_number, 'x')[:16]}.pem"
    assert names == sorted(["README.txt", root, intermediate])
    for name, cert in ((root, status.root), (intermediate, status.intermediate)):
        assert pem_certs((tmp_path / "kong" / name).read_bytes()) == [cert]
    readme = (tmp_path / "kong" / "README.txt").read_text()
    for text in ("mtls-auth", "config.ca_certificates", "username", root, intermediate):
        assert text in readme


def test_rotation_and_emergencies_reach_every_truststore(gw_lite: Context, tmp_path: Path) -> None:
    """A prepared intermediate is trusted before it issues; a revoked one is dropped (for AWS,
    which checks no CRL, that is the revocation); stale Kong files are removed."""
    for format, path in ((F.NGINX, tmp_path / "nginx"), (F.KONG, tmp_path / "kong"),
                         (F.AWS, tmp_path / "aws.pem")):  # fmt: skip
        gateway.write_truststore(gw_lite, format, path)
    before = gateway.gateway_status(gw_lite).intermediate
    rotate(gw_lite, "gateway", force=True)  # prepares the next intermediate
    written = gateway.refresh_truststores(gw_lite)
    assert tmp_path / "nginx" / "client-ca.pem" in written and tmp_path / "aws.pem" in written
    assert len(pem_certs((tmp_path / "nginx" / "client-ca.pem").read_bytes())) == 3
    assert len(load_crls((tmp_path / "nginx" / "crl.pem").read_bytes())) == 3
    assert len(list((tmp_path / "kong").glob("*.pem"))) == 3

    # the prepared one, keyed before the emergency, is revoked with it (docs/revocation.md)
    revoke_intermediate(gw_lite, actor="test", authority="gateway")
    gateway.refresh_truststores(gw_lite)
    trusted = pem_certs((tmp_path / "aws.pem").read_bytes())
    assert before not in trusted and len(trusted) == 2  # the new active one, the root
    assert before.serial_number not in {
        c.serial_number for c in pem_certs((tmp_path / "nginx" / "client-ca.pem").read_bytes())
    }
    assert len(list((tmp_path / "kong").glob("*.pem"))) == 2


def test_kong_removes_only_the_ca_files_trellis_wrote(gw_lite: Context, tmp_path: Path) -> None:
    """The directory is the operator's: a ``root-*.pem`` or ``intermediate-*.pem`` of their own
    stays, at every write and refresh; a CA file Trellis wrote and no longer writes (a revoked
    intermediate's) goes. Every ``*.pem`` of those prefixes was deleted."""
    kong = tmp_path / "kong"
    kong.mkdir()
    other_ca, _ = self_signed("partner CA", serial=7)
    theirs = {
        "root-partner.pem": other_ca.public_bytes(serialization.Encoding.PEM),
        "intermediate-backup.pem": b"an operator's notes\n",
    }
    before = gateway.gateway_status(gw_lite).intermediate
    retired = f"intermediate-{format(before.serial_number, 'x')[:16]}.pem"
    for name, data in theirs.items():
        (kong / name).write_bytes(data)
    gateway.write_truststore(gw_lite, F.KONG, kong)
    assert (kong / retired).exists()
    rotate(gw_lite, "gateway", force=True)
    revoke_intermediate(gw_lite, actor="test", authority="gateway")
    gateway.refresh_truststores(gw_lite)
    assert not (kong / retired).exists()  # Trellis's, the revoked intermediate's: gone
    assert gateway.refresh_job(gw_lite) == "nothing changed"
    for name, data in theirs.items():
        assert (kong / name).read_bytes() == data, name
    ours = {p.name for p in kong.glob("*.pem")} - set(theirs)
    assert len(ours) == 2  # the root and the new active one (the prepared one was revoked)

    # under a name Trellis gives, but not what Trellis wrote there: the operator's file
    edited = before.public_bytes(serialization.Encoding.PEM) + b"# kept for the audit\n"
    (kong / retired).write_bytes(edited)
    gateway.write_truststore(gw_lite, F.KONG, kong)
    assert (kong / retired).read_bytes() == edited


def test_an_emergency_revocation_rewrites_the_truststores_at_once(
    gw: Context, tmp_path: Path
) -> None:
    """Regression: revoke-intermediate left client-ca.pem and crl.pem as they were until the
    gateway-truststores job ran (up to an hour with cron): nginx let the revoked intermediate's
    clients in until then. Now it publishes like every other revocation."""
    store = tmp_path / "nginx"
    gateway.write_truststore(gw, F.NGINX, store)
    before = gateway.gateway_status(gw).intermediate
    result = revoke_intermediate(gw, actor="test", authority="gateway")
    trusted = pem_certs((store / "client-ca.pem").read_bytes())
    assert before not in trusted and gateway.gateway_status(gw).intermediate in trusted
    root_crl = load_crls((store / "crl.pem").read_bytes())[-1]
    assert root_crl.get_revoked_certificate_by_serial_number(before.serial_number) is not None
    assert result.publish_error is None


def test_revocation_and_refresh_rewrite_recorded_crls(
    gw: Context, clock: FixedClock, tmp_path: Path
) -> None:
    store = tmp_path / "nginx"
    gateway.write_truststore(gw, F.NGINX, store)
    gateway.write_truststore(gw, F.NGINX, store)  # recorded once
    gateway.write_truststore(gw, F.PEM, tmp_path / "ca.pem")
    assert gateway.refresh_truststores(gw) == []  # nothing changed
    assert gateway.refresh_job(gw) == "nothing changed"

    issued = issue(gw)
    _, written = gateway.revoke_gateway_certificate(
        gw, issued.serial, RevocationReason.KEY_COMPROMISE, "t"
    )
    assert written == [store / "crl.pem"]
    crls = load_crls((store / "crl.pem").read_bytes())
    assert crls[0].get_revoked_certificate_by_serial_number(issued.serial.value) is not None

    # CRLs live 24 h; past two thirds of that, a refresh re-signs and rewrites them
    clock.advance(dt.timedelta(hours=9))
    assert gateway.refresh_job(gw) == "rewrote 1 gateway truststore file(s)"  # the path: logged
    fresh = load_crls((store / "crl.pem").read_bytes())
    assert all(crl.next_update_utc == clock.now() + dt.timedelta(hours=24) for crl in fresh)

    # a truststore whose directory is gone is skipped, not re-created
    for child in store.iterdir():
        child.unlink()
    store.rmdir()
    clock.advance(dt.timedelta(hours=9))
    assert gateway.refresh_truststores(gw) == []
    assert not store.exists()


def test_truststore_paths_and_uninitialised(lite_ctx: Context, tmp_path: Path) -> None:
    with pytest.raises(NotInitialised):
        gateway.build_truststore(lite_ctx, F.PEM)
    gateway.init_gateway(lite_ctx, gateway.GatewayParams())
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidInput, match="not a directory"):
        gateway.write_truststore(lite_ctx, F.NGINX, tmp_path / "file")
    with pytest.raises(InvalidInput, match="is a directory"):
        gateway.write_truststore(lite_ctx, F.PEM, tmp_path)
    with pytest.raises(InvalidInput, match="pem, nginx, aws, kong"):
        F.parse("jks")


def test_nginx_snippet_renders_the_mtls_server_block() -> None:
    text = gateway.nginx_snippet(
        gateway.NginxSnippet(
            upstream="http://10.0.0.5:8080/api",
            truststore=Path("/etc/nginx/partners"),
            server_name="api.example.com",
            listen="8443",
        )
    )
    for line in (
        "listen 8443 ssl;",
        "server_name api.example.com;",
        "ssl_verify_client      on;",
        "ssl_client_certificate /etc/nginx/partners/client-ca.pem;",
        "ssl_crl                /etc/nginx/partners/crl.pem;",
        "ssl_verify_depth       2;",
        "proxy_pass http://10.0.0.5:8080/api;",
        "proxy_set_header X-SSL-Client-Cert   $ssl_client_escaped_cert;",
        "proxy_set_header X-SSL-Client-Verify $ssl_client_verify;",
    ):
        assert line in text
    assert text.count("{") == text.count("}") == 2


@pytest.mark.parametrize(
    "fields",
    [
        {"upstream": "http://x; return 200"},
        {"upstream": "ftp://x"},
        {"upstream": "http://x\n"},
        {"server_name": "a b"},
        {"server_name": "a;"},
        {"truststore": Path("/etc/ngi nx")},
        {"ssl_certificate": Path("/x/$host")},
        {"listen": "443 ssl; include /etc/passwd"},
        {"listen": "443\n"},
        {"listen": "99999"},
        {"listen": "0"},
        {"listen": "65536"},
        {"listen": "127.0.0.1:0"},
        {"listen": "300.1.1.1:443"},
        {"listen": "[127.0.0.1]:443"},
        {"truststore": Path("")},
        {"truststore": Path("partners")},
        {"ssl_certificate": Path("")},
        {"ssl_certificate_key": Path("tls/server.key")},
    ],
    ids=["fail/upstream-directive", "fail/upstream-scheme", "fail/upstream-newline",
         "fail/name-space", "fail/name-semicolon", "fail/path-space", "fail/path-variable",
         "fail/listen-directive", "fail/listen-newline", "fail/listen-port-too-big",
         "fail/listen-port-0", "fail/listen-port-65536", "fail/listen-address-port-0",
         "fail/listen-bad-ipv4", "fail/listen-ipv4-in-brackets", "fail/truststore-empty",
         "fail/truststore-relative", "fail/certificate-empty", "fail/key-relative"],
)  # fmt: skip
def test_nginx_snippet_refuses_what_would_inject(fields: dict[str, object]) -> None:
    with pytest.raises(InvalidInput):
        gateway.NginxSnippet(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("listen", ["1", "65535", "127.0.0.1:8443", "[::1]:8443", "gw.local:443"])
def test_nginx_snippet_listens_on_a_port_or_address_and_port(listen: str) -> None:
    assert f"    listen {listen} ssl;\n" in gateway.nginx_snippet(
        gateway.NginxSnippet(listen=listen)
    )
