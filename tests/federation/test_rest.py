"""``/v1/federation`` (admin) and ``/v1/bundles`` (public) over the in-process app."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from ca import audit
from ca.clock import FixedClock
from ca.config import Context
from ca.jwks import bundle_jwks
from ca.pem import certs_pem
from ca.tokens import create_admin_token
from tests.api.restkit import assert_problem, bearer
from tests.conftest import free_port
from tests.federation.fedkit import (
    MALFORMED_ADDS,
    Answer,
    BundleServer,
    Partner,
    malformed_ca,
    nested,
)

SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def client(ctx: Context) -> Iterator[TestClient]:
    with TestClient(create_app(ctx), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def admin(ctx: Context) -> dict[str, str]:
    return bearer(create_admin_token(ctx, "tests/federation")[1])


def body(partner: Partner, url: str, **changes: Any) -> dict[str, Any]:
    return {
        "trust_domain": "b.test",
        "url": url,
        "profile": "https_spiffe",
        "endpoint_spiffe_id": "spiffe://b.test/trellis/server",
        "bootstrap_bundle": certs_pem(partner.roots).decode(),
        **changes,
    }


def test_federation_over_rest(
    client: TestClient, admin: dict[str, str], partner: Partner, ctx: Context
) -> None:
    tls = partner.server_tls()
    server = BundleServer(tls.cert_path, tls.key_path)
    server.answer = Answer(body=partner.jwks(4))
    try:
        created = client.post("/v1/federation", json=body(partner, server.url), headers=admin)
        assert created.status_code == 201, created.text
        assert created.json()["has_bundle"] is False
        assert created.json()["endpoint_spiffe_id"] == "spiffe://b.test/trellis/server"
        assert list(client.get("/v1/bundles").json()) == ["spiffe://example.org"]

        refreshed = client.post("/v1/federation/b.test/refresh", headers=admin)
        assert refreshed.status_code == 200, refreshed.text
        assert refreshed.json()["sequence"] == 4 and refreshed.json()["last_error"] is None
        (change,) = audit.list_audit(ctx, event="federation.roots-changed")
        assert change.actor.startswith("admin-token:") and change.request_id

        server.answer = Answer(body=b"garbage")
        failed = assert_problem(client.post("/v1/federation/b.test/refresh", headers=admin), 503)
        assert "the last good bundle is kept" in failed["detail"]
        shown = client.get("/v1/federation/b.test", headers=admin).json()
        assert shown["sequence"] == 4 and "not JSON" in shown["last_error"]
        assert [f["trust_domain"] for f in client.get("/v1/federation", headers=admin).json()] == [
            "b.test"
        ]

        bundles = client.get("/v1/bundles")  # no credential: like /v1/bundle
        assert bundles.status_code == 200
        assert bundles.headers["content-type"] == "application/json"
        assert "max-age" in bundles.headers["cache-control"]
        assert bundles.json()["spiffe://b.test"]["spiffe_sequence"] == 4

        removed = client.delete("/v1/federation/b.test", headers=admin)
        assert removed.status_code == 200 and removed.json()["trust_domain"] == "b.test"
        assert_problem(client.delete("/v1/federation/b.test", headers=admin), 404)
        assert list(client.get("/v1/bundles").json()) == ["spiffe://example.org"]
    finally:
        server.close()


@SQLITE_ONLY
def test_errors(client: TestClient, admin: dict[str, str], partner: Partner) -> None:
    url = f"https://127.0.0.1:{free_port()}/bundle"
    for path in ("/v1/federation", "/v1/federation/b.test"):
        assert_problem(client.get(path), 401)
    assert_problem(client.post("/v1/federation", json=body(partner, url)), 401)
    cases = {
        "own trust domain": {"trust_domain": "example.org", "url": url, "profile": "https_web"},
        "unknown endpoint profile": body(partner, url, profile="https"),
        "must be https://": body(partner, "http://127.0.0.1/bundle"),
        "extra": body(partner, url, surprise=1),
        "invalid SPIFFE ID": body(partner, url, endpoint_spiffe_id="spiffe://b.test/a/"),
        # ca's reasons, which named the CLI's flags (--endpoint-spiffe-id) to REST callers too
        "https_spiffe needs an endpoint SPIFFE ID and a bootstrap bundle": body(
            partner, url, bootstrap_bundle=None
        ),
        "an endpoint SPIFFE ID and a bootstrap bundle are for https_spiffe only": body(
            partner, url, profile="https_web"
        ),
        "a CA for the endpoint's TLS is for https_web only": body(
            partner, url, ca_pem="-----BEGIN CERTIFICATE-----"
        ),
    }
    for reason, document in cases.items():
        problem = assert_problem(client.post("/v1/federation", json=document, headers=admin), 400)
        assert reason in problem["detail"] or reason == "extra", (reason, problem)
        assert " --" not in problem["detail"], problem
    assert client.post("/v1/federation", json=body(partner, url), headers=admin).status_code == 201
    assert_problem(client.post("/v1/federation", json=body(partner, url), headers=admin), 409)
    assert_problem(client.get("/v1/federation/c.test", headers=admin), 404)
    assert_problem(client.post("/v1/federation/c.test/refresh", headers=admin), 404)
    assert_problem(client.get("/v1/federation/Not_A..TD!", headers=admin), 400)
    failed = assert_problem(client.post("/v1/federation/b.test/refresh", headers=admin), 503)
    assert "cannot fetch" in failed["detail"]


def bootstrap_of(partner: Partner, kind: str | None) -> str:
    if kind == "nested":
        return nested(20000).decode()
    return certs_pem([malformed_ca(kind)] if kind else partner.roots).decode()


@SQLITE_ONLY
@MALFORMED_ADDS
def test_malformed_url_or_bootstrap_is_400(
    client: TestClient,
    admin: dict[str, str],
    partner: Partner,
    url: str,
    bootstrap: str | None,
    reason: str,
) -> None:
    document = body(partner, url, bootstrap_bundle=bootstrap_of(partner, bootstrap))
    problem = assert_problem(client.post("/v1/federation", json=document, headers=admin), 400)
    assert reason in problem["detail"]
    assert client.get("/v1/federation", headers=admin).json() == []


@SQLITE_ONLY
@pytest.mark.parametrize(
    "hostile",
    [
        lambda p: nested(100_000),
        lambda p: json.dumps(bundle_jwks([malformed_ca("bad-san")], 2, 300)).encode(),
        lambda p: p.jwks(2**63),
    ],
    ids=["fail/nested", "fail/bad-san", "fail/sequence-2^63"],
)
def test_a_hostile_bundle_is_a_503_and_recorded(
    client: TestClient,
    admin: dict[str, str],
    partner: Partner,
    hostile: Callable[[Partner], bytes],
) -> None:
    tls = partner.server_tls()
    server = BundleServer(tls.cert_path, tls.key_path)
    server.answer = Answer(body=hostile(partner))
    try:
        created = client.post("/v1/federation", json=body(partner, server.url), headers=admin)
        assert created.status_code == 201, created.text
        failed = assert_problem(client.post("/v1/federation/b.test/refresh", headers=admin), 503)
        shown = client.get("/v1/federation/b.test", headers=admin).json()
        assert shown["last_error"].startswith("invalid SPIFFE bundle: ")
        assert shown["last_error"] in failed["detail"] and shown["last_attempt"]
        assert shown["next_refresh"] > shown["last_attempt"]
    finally:
        server.close()


@pytest.mark.parametrize("readded", [False, True], ids=["removed", "replaced"])
def test_a_relationship_removed_during_its_refresh_is_404_or_409(
    client: TestClient, admin: dict[str, str], partner: Partner, clock: FixedClock, readded: bool
) -> None:
    """Removed while its bundle was in flight: the refresh was 503, "refreshing b.test failed",
    though nothing failed; the CLI skips such a relationship. Now 404, as for a trust domain
    that is not federated, and nothing is recorded; one removed and added again (the way to
    change a relationship) is 409: the result was dropped, the new one fetches its own."""
    tls = partner.server_tls()
    server = BundleServer(tls.cert_path, tls.key_path)
    in_flight = threading.Event()
    server.answer = Answer(body=partner.jwks(4), hold=in_flight)
    document = body(partner, server.url)

    def remove_while_in_flight() -> None:
        deadline = time.monotonic() + 30
        while server.requests == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.delete("/v1/federation/b.test", headers=admin).status_code == 200
        if readded:
            clock.advance(dt.timedelta(seconds=1))  # a relationship is told apart by its time
            assert client.post("/v1/federation", json=document, headers=admin).status_code == 201
        in_flight.set()

    remover = threading.Thread(target=remove_while_in_flight)
    try:
        assert client.post("/v1/federation", json=document, headers=admin).status_code == 201
        remover.start()
        refreshed = client.post("/v1/federation/b.test/refresh", headers=admin)
        remover.join()
        if readded:
            problem = assert_problem(refreshed, 409)
            assert "replaced during its refresh" in problem["detail"], problem
            shown = client.get("/v1/federation/b.test", headers=admin).json()
            assert (shown["has_bundle"], shown["last_attempt"], shown["last_error"]) == (
                False,
                None,
                None,
            )
        else:
            problem = assert_problem(refreshed, 404)
            assert problem["detail"] == (
                "trust domain b.test is not federated: the relationship was removed during its"
                " refresh"
            )
            assert_problem(client.get("/v1/federation/b.test", headers=admin), 404)
    finally:
        in_flight.set()
        remover.join()
        server.close()


@SQLITE_ONLY
def test_openapi_documents_the_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    bundles = paths["/v1/bundles"]["get"]
    assert "security" not in bundles and {"200", "503"} <= set(bundles["responses"])
    for path, method, statuses in [
        ("/v1/federation", "post", {"400", "401", "403", "409", "413", "503"}),
        ("/v1/federation", "get", {"401", "403"}),
        ("/v1/federation/{trust_domain}", "get", {"401", "403", "404"}),
        ("/v1/federation/{trust_domain}", "delete", {"401", "403", "404"}),
        ("/v1/federation/{trust_domain}/refresh", "post", {"401", "403", "404", "409", "503"}),
    ]:
        operation = paths[path][method]
        assert operation["security"], (path, method)
        assert statuses <= set(operation["responses"]), (path, method)
        for status in statuses:
            content = operation["responses"][status]["content"]
            assert "application/problem+json" in content, (path, method, status)
