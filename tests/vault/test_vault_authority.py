"""A whole authority on the Vault backend: every CA signature (certificates, CRLs, OCSP responses)
made by OpenBao Transit, checked by real openssl; no CA key on disk; Transit key rotation never
breaks the CA (handles are pinned to the version they were created with)."""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from sqlmodel import Session, select

from ca.authority import AuthorityParams, active_issuer, init_authority
from ca.certs import revoke_certificate
from ca.clock import FixedClock
from ca.config import Context, build_context
from ca.crl import current_crl
from ca.keys import KeyType
from ca.ocsp import respond
from ca.revocation import RevocationReason
from ca.rotation import rotate
from ca.serial import Serial
from ca.store.models import CaRow, OcspResponderRow
from tests.ca.svidkit import Workload, enrol
from tests.conftest import TRUST_DOMAIN
from tests.vault.conftest import CLEANUP_POLICY_FILE, close, vault_settings
from tests.vault.openbao import OpenBao

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

TD = TRUST_DOMAIN.name


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *args], capture_output=True, text=True, timeout=30, check=False
    )


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def assert_openssl_verifies(tmp: Path, ctx: Context, workload: Workload) -> None:
    issuer = active_issuer(ctx)
    tag = format(workload.cert.serial_number, "x")[:12]
    result = openssl(
        "verify",
        "-x509_strict",
        "-purpose", "sslclient",
        "-CAfile", write(tmp / f"bundle-{tag}.pem", issuer.bundle_pem),
        "-untrusted", write(tmp / f"chain-{tag}.pem", issuer.chain_pem),
        write(tmp / f"leaf-{tag}.pem", workload.svid.certificate_pem),
    )  # fmt: skip
    assert result.returncode == 0 and ": OK" in result.stdout, result.stdout + result.stderr


def assert_openssl_verifies_crl(tmp: Path, der: bytes, ca: x509.Certificate) -> str:
    crl_file = write(tmp / f"{ca.serial_number:x}.crl", der)
    ca_file = write(tmp / f"{ca.serial_number:x}-ca.pem", pem(ca))
    result = openssl("crl", "-inform", "DER", "-in", crl_file, "-CAfile", ca_file, "-noout")
    # openssl 3.0's ``crl`` exits 0 on a bad signature too: only the verdict line tells.
    assert result.returncode == 0 and "verify OK" in result.stderr, result.stderr
    return openssl("crl", "-inform", "DER", "-in", crl_file, "-noout", "-text").stdout


def transit_names(ctx: Context) -> list[str]:
    with Session(ctx.engine) as session:
        rows: list[CaRow | OcspResponderRow] = [*session.exec(select(CaRow)).all()]
        rows += session.exec(select(OcspResponderRow)).all()
    assert rows and all(row.key_backend == "vault" for row in rows)
    return [row.key_ref.split("@")[0] for row in rows]


@pytest.fixture(
    params=[
        (KeyType.EC_P384, KeyType.EC_P256),
        (KeyType.RSA_3072, KeyType.RSA_2048),
        (KeyType.ED25519, KeyType.ED25519),
    ],
    ids=["ec", "rsa", "ed25519"],
)
def any_vault_ctx(
    request: pytest.FixtureRequest, tmp_path: Path, openbao: OpenBao, clock: FixedClock
) -> Iterator[Context]:
    root_type, key_type = request.param
    ctx = build_context(vault_settings(tmp_path, openbao), clock=clock)
    init_authority(ctx, AuthorityParams(TRUST_DOMAIN, root_key_type=root_type, key_type=key_type))
    yield ctx
    close(ctx)


def test_svids_from_a_transit_ca_verify_with_openssl(
    any_vault_ctx: Context, tmp_path: Path
) -> None:
    ctx = any_vault_ctx
    for subject in (KeyType.EC_P256, KeyType.RSA_2048, KeyType.ED25519):
        workload = enrol(ctx, f"spiffe://{TD}/ns/default/sa/{subject.value}", subject)
        assert_openssl_verifies(tmp_path, ctx, workload)
    issuer = active_issuer(ctx)
    assert issuer.signer.handle.backend == "vault"
    keys = ctx.settings.data_dir / "keys"
    assert not any(keys.iterdir())  # no CA private-key file anywhere (the dir exists, empty)
    assert not ctx.signs_locally  # signing waits on Vault: the API issues in its thread pool


def test_crls_signed_by_transit_verify_with_openssl(vault_ctx: Context, tmp_path: Path) -> None:
    victim = enrol(vault_ctx, f"spiffe://{TD}/victim")
    revoke_certificate(
        vault_ctx, Serial(victim.cert.serial_number), RevocationReason.KEY_COMPROMISE, "t"
    )
    issuer = active_issuer(vault_ctx)
    text = assert_openssl_verifies_crl(
        tmp_path, current_crl(vault_ctx, "mesh", "intermediate").der, issuer.certificate
    )
    assert f"{victim.cert.serial_number:X}" in text.replace(":", "").upper()
    assert_openssl_verifies_crl(
        tmp_path, current_crl(vault_ctx, "mesh", "root").der, issuer.roots[0]
    )


def test_ocsp_responses_signed_by_a_transit_responder_key_verify(
    vault_ctx: Context, openbao: OpenBao, tmp_path: Path
) -> None:
    issuer = active_issuer(vault_ctx)
    good = enrol(vault_ctx, f"spiffe://{TD}/good")
    bad = enrol(vault_ctx, f"spiffe://{TD}/bad")
    revoke_certificate(
        vault_ctx, Serial(bad.cert.serial_number), RevocationReason.KEY_COMPROMISE, "t"
    )
    ca_file = write(tmp_path / "all-cas.pem", issuer.bundle_pem + issuer.chain_pem)
    issuer_file = write(tmp_path / "issuer.pem", issuer.chain_pem)
    for workload, expected in ((good, "good"), (bad, "revoked")):
        request = (
            ocsp.OCSPRequestBuilder()
            .add_certificate(workload.cert, issuer.certificate, hashes.SHA256())
            .build()
        )
        der = respond(vault_ctx, request.public_bytes(serialization.Encoding.DER))
        response = ocsp.load_der_ocsp_response(der)
        assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
        tag = format(workload.cert.serial_number, "x")[:12]
        result = openssl(
            "ocsp",
            "-respin", write(tmp_path / f"resp-{tag}.der", der),
            "-issuer", issuer_file,
            "-CAfile", ca_file,
            "-sha256",  # the CertID hash of our request, before -cert
            "-cert", write(tmp_path / f"leaf-{tag}.pem", workload.svid.certificate_pem),
        )  # fmt: skip
        assert "Response verify OK" in result.stderr + result.stdout, result.stderr
        assert f": {expected}" in result.stdout, result.stdout
    # The delegated responder's key was created in the CA's backend: Transit, not a file.
    with Session(vault_ctx.engine) as session:
        responder = session.exec(select(OcspResponderRow)).one()
    assert responder.key_backend == "vault"
    assert openbao.transit_key(responder.key_ref.split("@")[0])["exportable"] is False


def test_ca_keys_are_non_exportable_transit_keys(vault_ctx: Context, openbao: OpenBao) -> None:
    names = transit_names(vault_ctx)
    assert len(names) == 2 and all(name.startswith("trellis-mesh-") for name in names)
    for name in names:
        info = openbao.transit_key(name)
        assert info["exportable"] is False and info["allow_plaintext_backup"] is False
    files = [p for p in vault_ctx.settings.data_dir.rglob("*") if p.is_file()]
    assert not any(p.suffix == ".pem" and "keys" in p.parts for p in files), files


def test_transit_rotation_leaves_the_ca_working(
    vault_ctx: Context, openbao: OpenBao, tmp_path: Path, clock: FixedClock
) -> None:
    before = enrol(vault_ctx, f"spiffe://{TD}/before")
    for name in transit_names(vault_ctx):
        openbao.api("POST", f"transit/keys/{name}/rotate")
        assert openbao.transit_key(name)["latest_version"] == 2
    # The running process (cached, pinned signer) and a fresh one (loads from the CA rows) both
    # still sign with v1, so everything verifies against the unchanged CA certificates.
    after = enrol(vault_ctx, f"spiffe://{TD}/after")
    fresh = build_context(vault_settings(tmp_path, openbao), clock=clock)
    try:
        restarted = enrol(fresh, f"spiffe://{TD}/restarted")
        for workload in (before, after, restarted):
            assert_openssl_verifies(tmp_path, fresh, workload)
        issuer = active_issuer(fresh)
        assert_openssl_verifies_crl(
            tmp_path, current_crl(fresh, "mesh", "intermediate").der, issuer.certificate
        )
        assert issuer.signer.handle.ref.endswith("@v1")
    finally:
        close(fresh)


def test_init_force_destroys_the_old_transit_keys(vault_ctx: Context, openbao: OpenBao) -> None:
    old = set(transit_names(vault_ctx))
    init_authority(vault_ctx, AuthorityParams(TRUST_DOMAIN, force=True))
    new = set(transit_names(vault_ctx))
    assert len(new) == 2 and not new & old
    remaining = set(openbao.api("LIST", "transit/keys")["data"]["keys"])
    assert new <= remaining and not old & remaining


@pytest.mark.parametrize("policy", ["trellis", "trellis-cleanup"])
def test_an_authority_lives_on_the_shipped_policy_alone(
    openbao: OpenBao,
    tmp_path: Path,
    clock: FixedClock,
    caplog: pytest.LogCaptureFixture,
    policy: str,
) -> None:
    """deploy/vault/trellis-policy.hcl grants exactly what Trellis does: init, issue, rotate an
    intermediate (a new Transit key, never a Transit rotation), init --force, whose old keys it
    may not delete (each is named in one warning); the opt-in clean-up policy deletes them."""
    openbao.put_policy("trellis-cleanup", CLEANUP_POLICY_FILE.read_text())
    token = openbao.create_token(policy, ttl="1h", no_default_policy=True)
    ctx = build_context(vault_settings(tmp_path, openbao, vault_token=token), clock=clock)
    try:
        init_authority(ctx, AuthorityParams(TRUST_DOMAIN))
        assert_openssl_verifies(tmp_path, ctx, enrol(ctx, f"spiffe://{TRUST_DOMAIN.name}/a"))
        rotate(ctx, force=True)  # prepares the next intermediate
        rotate(ctx, force=True)  # activates it
        assert_openssl_verifies(tmp_path, ctx, enrol(ctx, f"spiffe://{TRUST_DOMAIN.name}/b"))
        old = set(transit_names(ctx))
        assert len(old) == 3
        caplog.set_level(logging.WARNING)
        init_authority(ctx, AuthorityParams(TRUST_DOMAIN, force=True))
        remaining = set(openbao.api("LIST", "transit/keys")["data"]["keys"])
        if policy == "trellis-cleanup":
            assert not old & remaining and caplog.messages == []
            return
        assert old <= remaining
        assert sorted(caplog.messages) == sorted(
            f"Transit key {name} is left in Vault: no CA uses it, and Trellis's Vault policy "
            f"does not let it delete keys; delete it by hand: vault write transit/keys/{name}/"
            f"config deletion_allowed=true && vault delete transit/keys/{name}"
            for name in old
        )
    finally:
        close(ctx)
