"""A CA key that is missing from its store, or is not the key of its CA certificate, is the
server's damage: ``Unavailable`` (HTTP 503, exit 8), found when the key is loaded, before
anything is signed or recorded, and without this server's paths in what clients are shown."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cryptography.x509 import ocsp as x509_ocsp
from fastapi.testclient import TestClient
from sqlmodel import Session, select

import ca.readiness
from api.app import create_app
from ca import gateway
from ca.authority import active_issuer, check_keys
from ca.certs import CertStatus, get_certificate, revoke_certificate
from ca.config import Context
from ca.crl import current_crl
from ca.errors import Unavailable
from ca.keys import KeyType
from ca.revocation import RevocationReason
from ca.serial import Serial
from ca.store.models import CaRow
from tests.api.restkit import assert_problem, bearer
from tests.ca.svidkit import (
    SQLITE_ONLY,
    add_entry,
    count_rows,
    enrol,
    join_secret,
    make_csr,
    uses_remaining,
)
from tests.ca.svidkit import new_key as new_subject_key
from tests.ca.test_ocsp import request_der
from tests.cli.test_walkthrough import Trellis

pytestmark = SQLITE_ONLY
TD = "example.org"


def intermediate_key_file(ctx: Context, authority: str = "mesh") -> Path:
    with Session(ctx.engine) as session:
        row = session.exec(
            select(CaRow).where(
                CaRow.authority == authority, CaRow.role == "intermediate", CaRow.state == "active"
            )
        ).one()
    return ctx.settings.data_dir / "keys" / f"{row.key_ref}.pem"


def post_svid(ctx: Context, client: TestClient, label: str) -> tuple[str, dict[str, object]]:
    """A fresh workload's first request: (its join token id, the problem body), asserting 503."""
    spiffe_id = f"spiffe://{TD}/{label}"
    token_id, secret = join_secret(ctx, add_entry(ctx, spiffe_id))
    csr = make_csr(new_subject_key(KeyType.EC_P256), uris=[spiffe_id])
    response = client.post("/v1/svid", json={"csr": csr.decode()}, headers=bearer(secret))
    return token_id, assert_problem(response, 503)


def test_a_missing_key_file_is_unavailable_and_names_no_server_path(ctx: Context) -> None:
    workload = enrol(ctx, f"spiffe://{TD}/before")
    issuer = active_issuer(ctx)
    intermediate_key_file(ctx).unlink()
    ctx.cache.clear()  # a process started after the file went
    certificates = count_rows(ctx, "certificate")
    with TestClient(create_app(ctx), raise_server_exceptions=False) as client:
        token_id, body = post_svid(ctx, client, "after")
        ocsp = client.post(
            "/v1/ocsp",
            content=request_der(workload.cert, issuer.certificate),
            headers={"Content-Type": "application/ocsp-request"},
        )
    assert body["code"] == "unavailable"
    assert "is missing from the file key store" in str(body["detail"])
    assert str(ctx.settings.data_dir) not in str(body["detail"])
    assert count_rows(ctx, "certificate") == certificates
    # The join token is not spent: the workload retries with it once the key is back.
    assert uses_remaining(ctx, token_id) == 1
    # The responder cannot be made without the CA's key: an OCSP "tryLater", which says nothing
    # of this server's paths (RFC 6960 §2.3), not an HTTP problem.
    assert ocsp.status_code == 200
    assert ocsp.headers["content-type"] == "application/ocsp-response"
    answer = x509_ocsp.load_der_ocsp_response(ocsp.content)
    assert answer.response_status is x509_ocsp.OCSPResponseStatus.TRY_LATER
    assert str(ctx.settings.data_dir).encode() not in ocsp.content
    # trellis serve's start-up check: exit 8 (Unavailable), not 5 (NotFound).
    with pytest.raises(Unavailable, match="missing from the file key store"):
        check_keys(ctx)


def test_a_key_file_that_is_not_the_certificates_key_is_refused_before_signing(
    ctx: Context,
) -> None:
    workload = enrol(ctx, f"spiffe://{TD}/before")
    serial = Serial(workload.cert.serial_number)
    crl_before = current_crl(ctx, "mesh", "intermediate").der
    # Same type, same passphrase, another key: what a restore from another instance looks like.
    stranger = ctx.keys.create(KeyType.EC_P256, "stranger")
    shutil.copyfile(
        ctx.settings.data_dir / "keys" / f"{stranger.ref}.pem", intermediate_key_file(ctx)
    )
    ctx.cache.clear()

    with pytest.raises(Unavailable, match="not the key of its CA certificate"):
        revoke_certificate(ctx, serial, RevocationReason.KEY_COMPROMISE, "test")
    assert get_certificate(ctx, serial).status is CertStatus.ACTIVE
    assert current_crl(ctx, "mesh", "intermediate").der == crl_before  # nothing new published
    with pytest.raises(Unavailable, match="not the key of its CA certificate"):
        check_keys(ctx)
    certificates = count_rows(ctx, "certificate")
    with TestClient(create_app(ctx), raise_server_exceptions=False) as client:
        token_id, body = post_svid(ctx, client, "after")
        ready = client.get("/readyz")
    assert uses_remaining(ctx, token_id) == 1
    assert "not the key of its CA certificate" in str(body["detail"])
    assert count_rows(ctx, "certificate") == certificates
    assert ready.status_code == 503
    assert "not the key of its CA certificate" in ready.json()["detail"]["keys"]


def test_readiness_checks_every_issuing_key(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's intermediate key gone (replaced on another replica, say) while the mesh's is
    here: every gateway issuance would fail, so the replica is not ready."""
    gateway.init_gateway(ctx, gateway.GatewayParams())
    monkeypatch.setattr(ca.readiness, "READY_FOR", 0.0)
    with TestClient(create_app(ctx), raise_server_exceptions=False) as client:
        assert client.get("/readyz").status_code == 200
        intermediate_key_file(ctx, "gateway").unlink()
        ready = client.get("/readyz")
        assert ready.status_code == 503
        keys = ready.json()["detail"]["keys"]
        assert "is missing from the file key store" in keys
        assert str(ctx.settings.data_dir) not in keys
        assert ready.json()["detail"]["database"] == "ok"


def test_readiness_reuses_its_verdict_for_a_few_seconds(ctx: Context) -> None:
    with TestClient(create_app(ctx), raise_server_exceptions=False) as client:
        assert client.get("/readyz").status_code == 200
        intermediate_key_file(ctx).unlink()
        assert client.get("/readyz").status_code == 200  # polled: not a stat per probe
        ctx.cache.pop(("readiness", "issuing-keys"))
        assert client.get("/readyz").status_code == 503


def test_a_missing_key_is_one_line_on_the_cli(database_url: str, tmp_path: Path) -> None:
    """A CLI command logs nothing below WARNING, and its error line says what is missing: the
    path (which a server logs, at INFO, for its operators) was a second line before. A real
    process: under pytest the root logger has a handler, and nothing reaches stderr."""
    cli = Trellis(tmp_path / "var", database_url)
    cli.run("init", "--trust-domain", TD)
    (key,) = (tmp_path / "var" / "keys").glob("mesh-intermediate-*.pem")
    key.unlink()
    minted = cli.run(
        "svid", "mint", "--spiffe-id", f"spiffe://{TD}/a", "--out", str(tmp_path / "a"), ok=False
    )
    assert minted.returncode == 8
    assert minted.stderr.splitlines() == [
        f"trellis: CA key {key.stem} is missing from the file key store"
    ]
