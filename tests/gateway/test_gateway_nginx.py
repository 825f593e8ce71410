"""The gateway flow with the real programs: a partner onboarded with the `trellis` CLI, a real
nginx configured from `trellis gateway nginx-snippet` and `trellis gateway truststore`, real
curl as the partner, real openssl checking thumbprints; a tiny upstream records what nginx
passes on. Refusals: no certificate, a mesh SVID, a revoked certificate (after the CRL is
rewritten and our nginx reloaded)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.test_walkthrough import Trellis
from tests.conftest import free_port
from tests.gateway.gwkit import (
    NGINX,
    Nginx,
    Upstream,
    curl,
    load_crls,
    openssl_x5t,
    self_signed_server,
    upstream,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (CI installs nginx-light)"),
    pytest.mark.skipif(
        shutil.which("curl") is None or shutil.which("openssl") is None,
        reason="curl and openssl are needed to play the partner",
    ),
]

NO_CERT = "No required SSL certificate was sent"
CERT_ERROR = "The SSL certificate error"


@pytest.fixture
def trellis(tmp_path: Path) -> Trellis:
    # SQLite only: the database behaviour is covered on both databases by the unit/REST tests.
    cli = Trellis(tmp_path / "var", f"sqlite:///{tmp_path / 'trellis.db'}")
    cli.set_up("init", "--trust-domain", "example.org")
    return cli


@pytest.fixture
def backend() -> Iterator[Upstream]:
    with upstream() as state:
        yield state


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    server = Nginx(tmp_path / "nginx", free_port())
    server.directory.mkdir()
    try:
        yield server
    finally:
        server.stop()


def test_partner_calls_through_nginx_and_revocation_shuts_it_out(
    trellis: Trellis, backend: Upstream, nginx: Nginx, tmp_path: Path
) -> None:
    partner = tmp_path / "partner"
    partner.mkdir()
    # the partner makes its key and CSR with its own tools; only the CSR travels
    subprocess.run(
        ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(partner / "acme.key"), "-subj", "/CN=acme",
         "-out", str(partner / "acme.csr")],
        check=True, capture_output=True,
    )  # fmt: skip
    (partner / "p12-password").write_text("correct horse battery\n")

    trellis.run("gateway", "init")
    trellis.run("gateway", "consumer", "add", "acme", "--contact", "api@acme.example")
    issued = trellis.json(
        "gateway", "cert", "issue", "acme",
        "--csr", str(partner / "acme.csr"), "--out", str(partner / "acme.pem"),
    )  # fmt: skip
    bundled = trellis.json(
        "gateway", "cert", "issue", "acme", "--p12", str(partner / "acme.p12"),
        "--p12-password-file", str(partner / "p12-password"),
    )  # fmt: skip
    assert isinstance(issued, dict) and isinstance(bundled, dict)
    assert (partner / "acme.p12").stat().st_mode & 0o777 == 0o600

    store = tmp_path / "truststore"
    trellis.run("gateway", "truststore", "--format", "nginx", "--out", str(store))
    assert sorted(p.name for p in store.iterdir()) == ["client-ca.pem", "crl.pem"]
    assert (store / "crl.pem").read_bytes().count(b"BEGIN X509 CRL") == 2  # intermediate + root

    web_ca, server_crt, server_key = self_signed_server(tmp_path / "web")
    snippet = trellis.run(
        "gateway", "nginx-snippet", "--upstream", backend.url, "--truststore", str(store),
        "--server-name", "127.0.0.1", "--listen", f"127.0.0.1:{nginx.port}",
        "--ssl-certificate", str(server_crt), "--ssl-certificate-key", str(server_key),
    ).stdout  # fmt: skip
    for directive in ("ssl_verify_client      on;", "ssl_verify_depth       2;",
                      f"ssl_crl                {store / 'crl.pem'};",
                      f"ssl_client_certificate {store / 'client-ca.pem'};"):  # fmt: skip
        assert directive in snippet
    nginx.write_config(snippet)
    nginx.start()
    url = f"https://127.0.0.1:{nginx.port}/orders"

    # 1. the CSR-issued certificate (leaf + chain file, the partner's own key) gets through
    reply = curl(
        url, web_ca, "--cert", str(partner / "acme.pem"), "--key", str(partner / "acme.key")
    )
    assert reply.status == 200, (reply, nginx.error_log())
    seen = backend.seen[-1]
    assert seen["x-ssl-client-verify"] == "SUCCESS"
    assert seen["x-ssl-client-s-dn"] == "CN=acme"
    forwarded = backend.client_certificate()
    assert format(forwarded.serial_number, "x") == issued["serial"]

    # 2. the PKCS#12 one too, as curl reads it
    reply = curl(url, web_ca, "--cert", str(partner / "acme.p12"), "--cert-type", "P12",
                 "--pass", "correct horse battery")  # fmt: skip
    assert reply.status == 200, (reply, nginx.error_log())
    assert backend.seen[-1]["x-ssl-client-verify"] == "SUCCESS"
    assert format(backend.client_certificate().serial_number, "x") == bundled["serial"]

    # 3. the x5t#S256 Trellis reports is what openssl computes from the certificate
    (partner / "leaf.pem").write_text(issued["certificate"])
    assert issued["x5t#S256"] == openssl_x5t(partner / "leaf.pem")
    assert openssl_x5t(partner / "leaf.pem") == openssl_x5t(partner / "acme.pem")  # leaf first

    # 4. refused: no certificate at all; a mesh SVID (another authority entirely)
    calls = len(backend.seen)
    reply = curl(url, web_ca)
    assert reply.status == 400 and NO_CERT in reply.body
    mesh = tmp_path / "mesh"
    trellis.set_up("svid", "mint", "--spiffe-id", "spiffe://example.org/ns/default/sa/web",
                   "--out", str(mesh))  # fmt: skip
    reply = curl(url, web_ca, "--cert", str(mesh / "svid.pem"), "--key", str(mesh / "svid.key"))
    assert reply.status == 400 and CERT_ERROR in reply.body
    assert len(backend.seen) == calls  # nothing reached the upstream

    # 5. revoked: the recorded crl.pem is rewritten by the revoke; nginx reads it on reload
    crl_before = (store / "crl.pem").read_bytes()
    revoked = trellis.json(
        "gateway", "cert", "revoke", issued["serial"], "--reason", "keyCompromise"
    )
    assert isinstance(revoked, dict) and revoked["status"] == "revoked"
    assert revoked["rewritten"] == [str(store / "crl.pem")]
    assert (store / "crl.pem").read_bytes() != crl_before
    serials = {r.serial_number for crl in load_crls((store / "crl.pem").read_bytes()) for r in crl}
    assert int(issued["serial"], 16) in serials
    nginx.reload()
    reply = curl(
        url, web_ca, "--cert", str(partner / "acme.pem"), "--key", str(partner / "acme.key")
    )
    assert reply.status == 400 and CERT_ERROR in reply.body, reply
    assert "certificate revoked" in nginx.error_log()
    # the partner's other certificate (the renewal overlap) still works
    reply = curl(url, web_ca, "--cert", str(partner / "acme.p12"), "--cert-type", "P12",
                 "--pass", "correct horse battery")  # fmt: skip
    assert reply.status == 200
    assert len(backend.seen) == calls + 1
