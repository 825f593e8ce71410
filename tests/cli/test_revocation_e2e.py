"""Revocation end to end with real processes: a running ``trellis serve`` over HTTPS, the
``trellis`` CLI revoking and fetching CRLs, and real ``openssl ocsp`` / ``openssl crl`` /
``openssl verify -crl_check_all`` as the relying party; on SQLite and on PostgreSQL.

Entries, tokens and most SVIDs go through the REST API (the walkthrough covers their CLI);
every revocation step goes through the CLI.
"""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.cli.test_walkthrough import Trellis

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary not installed"),
]

TD = "example.org"
# What `trellis revoke --json` prints for each certificate (api.schemas.RevokedCertificateOut:
# CertificateOut and whether the issuer's CRL was re-signed).
CERTIFICATE_FIELDS = {
    "serial", "spiffe_id", "status", "profile", "not_before", "not_after", "fingerprint_sha256",
    "requested_by", "created_at", "revoked_at", "revocation_reason", "revoked_by",
    "revocation_request_id", "invalidity_date", "certificate", "crl_skipped",
}  # fmt: skip


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *args], capture_output=True, text=True, timeout=30, check=False
    )


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def hex_serial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def csr_pem(spiffe_id: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    builder = builder.add_extension(
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


class Api:
    """The running server, as an admin and as workloads."""

    def __init__(self, url: str, bundle: Path, admin_token: str) -> None:
        tls = ssl.create_default_context(cafile=str(bundle))
        self.client = httpx.Client(base_url=url, verify=tls, timeout=20)
        self.admin = {"Authorization": f"Bearer {admin_token}"}

    def join_token(self, spiffe_id: str, uses: int) -> str:
        entry = self.client.post("/v1/entries", json={"spiffe_id": spiffe_id}, headers=self.admin)
        assert entry.status_code == 201, entry.text
        token = self.client.post(
            "/v1/tokens", json={"entry_id": entry.json()["id"], "uses": uses}, headers=self.admin
        )
        assert token.status_code == 201, token.text
        return str(token.json()["token"])

    def svid(self, token: str, spiffe_id: str) -> tuple[x509.Certificate, x509.Certificate]:
        """(leaf, issuing intermediate) of a fresh SVID."""
        response = self.client.post(
            "/v1/svid",
            json={"csr": csr_pem(spiffe_id)},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        leaf = x509.load_pem_x509_certificate(body["certificate"].encode())
        return leaf, x509.load_pem_x509_certificates(body["chain"].encode())[0]

    def crl(self, selector: str) -> x509.CertificateRevocationList:
        response = self.client.get(f"/v1/crl/mesh/{selector}.crl")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/pkix-crl"
        return x509.load_der_x509_crl(response.content)


def openssl_ocsp(
    tmp: Path, leaf: Path, intermediate: Path, url: str, bundle: Path
) -> subprocess.CompletedProcess[str]:
    """openssl's own OCSP client against the running responder (over HTTPS; the responder's
    delegated certificate chains to the bundle through the intermediate)."""
    return openssl(
        "ocsp", "-issuer", str(intermediate), "-cert", str(leaf), "-url", url,
        "-CAfile", str(bundle), "-verify_other", str(intermediate),
        "-resp_text", "-timeout", "20",
    )  # fmt: skip


def verify_with_crls(
    tmp: Path,
    name: str,
    leaf: x509.Certificate,
    intermediate: x509.Certificate,
    bundle: Path,
    crls: list[x509.CertificateRevocationList],
) -> subprocess.CompletedProcess[str]:
    (tmp / f"{name}.pem").write_bytes(pem(leaf))
    (tmp / f"{name}-int.pem").write_bytes(pem(intermediate))
    (tmp / f"{name}-crls.pem").write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls)
    )
    return openssl(
        "verify", "-crl_check_all", "-CAfile", str(bundle),
        "-untrusted", str(tmp / f"{name}-int.pem"), "-CRLfile", str(tmp / f"{name}-crls.pem"),
        str(tmp / f"{name}.pem"),
    )  # fmt: skip


@pytest.fixture
def api(trellis: Trellis, server: str) -> Iterator[Api]:
    """Closed before the server stops: uvicorn waits for open keep-alive TLS connections."""
    token = (trellis.data_dir / "admin-token").read_text().strip()
    client = Api(server, trellis.data_dir / "bundle.pem", token)
    yield client
    client.client.close()


def _assert_certificate_json(item: Any, **expected: object) -> None:
    assert isinstance(item, dict)
    assert set(item) == CERTIFICATE_FIELDS, set(item) ^ CERTIFICATE_FIELDS
    for key, value in expected.items():
        assert item[key] == value, (key, item[key])
    assert item["revoked_at"] and item["revoked_by"] == "cli"
    assert item["crl_skipped"] is None  # the issuer's CRL lists it
    assert re.fullmatch(r"cli-[0-9a-f]{16}", item["revocation_request_id"]), item


def test_revocation_as_relying_parties_see_it(
    trellis: Trellis, server: str, api: Api, tmp_path: Path
) -> None:
    bundle = trellis.data_dir / "bundle.pem"
    web = f"spiffe://{TD}/web"
    web_token = api.join_token(web, uses=3)

    # 1. An SVID through the CLI; openssl's OCSP client says "good" and trusts the answer.
    out = tmp_path / "web"
    trellis.run("svid", "request", "--server", server, "--bundle", str(bundle),
                "--token", web_token, "--out", str(out))  # fmt: skip
    leaf, old_intermediate = x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())[:2]
    (tmp_path / "leaf.pem").write_bytes(pem(leaf))
    (tmp_path / "int.pem").write_bytes(pem(old_intermediate))
    ocsp_url = f"{server}/v1/ocsp"
    good = openssl_ocsp(tmp_path, tmp_path / "leaf.pem", tmp_path / "int.pem", ocsp_url, bundle)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "Response verify OK" in good.stderr, good.stderr
    assert f"{tmp_path / 'leaf.pem'}: good" in good.stdout, good.stdout
    assert "OCSP Nonce" in good.stdout  # openssl sent a nonce and it came back

    # 2. `trellis revoke SERIAL --yes --json`; OCSP says "revoked" at once.
    serial = hex_serial(leaf)
    revoked = trellis.json("revoke", serial, "--reason", "keyCompromise", "--yes")
    _assert_certificate_json(
        revoked, serial=serial, spiffe_id=web, status="revoked", revocation_reason="keyCompromise"
    )
    now_revoked = openssl_ocsp(
        tmp_path, tmp_path / "leaf.pem", tmp_path / "int.pem", ocsp_url, bundle
    )
    assert "Response verify OK" in now_revoked.stderr, now_revoked.stderr
    assert f"{tmp_path / 'leaf.pem'}: revoked" in now_revoked.stdout, now_revoked.stdout
    assert "Reason: keyCompromise" in now_revoked.stdout, now_revoked.stdout

    # 3. `trellis crl fetch --pem`, verified by openssl and listing the serial.
    crl_file = tmp_path / "int-crl.pem"
    trellis.run("crl", "fetch", "--out", str(crl_file), "--pem")
    checked = openssl("crl", "-verify", "-in", str(crl_file), "-CAfile", str(tmp_path / "int.pem"),
                      "-noout", "-text")  # fmt: skip
    assert "verify OK" in checked.stderr, checked.stderr
    shown = re.findall(r"Serial Number: ([0-9A-F]+)", checked.stdout)
    assert [int(value, 16) for value in shown] == [leaf.serial_number], checked.stdout

    # 4. `trellis revoke --spiffe-id`: every live SVID of that identity, as a JSON list.
    api_id = f"spiffe://{TD}/api"
    api_token = api.join_token(api_id, uses=2)
    api_serials = {hex_serial(api.svid(api_token, api_id)[0]) for _ in range(2)}
    listed = trellis.json("revoke", "--spiffe-id", api_id, "--reason", "superseded", "--yes")
    assert isinstance(listed, list) and len(listed) == 2
    for item in listed:
        _assert_certificate_json(
            item, spiffe_id=api_id, status="revoked", revocation_reason="superseded"
        )
    assert {item["serial"] for item in listed} == api_serials
    again = trellis.run("revoke", "--spiffe-id", api_id, "--yes", ok=False)
    assert again.returncode == 5 and "no live certificates" in again.stderr

    # 5. The emergency, while the server runs.
    old_svid, issued_by = api.svid(web_token, web)
    assert issued_by == old_intermediate
    result = trellis.json("authority", "revoke-intermediate", "--yes")
    assert isinstance(result, dict)
    assert set(result) == {
        "revoked_serial",
        "new_serial",
        "to_reissue",
        "final_crl_skipped",
        "also_revoked",
        "publish_error",
    }
    assert result["final_crl_skipped"] is None  # the old key was there to sign its final CRL
    assert result["publish_error"] is None
    assert result["new_serial"] not in result["also_revoked"]
    assert result["revoked_serial"] == hex_serial(old_intermediate)
    reissue = {item["serial"]: item for item in result["to_reissue"]}
    assert hex_serial(old_svid) in reissue and serial not in reissue
    assert not api_serials & set(reissue)

    # The running server's very next issuance comes from the new intermediate.
    new_svid, new_intermediate = api.svid(web_token, web)
    assert hex_serial(new_intermediate) == result["new_serial"]
    new_svid.verify_directly_issued_by(new_intermediate)

    # Relying parties with the server's CRLs refuse the old SVID and accept the new one.
    root_crl = api.crl("root")
    assert hex_serial(old_intermediate) in {format(e.serial_number, "x") for e in root_crl}
    old_crl, new_crl = api.crl(result["revoked_serial"]), api.crl("intermediate")
    refused = verify_with_crls(
        tmp_path, "old", old_svid, old_intermediate, bundle, [root_crl, old_crl]
    )
    assert refused.returncode != 0, refused.stdout
    assert "certificate revoked" in refused.stdout + refused.stderr
    accepted = verify_with_crls(
        tmp_path, "new", new_svid, new_intermediate, bundle, [root_crl, new_crl]
    )
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
