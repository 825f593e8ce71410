"""A Transit key that is gone, or was replaced under the same name, is the key store's damage:
``Unavailable`` (503, exit 8), and nothing signed with a replaced key is published or stored.
Every signature is verified against the CA certificate's public key, not Transit's."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

import ca.readiness
from api.app import create_app
from ca import audit, metrics
from ca.authority import AuthorityParams, check_keys, init_authority
from ca.certs import CertStatus, get_certificate, revoke_certificate
from ca.clock import FixedClock
from ca.config import Context, build_context
from ca.crl import current_crl
from ca.errors import Unavailable
from ca.gateway import GatewayParams, init_gateway
from ca.keys import KeyType
from ca.revocation import RevocationReason
from ca.serial import Serial
from ca.store.models import CaRow
from tests.api.restkit import assert_problem, bearer
from tests.ca.svidkit import (
    add_entry,
    count_rows,
    enrol,
    join_secret,
    make_csr,
    new_key,
    uses_remaining,
)
from tests.conftest import TRUST_DOMAIN, free_port
from tests.vault.conftest import POLICY_FILE, close, vault_settings
from tests.vault.openbao import OpenBao
from tests.vault.test_vault_auth import run_check


def intermediate_key_name(ctx: Context) -> str:
    with Session(ctx.engine) as session:
        row = session.exec(
            select(CaRow).where(CaRow.role == "intermediate", CaRow.state == "active")
        ).one()
    return row.key_ref.split("@", 1)[0]


def delete_transit_key(openbao: OpenBao, name: str) -> None:
    openbao.api("POST", f"transit/keys/{name}/config", {"deletion_allowed": True})
    openbao.api("DELETE", f"transit/keys/{name}")


def replace_transit_key(openbao: OpenBao, name: str) -> None:
    """Same name, same type, another key: version 1 again, so the CA row's pin still parses."""
    delete_transit_key(openbao, name)
    openbao.api("POST", f"transit/keys/{name}", {"type": "ecdsa-p256"})


def refused_svid(ctx: Context, client: TestClient, label: str) -> str:
    spiffe_id = f"spiffe://{TRUST_DOMAIN.name}/{label}"
    token_id, secret = join_secret(ctx, add_entry(ctx, spiffe_id))
    csr = make_csr(new_key(KeyType.EC_P256), uris=[spiffe_id])
    certificates = count_rows(ctx, "certificate")
    response = client.post("/v1/svid", json={"csr": csr.decode()}, headers=bearer(secret))
    body = assert_problem(response, 503)
    assert count_rows(ctx, "certificate") == certificates
    assert uses_remaining(ctx, token_id) == 1
    return str(body["detail"])


@pytest.mark.parametrize("started", ["before", "after"], ids=["cached-signer", "new-process"])
def test_a_replaced_transit_key_signs_nothing(
    vault_ctx: Context, openbao: OpenBao, started: str
) -> None:
    """``before``: the process loaded the key before it was replaced (its signatures are checked
    against the certificate); ``after``: a process that loads the replaced key refuses it."""
    ctx = vault_ctx
    workload = enrol(ctx, f"spiffe://{TRUST_DOMAIN.name}/before")
    serial = Serial(workload.cert.serial_number)
    crl_before = current_crl(ctx, "mesh", "intermediate").der
    replace_transit_key(openbao, intermediate_key_name(ctx))
    if started == "after":
        ctx.cache.clear()
    reason = "does not verify against its CA certificate|not the key of its CA certificate"

    with pytest.raises(Unavailable, match=reason):
        revoke_certificate(ctx, serial, RevocationReason.KEY_COMPROMISE, "test")
    assert get_certificate(ctx, serial).status is CertStatus.ACTIVE
    assert current_crl(ctx, "mesh", "intermediate").der == crl_before
    with TestClient(create_app(ctx), raise_server_exceptions=False) as client:
        assert "CA certificate" in refused_svid(ctx, client, "after")
    if started == "after":
        with pytest.raises(Unavailable, match="not the key of its CA certificate"):
            check_keys(ctx)  # trellis serve refuses to start: exit 8


def test_a_deleted_transit_key_is_unavailable(vault_ctx: Context, openbao: OpenBao) -> None:
    ctx = vault_ctx
    enrol(ctx, f"spiffe://{TRUST_DOMAIN.name}/before")
    delete_transit_key(openbao, intermediate_key_name(ctx))
    ctx.cache.clear()
    with TestClient(create_app(ctx), raise_server_exceptions=False) as client:
        assert "is missing from the vault key store" in refused_svid(ctx, client, "after")
    with pytest.raises(Unavailable, match="missing from the vault key store"):
        check_keys(ctx)


def test_a_seal_that_cannot_sign_fails_and_keeps_the_chain(
    vault_ctx: Context, tmp_path: Path, openbao: OpenBao, clock: FixedClock
) -> None:
    """``audit seal`` means chain and sign now: with Vault unreachable it chains (no key needed)
    and then fails, instead of reporting records sealed that no signature covers."""
    enrol(vault_ctx, f"spiffe://{TRUST_DOMAIN.name}/audited")
    settings = vault_settings(tmp_path, openbao, vault_addr=f"http://127.0.0.1:{free_port()}")
    cut_off = build_context(settings, clock=clock)  # the same instance, Vault out of reach
    try:
        with pytest.raises(Unavailable, match=r"chained \d+ record\(s\), head at seq \d+, but"):
            audit.seal(cut_off)
    finally:
        close(cut_off)
    result = audit.verify(vault_ctx)
    assert result.ok and result.unsealed == 0 and result.unsigned == result.sealed > 0
    audit.seal(vault_ctx)  # Vault reachable again: the head is signed
    assert audit.verify(vault_ctx).unsigned == 0


def test_readiness_fails_when_the_token_may_not_sign(
    vault_ctx: Context, openbao: OpenBao, tmp_path: Path, clock: FixedClock
) -> None:
    """Vault answers, the token is alive, but its policy lacks transit/sign: every issuance is
    a 503, so /readyz is too (``trellis vault check`` says the same)."""
    openbao.put_policy("trellis-no-sign", POLICY_FILE.read_text().replace("/sign/", "/sign-not/"))
    token = openbao.create_token("trellis-no-sign", ttl="1h")
    restricted = build_context(vault_settings(tmp_path, openbao, vault_token=token), clock=clock)
    try:
        with TestClient(create_app(restricted), raise_server_exceptions=False) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert "may not sign" in ready.json()["detail"]["keys"]
            assert "transit/sign" in refused_svid(restricted, client, "denied")
    finally:
        close(restricted)
    with TestClient(create_app(vault_ctx), raise_server_exceptions=False) as client:
        assert client.get("/readyz").status_code == 200  # the full policy's token is ready


def test_readiness_fails_when_the_transit_key_goes_while_serving(
    vault_ctx: Context, openbao: OpenBao, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ca.readiness, "READY_FOR", 0.0)
    with TestClient(create_app(vault_ctx), raise_server_exceptions=False) as client:
        assert client.get("/readyz").status_code == 200
        name = intermediate_key_name(vault_ctx)
        delete_transit_key(openbao, name)
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert "is missing from the vault key store" in ready.json()["detail"]["keys"]
        openbao.api("POST", f"transit/keys/{name}", {"type": "ecdsa-p256"})  # another key
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert "not the key of its CA certificate" in ready.json()["detail"]["keys"]


def test_a_key_made_exportable_behind_trellis_s_back_is_not_ready(
    vault_ctx: Context,
    openbao: OpenBao,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """docs/vault.md: CA keys are exportable=false, allow_plaintext_backup=false. One that can
    leave Vault is a compromise indicator: /readyz is 503 naming it, and so is ``trellis vault
    check``; signing (a final CRL, a revocation) still works."""
    monkeypatch.setattr(ca.readiness, "READY_FOR", 0.0)
    name = intermediate_key_name(vault_ctx)
    with TestClient(create_app(vault_ctx), raise_server_exceptions=False) as client:
        assert client.get("/readyz").status_code == 200
        openbao.api(
            "POST",
            f"transit/keys/{name}/config",
            {"exportable": True, "allow_plaintext_backup": True},
        )
        ready = client.get("/readyz")
        assert ready.status_code == 503, ready.text
        detail = ready.json()["detail"]["keys"]
        assert name in detail and "exportable=true and allow_plaintext_backup=true" in detail
    code, checks = vault_check(vault_ctx, openbao, monkeypatch, capsys)
    assert code == 8 and checks["ca keys"]["ok"] is False, checks
    assert f"{name}@v1 is exportable=true" in checks["ca keys"]["detail"]


def test_a_pinned_version_below_min_encryption_version_is_not_ready_and_not_retried(
    vault_ctx: Context, openbao: OpenBao, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Transit refuses every signature with a version under min_encryption_version (HTTP 500,
    for good): /readyz says so, and a signature is asked once, not three times."""
    monkeypatch.setattr(ca.readiness, "READY_FOR", 0.0)
    name = intermediate_key_name(vault_ctx)
    with TestClient(create_app(vault_ctx), raise_server_exceptions=False) as client:
        assert client.get("/readyz").status_code == 200  # the signer is loaded and cached
        openbao.api("POST", f"transit/keys/{name}/rotate")
        openbao.api("POST", f"transit/keys/{name}/config", {"min_encryption_version": 2})
        ready = client.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert "min_encryption_version" in ready.json()["detail"]["keys"]
        errors = metrics.VAULT_ERRORS.labels("transit")
        before = errors._value.get()
        started = time.monotonic()
        assert "minimum encryption key version" in refused_svid(vault_ctx, client, "refused")
        assert errors._value.get() - before == 1  # one request, one error
        assert time.monotonic() - started < 0.3  # no 0.1 + 0.2 s of backoff
    vault_ctx.cache.clear()  # a process that loads the key now is told why at once
    with pytest.raises(Unavailable, match="min_encryption_version"):
        check_keys(vault_ctx)


def test_a_missing_transit_mount_is_unavailable_not_not_found(
    openbao: OpenBao, tmp_path: Path, clock: FixedClock
) -> None:
    """A 404 from a sign means the mount (or namespace) is gone: Vault's state, 503, not a
    404 telling the client its certificate does not exist; nothing is recorded. (A mount of
    the test's own: the session's transit/ serves the other tests meanwhile.)"""
    openbao.mount("transit-gone", "transit")
    settings = vault_settings(tmp_path, openbao, vault_transit_mount="transit-gone")
    ctx = build_context(settings, clock=clock)
    try:
        init_authority(ctx, AuthorityParams(TRUST_DOMAIN))
        workload = enrol(ctx, f"spiffe://{TRUST_DOMAIN.name}/before")
        openbao.api("DELETE", "sys/mounts/transit-gone")
        with TestClient(create_app(ctx), raise_server_exceptions=False) as client:
            assert "does not exist in Vault" in refused_svid(ctx, client, "after")
        serial = Serial(workload.cert.serial_number)
        with pytest.raises(Unavailable):
            revoke_certificate(ctx, serial, RevocationReason.KEY_COMPROMISE, "test")
        assert get_certificate(ctx, serial).status is CertStatus.ACTIVE
    finally:
        close(ctx)


def test_readyz_names_an_unusable_passphrase_of_file_keys_beside_vault_ones(
    tmp_path: Path, openbao: OpenBao, clock: FixedClock
) -> None:
    """The gateway's keys are files on an instance whose mesh is in Vault: the passphrase is
    needed for those only, so a damaged one no longer stops the whole instance (the context
    could not be built); /readyz names it, and the mesh goes on issuing."""
    settings = vault_settings(tmp_path, openbao, key_passphrase=None)
    ctx = build_context(settings, clock=clock)
    try:
        init_authority(ctx, AuthorityParams(TRUST_DOMAIN))
        init_gateway(ctx, GatewayParams(key_backend="file"))
    finally:
        close(ctx)
    passphrase = settings.data_dir / "key-passphrase"
    passphrase.write_bytes(b"")
    ctx = build_context(settings, clock=clock)
    try:
        with TestClient(create_app(ctx), raise_server_exceptions=False) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 503, ready.text
            # Named, not located: /readyz is anyone's to read (the CLI's line names the file).
            assert (
                ready.json()["detail"]["keys"]
                == "the key passphrase file holds no usable passphrase"
            )
            spiffe_id = f"spiffe://{TRUST_DOMAIN.name}/web"
            _token, secret = join_secret(ctx, add_entry(ctx, spiffe_id))
            csr = make_csr(new_key(KeyType.EC_P256), uris=[spiffe_id])
            issued = client.post("/v1/svid", json={"csr": csr.decode()}, headers=bearer(secret))
            assert issued.status_code == 200, issued.text
    finally:
        close(ctx)
    assert passphrase.read_bytes() == b""


def test_a_recorded_key_made_deletable_is_not_ready(
    vault_ctx: Context,
    openbao: OpenBao,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """deletion_allowed=true leaves a CA key one DELETE from destroyed (Trellis sets it only on
    keys no CA records): /readyz is 503 naming it, as for one made exportable, and so is
    ``trellis vault check``; the CA still signs."""
    monkeypatch.setattr(ca.readiness, "READY_FOR", 0.0)
    name = intermediate_key_name(vault_ctx)
    with TestClient(create_app(vault_ctx), raise_server_exceptions=False) as client:
        assert client.get("/readyz").status_code == 200
        openbao.api("POST", f"transit/keys/{name}/config", {"deletion_allowed": True})
        ready = client.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert ready.json()["detail"]["keys"] == (
            f"CA key {name}@v1 is deletion_allowed=true in Transit, which Trellis sets only on "
            "keys no CA records: one request can destroy it and the CA with it; set it back "
            f"(vault write transit/keys/{name}/config deletion_allowed=false) and find who set "
            "it (docs/vault.md)"
        )
    assert enrol(vault_ctx, f"spiffe://{TRUST_DOMAIN.name}/still-signs")
    code, checks = vault_check(vault_ctx, openbao, monkeypatch, capsys)
    assert code == 8 and checks["ca keys"]["ok"] is False, checks
    assert f"{name}@v1 is deletion_allowed=true" in checks["ca keys"]["detail"]


def vault_check(
    ctx: Context,
    openbao: OpenBao,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> tuple[int, dict[str, Any]]:
    """``trellis vault check --json`` of ``ctx``'s instance, with the root token: its exit
    status and its checks by name."""
    code, out, _ = run_check(
        monkeypatch,
        capsys,
        "--json",
        vault_addr=openbao.address,
        vault_token=openbao.root_token,
        data_dir=str(ctx.settings.data_dir),
        database_url=ctx.settings.effective_database_url,
    )
    return code, {c["name"]: c for c in json.loads(out)["checks"]}
