"""GET /openapi.json describes the API the app really serves: every route, the bearer scheme on
every credentialed operation, and every error status an operation can answer."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api import deps
from api.app import create_app
from api.reference import ASSETS
from ca.config import Context
from tests.api.restkit import assert_problem, dependency_calls, schema_routes

# Error statuses the operations under test really answer; each is provoked by a test of this
# package. Operations added later are covered by the generic checks, not by this table.
ERRORS: dict[tuple[str, str], set[int]] = {
    ("POST", "/v1/svid"): {400, 401, 403, 413},
    ("POST", "/v1/svid/renew"): {400, 401, 403, 413},
    ("GET", "/v1/entries"): {401, 403},
    ("POST", "/v1/entries"): {400, 401, 403, 409, 413},
    ("GET", "/v1/entries/{entry_id}"): {401, 403, 404},
    ("DELETE", "/v1/entries/{entry_id}"): {401, 403, 404},
    ("GET", "/v1/tokens"): {401, 403},
    ("POST", "/v1/tokens"): {400, 401, 403, 404, 413},
    ("POST", "/v1/tokens/{token_id}/revoke"): {401, 403, 404},
    ("GET", "/v1/certificates"): {400, 401, 403},
    ("GET", "/v1/certificates/{serial}"): {400, 401, 403, 404},
    ("POST", "/v1/certificates/{serial}/revoke"): {400, 401, 403, 404, 409, 413},
    ("POST", "/v1/authorities/{authority}/rotate"): {400, 401, 403, 404, 409},
    ("GET", "/v1/ca/{authority}/{ca}.crt"): {400, 404},
    ("GET", "/v1/crl/{authority}/{ca}.crl"): {400, 404, 503},
    ("GET", "/v1/crl/{authority}/{ca}.pem"): {400, 404, 503},
    ("GET", "/v1/ocsp/{encoded}"): {404},
    ("POST", "/v1/openvpn/clients"): {400, 401, 403, 404, 409},
    ("GET", "/v1/openvpn/crl.pem"): {400, 404},
    ("GET", "/v1/bundle"): {503},
    ("GET", "/healthz"): set(),
    ("GET", "/readyz"): {503},
}
PUBLIC = {
    ("GET", "/v1/bundle"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/v1/ca/{authority}/{ca}.crt"),
    ("GET", "/v1/crl/{authority}/{ca}.crl"),
    ("GET", "/v1/crl/{authority}/{ca}.pem"),
    ("GET", "/v1/ocsp/{encoded}"),
    ("GET", "/v1/openvpn/crl.pem"),
}


def _operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): operation
        for path, item in spec["paths"].items()
        for method, operation in item.items()
    }


@pytest.fixture
def spec(client: TestClient) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body, dict)
    return body


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_documented_api_reference_pages_are_served(client: TestClient, page: str) -> None:
    """docs/api.md names both, each rendering ``/openapi.json``."""
    response = client.get(page)
    assert response.status_code == 200 and "/openapi.json" in response.text


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_reference_pages_load_pinned_scripts_with_integrity(
    client: TestClient, page: str
) -> None:
    """/docs, where an admin pastes the admin token, loaded swagger-ui-dist@5 (a floating major
    version) from a CDN with no integrity hash: whatever the CDN served ran beside the token.
    Every script and stylesheet from elsewhere is now an exact version with its SHA-384, and
    nothing else is fetched from elsewhere (the icon came from fastapi.tiangolo.com)."""
    html = client.get(page).text
    assets = re.findall(r"<(?:script|link)\b[^>]*\b(?:src|href)=\"https?://[^>]*>", html)
    assert assets, html
    fetched = set(re.findall(r"https?://[^\"'\s)>]+", html))
    assert fetched <= set(ASSETS), fetched - set(ASSETS)
    for tag in assets:
        assert re.search(r"@\d+\.\d+\.\d+/", tag), tag
        assert re.search(r' integrity="sha384-[A-Za-z0-9+/]{64}" crossorigin="anonymous"', tag), tag
    assert "fonts.googleapis.com" not in html


def test_every_route_is_documented_and_nothing_else(
    client: TestClient, spec: dict[str, Any]
) -> None:
    served = schema_routes(client)
    assert set(served) == set(_operations(spec))
    assert set(ERRORS) <= set(served)  # the table above names only real operations


def test_credentialed_operations_declare_the_bearer_scheme(
    client: TestClient, spec: dict[str, Any]
) -> None:
    """Whether an operation takes a credential is read from its dependencies, not assumed."""
    schemes = spec["components"]["securitySchemes"]
    bearer_schemes = {
        name for name, s in schemes.items() if s["type"] == "http" and s["scheme"] == "bearer"
    }
    assert bearer_schemes
    operations = _operations(spec)
    admin_operations = set()
    for key, route in schema_routes(client).items():
        calls = dependency_calls(route)
        declared = {
            name for requirement in operations[key].get("security", []) for name in requirement
        }
        if deps.bearer in calls:
            assert declared and declared <= bearer_schemes, key
            responses = operations[key]["responses"]
            for status in ("401", "403"):
                assert "application/problem+json" in responses[status]["content"], (key, status)
        else:
            assert not declared, key
        if deps.admin in calls:
            admin_operations.add(key)
    assert PUBLIC.isdisjoint(admin_operations)
    assert set(ERRORS) - PUBLIC - {("POST", "/v1/svid"), ("POST", "/v1/svid/renew")} <= (
        admin_operations
    )


def test_every_error_status_an_operation_answers_is_documented(spec: dict[str, Any]) -> None:
    operations = _operations(spec)
    missing = {
        key: sorted(expected - {int(s) for s in operations[key]["responses"] if s[0] in "45"})
        for key, expected in ERRORS.items()
    }
    assert {key: statuses for key, statuses in missing.items() if statuses} == {}


def test_every_operation_documents_its_url_refusals(spec: dict[str, Any]) -> None:
    """Any path parameter can be 404 (also U+0000 in it: tests/api/test_rest_nul.py), and any
    query parameter 400 (U+0000, or a value its pattern refuses), for operations added later
    too."""
    missing = {}
    for key, operation in _operations(spec).items():
        places = {parameter["in"] for parameter in operation.get("parameters", [])}
        expected = ({"404"} if "path" in places else set()) | (
            {"400"} if "query" in places else set()
        )
        if expected - set(operation["responses"]):
            missing[key] = sorted(expected - set(operation["responses"]))
    assert missing == {}


def test_documented_errors_are_the_problems_actually_sent(spec: dict[str, Any]) -> None:
    """Every documented 4xx is a problem document; no 422 is documented (validation failures
    are answered as 400 problems)."""
    for key, operation in _operations(spec).items():
        assert "422" not in operation["responses"], key
        for status, response in operation["responses"].items():
            if status.startswith("4"):
                assert "application/problem+json" in response.get("content", {}), (key, status)


def test_uninitialised_authority_is_503(bare_ctx: Context) -> None:
    with TestClient(create_app(bare_ctx), raise_server_exceptions=False) as client:
        assert assert_problem(client.get("/v1/bundle"), 503)["code"] == "not-initialised"
        readyz = client.get("/readyz")
        assert readyz.status_code == 503
        assert readyz.json()["status"] == "unavailable"
        assert readyz.json()["detail"]["database"] == "ok"
        assert client.get("/healthz").status_code == 200
