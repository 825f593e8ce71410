"""Helpers for the REST API tests: CSR builders, the problem-document assertion, and a small
driver (``Rest``) for the multi-step flows (entry → join token → SVID → renewal).

The fixtures that build a ``Rest`` live in ``conftest.py``.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from api.app import create_app
from ca.clock import FixedClock
from ca.config import Context
from ca.csr import parse_csr
from ca.renewal import make_proof

PROBLEM = "application/problem+json"
PROBLEM_FIELDS = {"type", "title", "status", "detail"}

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(
    key: PrivateKey | None = None,
    *,
    uris: Sequence[str] = (),
    dns_names: Sequence[str] = (),
    basic_ca: bool = False,
    key_cert_sign: bool = False,
) -> tuple[PrivateKey, str]:
    """A PEM CSR signed by ``key`` (a fresh P-256 key by default) asking for the given names and,
    optionally, CA powers the profile must ignore."""
    key = key or new_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns_names]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if basic_ca:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
    if key_cert_sign:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    csr = builder.sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def tamper_signature(csr_pem: str) -> str:
    """The same CSR with the last byte of its signature flipped: still parses, never verifies."""
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    tampered = x509.load_der_x509_csr(bytes(der))
    assert tampered.signature != csr.signature
    return tampered.public_bytes(serialization.Encoding.PEM).decode()


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """An RFC 9457 problem with the given status; 401s also challenge for a bearer token."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM), response.headers
    body = response.json()
    assert isinstance(body, dict)
    assert body.keys() >= PROBLEM_FIELDS, body
    assert body["status"] == status
    assert body["type"].startswith("https://")
    assert body["title"] and body["detail"]
    if status == 401:
        assert response.headers["www-authenticate"].lower().startswith("bearer")
    return body


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def post_csr(
    client: TestClient, path: str, credential: str, csr_pem: str, **fields: Any
) -> httpx.Response:
    """POST /v1/svid or /v1/svid/renew with ``credential`` as the bearer."""
    response: httpx.Response = client.post(
        path, json={"csr": csr_pem, **fields}, headers=bearer(credential)
    )
    return response


@dataclass(frozen=True)
class Svid:
    """A workload's key and the SVID the API returned for it."""

    key: PrivateKey
    body: dict[str, Any]

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.body["certificate"].encode())

    @property
    def serial(self) -> str:
        return str(self.body["serial"])


@dataclass(frozen=True)
class Rest:
    """Admin-side shortcuts over the HTTP API; each asserts its own success."""

    client: TestClient
    admin: dict[str, str]
    clock: FixedClock

    def create_entry(self, spiffe_id: str = "spiffe://example.org/web", **fields: Any) -> str:
        response = self.client.post(
            "/v1/entries", json={"spiffe_id": spiffe_id, **fields}, headers=self.admin
        )
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def join_token(self, entry_id: str, **fields: Any) -> str:
        response = self.client.post(
            "/v1/tokens", json={"entry_id": entry_id, **fields}, headers=self.admin
        )
        assert response.status_code == 201, response.text
        return str(response.json()["token"])

    def request_svid(self, token: str, csr_pem: str, **fields: Any) -> httpx.Response:
        return post_csr(self.client, "/v1/svid", token, csr_pem, **fields)

    def enrol(self, spiffe_id: str = "spiffe://example.org/web", **fields: Any) -> Svid:
        """Entry, join token, SVID: the bootstrap every renewal test starts from."""
        token = self.join_token(self.create_entry(spiffe_id))
        key, csr_pem = make_csr()
        response = self.request_svid(token, csr_pem, **fields)
        assert response.status_code == 200, response.text
        return Svid(key, response.json())

    def renew(
        self, svid: Svid, csr_pem: str, proof: str | None = None, **fields: Any
    ) -> httpx.Response:
        if proof is None:
            proof = self.proof(svid, csr_pem)
        return post_csr(self.client, "/v1/svid/renew", proof, csr_pem, **fields)

    def proof(
        self,
        svid: Svid,
        csr_pem: str,
        key: PrivateKey | None = None,
        now: dt.datetime | None = None,
    ) -> str:
        return make_proof(
            svid.certificate,
            key or svid.key,
            parse_csr(csr_pem.encode()).sha256,
            now or self.clock.now(),
        )

    def certificates(self, **params: Any) -> list[dict[str, Any]]:
        response = self.client.get(
            "/v1/certificates", params={"limit": 1000, **params}, headers=self.admin
        )
        assert response.status_code == 200, response.text
        items = response.json()["items"]
        assert isinstance(items, list)
        return items

    def certificate_count(self) -> int:
        return len(self.certificates())

    def token(self, token_id: str) -> dict[str, Any]:
        response = self.client.get("/v1/tokens", headers=self.admin)
        assert response.status_code == 200, response.text
        (found,) = [t for t in response.json() if t["id"] == token_id]
        return dict(found)


def concurrently(
    ctx: Context, calls: Sequence[Callable[[TestClient], httpx.Response]]
) -> list[httpx.Response]:
    """Run each call on its own thread and client, released together by a barrier."""
    barrier = threading.Barrier(len(calls))
    responses: list[httpx.Response] = []

    def run(call: Callable[[TestClient], httpx.Response]) -> None:
        with TestClient(create_app(ctx), raise_server_exceptions=False) as client:
            barrier.wait(timeout=10)
            responses.append(call(client))

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(responses) == len(calls)
    return responses


def _walk(routes: Iterable[Any], prefix: str = "") -> Iterator[tuple[str, str, APIRoute]]:
    for route in routes:
        if isinstance(route, APIRoute):
            if route.include_in_schema:
                for method in sorted(route.methods or ()):
                    yield method, prefix + route.path_format, route
            continue
        # Included routers: flattened into APIRoutes or kept as router objects, by FastAPI version.
        nested = getattr(route, "original_router", None) or route
        if hasattr(nested, "routes"):
            context = getattr(route, "include_context", None)
            yield from _walk(nested.routes, prefix + getattr(context, "prefix", ""))
        else:
            assert not getattr(route, "include_in_schema", False), route


def schema_routes(client: TestClient) -> dict[tuple[str, str], APIRoute]:
    """(method, path) → route for every route the app serves and documents."""
    app = client.app
    assert isinstance(app, FastAPI)
    return {(method, path): route for method, path, route in _walk(app.routes)}


def dependency_calls(route: APIRoute) -> set[object]:
    """Every dependency callable the route runs, however deeply nested."""

    def calls(dependant: Dependant) -> Iterator[object]:
        for dependency in dependant.dependencies:
            yield dependency.call
            yield from calls(dependency)

    return set(calls(route.dependant))
