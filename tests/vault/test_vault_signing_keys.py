"""Every Vault key Trellis signs with is checked, by ``/readyz`` and by ``trellis vault check``
alike (docs/vault.md, "What lives where"): the roots' and intermediates' keys, and the keys of
their OCSP responders, whose id-pkix-ocsp-nocheck certificates let whoever holds the key answer
"good" for a revoked certificate until the responder expires."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from fastapi.testclient import TestClient
from sqlmodel import Session, select

import ca.readiness
from api.app import create_app
from ca.authority import active_issuer
from ca.config import Context
from ca.ocsp import respond
from ca.store.models import CaRow, OcspResponderRow
from tests.ca.svidkit import Workload, enrol
from tests.conftest import TRUST_DOMAIN
from tests.vault.openbao import OpenBao
from tests.vault.test_vault_key_integrity import (
    intermediate_key_name,
    replace_transit_key,
    vault_check,
)

EXPOSED = {"exportable": True, "allow_plaintext_backup": True, "deletion_allowed": True}


def ocsp_status(ctx: Context, workload: Workload) -> ocsp.OCSPResponseStatus:
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(workload.cert, active_issuer(ctx).certificate, hashes.SHA256())
        .build()
    )
    der = respond(ctx, request.public_bytes(serialization.Encoding.DER))
    return ocsp.load_der_ocsp_response(der).response_status


def responder_key_name(ctx: Context) -> str:
    """The intermediate's responder, made by the first OCSP request."""
    workload = enrol(ctx, f"spiffe://{TRUST_DOMAIN.name}/asks-ocsp")
    assert ocsp_status(ctx, workload) is ocsp.OCSPResponseStatus.SUCCESSFUL
    with Session(ctx.engine) as session:
        row = session.exec(select(OcspResponderRow)).one()
    return row.key_ref.split("@", 1)[0]


def root_key_name(ctx: Context) -> str:
    with Session(ctx.engine) as session:
        row = session.exec(select(CaRow).where(CaRow.role == "root")).one()
    return row.key_ref.split("@", 1)[0]


@pytest.mark.parametrize("which", ["root", "ocsp-responder"])
def test_an_exposed_root_or_responder_key_is_not_ready_and_fails_vault_check(
    vault_ctx: Context,
    openbao: OpenBao,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    which: str,
) -> None:
    """A key made exportable behind Trellis's back may have left Vault: whichever key it is,
    /readyz answers 503 naming it and ``trellis vault check`` fails (not "each ... not
    exportable"); signing goes on, so the CA can still be replaced."""
    monkeypatch.setattr(ca.readiness, "READY_FOR", 0.0)
    name = root_key_name(vault_ctx) if which == "root" else responder_key_name(vault_ctx)
    with TestClient(create_app(vault_ctx), raise_server_exceptions=False) as client:
        assert client.get("/readyz").status_code == 200
        openbao.api("POST", f"transit/keys/{name}/config", EXPOSED)
        ready = client.get("/readyz")
        assert ready.status_code == 503, ready.text
        detail = ready.json()["detail"]["keys"]
        assert f"{name}@v1 is exportable=true and allow_plaintext_backup=true" in detail
    code, checks = vault_check(vault_ctx, openbao, monkeypatch, capsys)
    assert code == 8 and checks["ca keys"]["ok"] is False, checks
    assert f"{name}@v1 is exportable=true" in checks["ca keys"]["detail"]
    workload = enrol(vault_ctx, f"spiffe://{TRUST_DOMAIN.name}/still-signs")
    assert ocsp_status(vault_ctx, workload) is ocsp.OCSPResponseStatus.SUCCESSFUL


def test_a_replaced_responder_key_is_not_ready_and_fails_vault_check(
    vault_ctx: Context,
    openbao: OpenBao,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Deleted and re-created under its name and type: every OCSP answer is tryLater, and both
    checks say why rather than "ok"."""
    monkeypatch.setattr(ca.readiness, "READY_FOR", 0.0)
    name = responder_key_name(vault_ctx)
    with TestClient(create_app(vault_ctx), raise_server_exceptions=False) as client:
        assert client.get("/readyz").status_code == 200
        replace_transit_key(openbao, name)
        workload = enrol(vault_ctx, f"spiffe://{TRUST_DOMAIN.name}/after")
        assert ocsp_status(vault_ctx, workload) is ocsp.OCSPResponseStatus.TRY_LATER
        ready = client.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert ready.json()["detail"]["keys"] == (
            f"CA key {name}@v1 is not the key of its CA certificate"
        )
    code, checks = vault_check(vault_ctx, openbao, monkeypatch, capsys)
    assert code == 8 and checks["ca keys"]["ok"] is False, checks
    assert checks["ca keys"]["detail"] == f"CA key {name}@v1 is not the key of its CA certificate"


def test_vault_check_fails_a_replaced_intermediate_key(
    vault_ctx: Context,
    openbao: OpenBao,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The same question /readyz asks: a key of the right name and type that is not the CA
    certificate's signs nothing, and ``trellis vault check`` (which every Vault error tells the
    operator to run) says so instead of "each present, pinned"."""
    _, checks = vault_check(vault_ctx, openbao, monkeypatch, capsys)  # a root token: 8
    assert checks["ca keys"]["ok"] and checks["ca keys"]["detail"] == (
        "2 recorded, each present, pinned, the key of its certificate, not exportable and not"
        " deletable"
    )
    name = intermediate_key_name(vault_ctx)
    replace_transit_key(openbao, name)
    code, checks = vault_check(vault_ctx, openbao, monkeypatch, capsys)
    assert code == 8 and checks["ca keys"]["ok"] is False, checks
    assert checks["ca keys"]["detail"] == f"CA key {name}@v1 is not the key of its CA certificate"
