"""The public reads that serve only certificates answer on a replica that cannot load the
issuing CA's key: one without the new intermediate's key file during the file backend's HA
window (docs/deploy.md), which answers 503 where it must sign (a stale CRL, an SVID) and is
not ready."""

from __future__ import annotations

from cryptography import x509
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from ca.config import Context
from ca.store.models import CaRow


def lose_the_issuing_key(ctx: Context) -> None:
    with Session(ctx.engine) as session:
        row = session.exec(
            select(CaRow).where(CaRow.role == "intermediate", CaRow.state == "active")
        ).one()
    (ctx.settings.data_dir / "keys" / f"{row.key_ref}.pem").unlink()
    ctx.cache.clear()  # the unlocked issuer, as a replica that never had the key


def test_the_bundle_is_served_without_the_issuing_key(ctx: Context, client: TestClient) -> None:
    """``GET /v1/bundle`` unlocked the issuing key to read the roots: 503 "CA key ... missing"
    while ``/v1/bundle.jwks`` and ``/v1/bundles`` answered 200 on the same replica."""
    before = client.get("/v1/bundle")
    lose_the_issuing_key(ctx)

    bundle = client.get("/v1/bundle")

    assert bundle.status_code == 200, bundle.text
    assert bundle.content == before.content
    assert bundle.headers["content-type"] == "application/x-pem-file"
    root = x509.load_der_x509_certificate(client.get("/v1/ca/mesh/root.crt").content)
    assert x509.load_pem_x509_certificates(bundle.content) == [root]
    for path in ("/v1/bundle.jwks", "/v1/bundles", "/v1/ca/mesh/intermediate.crt"):
        assert client.get(path).status_code == 200, path
    assert client.get("/readyz").status_code == 503  # what it cannot do is still reported
