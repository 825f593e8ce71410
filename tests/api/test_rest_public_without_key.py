"""A replica that cannot load the issuing CA's key: one without the new intermediate's key file
after a rotation prepared on another replica with a key directory of its own (docs/deploy.md,
"Per-replica key directories split the CA"). The public reads that serve only certificates
answer; what must sign answers 503, and ``/readyz`` says where the docs tell what to do."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from ca.config import Context
from ca.store.models import CaRow

SECTION = "docs/deploy.md#per-replica-key-directories-split-the-ca"


def issuing_key_file(ctx: Context) -> Path:
    with Session(ctx.engine) as session:
        row = session.exec(
            select(CaRow).where(CaRow.role == "intermediate", CaRow.state == "active")
        ).one()
    return ctx.settings.data_dir / "keys" / f"{row.key_ref}.pem"


def test_the_bundle_is_served_without_the_issuing_key(ctx: Context, client: TestClient) -> None:
    """``GET /v1/bundle`` unlocked the issuing key to read the roots: 503 "CA key ... missing"
    while ``/v1/bundle.jwks`` and ``/v1/bundles`` answered 200 on the same replica."""
    before = client.get("/v1/bundle")
    issuing_key_file(ctx).unlink()
    ctx.cache.clear()  # the unlocked issuer, as on a replica that never had the key

    bundle = client.get("/v1/bundle")

    assert bundle.status_code == 200, bundle.text
    assert bundle.content == before.content
    assert bundle.headers["content-type"] == "application/x-pem-file"
    root = x509.load_der_x509_certificate(client.get("/v1/ca/mesh/root.crt").content)
    assert x509.load_pem_x509_certificates(bundle.content) == [root]
    for path in ("/v1/bundle.jwks", "/v1/bundles", "/v1/ca/mesh/intermediate.crt"):
        assert client.get(path).status_code == 200, path


def test_readyz_on_a_replica_without_the_key_points_at_the_docs(
    ctx: Context, client: TestClient
) -> None:
    """It said only "CA key ... is missing from the file key store"; the likely cause (a key
    directory per replica) and what to do were in no message. The copied file is used from the
    next probe on."""
    key = issuing_key_file(ctx)
    kept = key.read_bytes()
    key.unlink()
    ctx.cache.clear()

    ready = client.get("/readyz")

    assert ready.status_code == 503
    keys = ready.json()["detail"]["keys"]
    assert keys.startswith("CA key ") and "is missing from the file key store" in keys, keys
    assert SECTION in keys, keys
    key.write_bytes(kept)
    key.chmod(0o600)
    assert client.get("/readyz").status_code == 200
