"""``GET /v1/bundle.jwks``: the SPIFFE bundle that istiod's ``spiffeBundleUrl`` and federation
peers poll (SPIFFE Trust Domain and Bundle §4). Each key is checked against its certificate with
PyJWT's JWK parser, an implementation independent of ``ca.jwks``."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient
from jwt import PyJWK

from api.app import create_app
from ca.authority import MESH, AuthorityParams, init_authority
from ca.bundle import read_bundle
from ca.config import Context
from ca.keys import KeyType
from ca.root_rotation import rotate_root
from tests.conftest import TRUST_DOMAIN
from tests.istio.conftest import SQLITE_ONLY
from tests.istio.istiokit import Cli


@pytest.fixture
def client(ctx: Context) -> Iterator[TestClient]:
    with TestClient(create_app(ctx), raise_server_exceptions=False) as test_client:
        yield test_client


def public_der(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def etag_of(sequence: int, body: bytes) -> str:
    """The sequence for people, a digest of the served bytes for RFC 9110 §8.8.3."""
    return f'"{sequence}-{hashlib.sha256(body).hexdigest()[:16]}"'


def assert_is_spiffe_bundle(document: dict[str, Any], roots: list[x509.Certificate]) -> None:
    assert set(document) == {"keys", "spiffe_sequence", "spiffe_refresh_hint"}
    assert isinstance(document["spiffe_refresh_hint"], int) and document["spiffe_refresh_hint"] > 0
    certs = []
    for jwk in document["keys"]:
        assert jwk["use"] == "x509-svid"
        assert "kid" not in jwk  # X.509 authorities carry no kid (bundle spec §4.2.2)
        assert len(jwk["x5c"]) == 1
        cert = x509.load_der_x509_certificate(base64.b64decode(jwk["x5c"][0]))
        parsed = PyJWK({k: v for k, v in jwk.items() if k not in ("use", "x5c")})
        assert public_der(parsed.key) == public_der(cert.public_key())
        certs.append(cert)
    assert certs == roots


def test_bundle_jwks(ctx: Context, client: TestClient) -> None:
    response = client.get("/v1/bundle.jwks")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert "max-age" in response.headers["cache-control"]
    document = response.json()
    stored = read_bundle(ctx, MESH)
    assert_is_spiffe_bundle(document, x509.load_pem_x509_certificates(stored.pem))
    (jwk,) = document["keys"]
    assert (jwk["kty"], jwk["crv"]) == ("EC", "P-384")  # the default root
    assert document["spiffe_sequence"] == stored.sequence
    assert document["spiffe_refresh_hint"] == ctx.settings.bundle_refresh_hint
    etag = response.headers["etag"]
    assert etag == etag_of(stored.sequence, response.content)

    cached = client.get("/v1/bundle.jwks", headers={"If-None-Match": etag})
    assert cached.status_code == 304 and cached.content == b""
    assert cached.headers["etag"] == etag


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("if_none_match", "status"),
    [
        ('W/"{n}"', 304),  # weak comparison (RFC 9110 §13.1.2)
        ('"0", "{n}"', 304),  # a list
        ('"0",W/"{n}" ', 304),
        ("*", 304),  # any current representation
        ('"0"', 200),
        ('"{n}0"', 200),
        ("{n}", 200),  # not an entity tag: ignored
        ('"{n}" junk', 200),
    ],
)
def test_if_none_match(ctx: Context, client: TestClient, if_none_match: str, status: int) -> None:
    etag = client.get("/v1/bundle.jwks").headers["etag"]
    header = if_none_match.replace("{n}", etag.strip('"'))
    response = client.get("/v1/bundle.jwks", headers={"If-None-Match": header})
    assert response.status_code == status, header
    assert response.headers["etag"] == etag
    assert (response.content == b"") == (status == 304)


@SQLITE_ONLY
def test_head(ctx: Context, client: TestClient) -> None:
    """A cacheable resource answers HEAD like GET (the server sends no body)."""
    got = client.get("/v1/bundle.jwks")
    head = client.head("/v1/bundle.jwks")
    assert head.status_code == 200
    for name in ("etag", "cache-control", "content-type", "content-length"):
        assert head.headers[name] == got.headers[name]
    assert client.head("/v1/bundle.jwks", headers={"If-None-Match": "*"}).status_code == 304


ROTATION_DATABASES = [
    pytest.param("sqlite"),
    pytest.param("postgres", marks=[pytest.mark.postgres]),
]


@pytest.mark.parametrize("database_url", ROTATION_DATABASES, indirect=True)
def test_sequence_follows_a_root_rotation(ctx: Context, client: TestClient) -> None:
    """A new root is published: both are in the bundle, the sequence moves on, the ETag too."""
    before = client.get("/v1/bundle.jwks")
    sequence = before.json()["spiffe_sequence"]
    rotate_root(ctx)
    rotated = client.get("/v1/bundle.jwks", headers={"If-None-Match": before.headers["etag"]})
    assert rotated.status_code == 200
    document = rotated.json()
    assert document["spiffe_sequence"] == sequence + 1 == read_bundle(ctx, MESH).sequence
    assert rotated.headers["etag"] == etag_of(sequence + 1, rotated.content)
    assert_is_spiffe_bundle(document, x509.load_pem_x509_certificates(read_bundle(ctx, MESH).pem))
    assert len(document["keys"]) == 2


@SQLITE_ONLY
def test_a_new_ca_gets_a_new_etag_and_a_later_sequence(ctx: Context, client: TestClient) -> None:
    """``init --force`` replaces the CA: a client revalidating with the old tag must get the new
    roots, not 304, and the new bundle's sequence continues the old one (a SPIFFE federation
    peer refuses a sequence going backwards for the same trust domain)."""
    before = client.get("/v1/bundle.jwks")
    sequence = before.json()["spiffe_sequence"]
    init_authority(ctx, AuthorityParams(TRUST_DOMAIN, force=True))
    after = client.get("/v1/bundle.jwks", headers={"If-None-Match": before.headers["etag"]})
    assert after.status_code == 200
    assert after.json()["spiffe_sequence"] == sequence + 1 == read_bundle(ctx, MESH).sequence
    assert after.headers["etag"] == etag_of(sequence + 1, after.content) != before.headers["etag"]
    assert after.json()["keys"] != before.json()["keys"]


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("root_key", "params"),
    [(KeyType.RSA_2048, {"kty": "RSA"}), (KeyType.ED25519, {"kty": "OKP", "crv": "Ed25519"})],
    ids=lambda value: value.value if isinstance(value, KeyType) else None,
)
def test_other_root_key_types(bare_ctx: Context, root_key: KeyType, params: dict[str, str]) -> None:
    init_authority(bare_ctx, AuthorityParams(TRUST_DOMAIN, root_key_type=root_key))
    with TestClient(create_app(bare_ctx)) as client:
        document = client.get("/v1/bundle.jwks").json()
    assert_is_spiffe_bundle(
        document, x509.load_pem_x509_certificates(read_bundle(bare_ctx, MESH).pem)
    )
    (jwk,) = document["keys"]
    assert params.items() <= jwk.items()


@SQLITE_ONLY
def test_bundle_show_prints_the_same_document(client: TestClient, cli: Cli) -> None:
    served = client.get("/v1/bundle.jwks").json()
    assert json.loads(cli.ok("bundle", "show", "--format", "jwks")) == served
