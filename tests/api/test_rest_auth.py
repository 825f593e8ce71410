"""Who may call what: admin endpoints need an admin token, /v1/svid a join token, public ones
nothing. Refusals are problems; 401s carry ``WWW-Authenticate: Bearer``."""

from __future__ import annotations

import re
from typing import Any

import pytest

from api import deps
from tests.api.restkit import (
    Rest,
    assert_problem,
    bearer,
    dependency_calls,
    make_csr,
    schema_routes,
)

# (method, path, json body): every admin operation, with a body that would be valid.
ADMIN_OPERATIONS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/v1/entries", None),
    ("POST", "/v1/entries", {"spiffe_id": "spiffe://example.org/sneaky"}),
    ("GET", "/v1/entries/{entry}", None),
    ("DELETE", "/v1/entries/{entry}", None),
    ("GET", "/v1/tokens", None),
    ("POST", "/v1/tokens", {"admin": True}),
    ("POST", "/v1/tokens/{token}/revoke", None),
    ("GET", "/v1/certificates", None),
    ("GET", "/v1/certificates/{serial}", None),
    ("POST", "/v1/certificates/{serial}/revoke", {"reason": "keyCompromise"}),
]

BAD_CREDENTIALS: list[tuple[str, dict[str, str]]] = [
    ("missing", {}),
    ("empty-bearer", {"Authorization": "Bearer "}),
    ("basic-scheme", {"Authorization": "Basic YWRtaW46YWRtaW4="}),
    ("garbage", bearer("garbage")),
    ("wrong-admin-secret", bearer("trellis-admin-" + "A" * 43)),
    ("overlong", bearer("x" * 5000)),
]


@pytest.fixture
def world(rest: Rest) -> dict[str, str]:
    """One of each object, so path parameters name things that exist."""
    entry = rest.create_entry()
    join = rest.client.post("/v1/tokens", json={"entry_id": entry}, headers=rest.admin).json()
    svid = rest.request_svid(rest.join_token(entry), make_csr()[1]).json()
    return {"entry": entry, "token": join["id"], "join": join["token"], "serial": svid["serial"]}


def _call(
    rest: Rest, operation: tuple[str, str, dict[str, Any] | None], world: dict[str, str], **kw: Any
) -> Any:
    method, path, body = operation
    return rest.client.request(method, path.format(**world), json=body, **kw)


def _unchanged(rest: Rest, world: dict[str, str]) -> None:
    assert [e["id"] for e in rest.client.get("/v1/entries", headers=rest.admin).json()] == [
        world["entry"]
    ]
    (cert,) = rest.certificates()
    assert cert["status"] == "active"
    assert rest.token(world["token"])["revoked_at"] is None
    assert len(rest.client.get("/v1/tokens", headers=rest.admin).json()) == 3


def test_admin_operations_without_a_valid_credential_are_401(
    rest: Rest, world: dict[str, str]
) -> None:
    for operation in ADMIN_OPERATIONS:
        for case, headers in BAD_CREDENTIALS:
            response = _call(rest, operation, world, headers=headers)
            assert response.status_code == 401, (operation, case, response.text)
            body = assert_problem(response, 401)
            assert body["code"] == "unauthenticated"
            assert response.headers["www-authenticate"] == 'Bearer realm="trellis"'
    _unchanged(rest, world)


def test_every_admin_route_refuses_missing_and_join_credentials(
    rest: Rest, world: dict[str, str]
) -> None:
    """Derived from the app itself, so admin routes added later are covered too: whatever the
    path parameters and body, the credential is checked first."""
    routes = schema_routes(rest.client)
    admin_routes = {key for key, route in routes.items() if deps.admin in dependency_calls(route)}

    def shape(path: str) -> str:
        return re.sub(r"\{[^}]+\}", "{}", path)

    listed = {(method, shape(path)) for method, path, _body in ADMIN_OPERATIONS}
    assert listed <= {(method, shape(path)) for method, path in admin_routes}
    for method, path in sorted(admin_routes):
        url = shape(path).replace("{}", "x")
        for headers, status in (({}, 401), (bearer("garbage"), 401), (bearer(world["join"]), 403)):
            response = rest.client.request(method, url, headers=headers)
            assert response.status_code == status, (method, path, response.text)
            assert_problem(response, status)
    _unchanged(rest, world)


def test_every_admin_route_judges_the_credential_before_the_url_and_the_body(
    rest: Rest, world: dict[str, str]
) -> None:
    """Each query parameter the route reads given twice and holding NUL, and a body that is
    no JSON object: 401 without a valid credential, 403 with a join token (docs/api.md). The
    URL was judged first (an application dependency runs before a route's), so no credential
    with ``?limit=1&limit=2`` was 400."""
    routes = schema_routes(rest.client)
    admin_routes = {
        key: route for key, route in routes.items() if deps.admin in dependency_calls(route)
    }
    with_queries = 0
    for (method, path), route in sorted(admin_routes.items()):
        url = re.sub(r"\{[^}]+\}", "x", path)
        params = [(p.alias, value) for p in route.dependant.query_params for value in ("a\0", "b")]
        with_queries += bool(params)
        body = ["no", "object"] if route.body_field is not None else None
        for headers, status in (({}, 401), (bearer("garbage"), 401), (bearer(world["join"]), 403)):
            response = rest.client.request(method, url, params=params, json=body, headers=headers)
            assert response.status_code == status, (method, path, response.text)
            assert_problem(response, status)
    assert with_queries > 5
    # With a valid credential the same URL is refused for itself.
    problem = assert_problem(
        rest.client.get("/v1/certificates?limit=1&limit=2", headers=rest.admin), 400
    )
    assert "given 2 times" in problem["detail"]
    # Documented exception: a body declared JSON that does not parse, which FastAPI reads
    # before any dependency runs.
    response = rest.client.post(
        "/v1/entries", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert assert_problem(response, 400)["code"] == "invalid-request"
    _unchanged(rest, world)


def test_admin_operations_with_a_join_token_are_403(rest: Rest, world: dict[str, str]) -> None:
    for operation in ADMIN_OPERATIONS:
        response = _call(rest, operation, world, headers=bearer(world["join"]))
        assert response.status_code == 403, (operation, response.text)
        assert assert_problem(response, 403)["code"] == "forbidden"
        assert "www-authenticate" not in response.headers
    _unchanged(rest, world)
    # Being turned away from admin endpoints does not spend the join token.
    assert rest.token(world["token"])["uses_remaining"] == 1
    assert rest.request_svid(world["join"], make_csr()[1]).status_code == 200


def test_svid_needs_a_join_token(rest: Rest, admin_token: str) -> None:
    csr_pem = make_csr()[1]
    for path in ("/v1/svid", "/v1/svid/renew"):
        for case, headers in BAD_CREDENTIALS:
            response = rest.client.post(path, json={"csr": csr_pem}, headers=headers)
            assert response.status_code == 401, (path, case, response.text)
            assert_problem(response, 401)
    # An admin token is a valid credential, but not one that SVIDs are issued for.
    refused = rest.request_svid(admin_token, csr_pem)
    assert assert_problem(refused, 403)["code"] == "forbidden"
    assert rest.certificate_count() == 0


def test_public_endpoints_need_no_credential(rest: Rest) -> None:
    bundle = rest.client.get("/v1/bundle")
    assert bundle.status_code == 200
    assert bundle.headers["content-type"].startswith("application/x-pem-file")
    assert bundle.text.startswith("-----BEGIN CERTIFICATE-----")
    assert "PRIVATE KEY" not in bundle.text

    healthz = rest.client.get("/healthz")
    assert healthz.status_code == 200 and healthz.json()["status"] == "ok"

    readyz = rest.client.get("/readyz")
    assert readyz.status_code == 200, readyz.text
    assert readyz.json() == {
        "status": "ok",
        "detail": {"database": "ok", "schema": "ok", "keys": "ok", "ca": "ok", "jobs": "ok"},
    }

    # A bad credential on a public endpoint is ignored, not an error.
    assert rest.client.get("/v1/bundle", headers=bearer("garbage")).status_code == 200


def test_unknown_routes_and_methods_are_problems(rest: Rest) -> None:
    assert_problem(rest.client.get("/v1/nothing-here", headers=rest.admin), 404)
    response = rest.client.put("/v1/entries", headers=rest.admin, json={})
    assert_problem(response, 405)
    # RFC 9110 §15.5.6: a 405 names the methods the resource does allow.
    assert {m.strip() for m in response.headers["allow"].split(",")} >= {"GET", "POST"}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/entries/"),
        ("POST", "/v1/tokens/"),
        ("GET", "/v1/bundle/"),
        ("POST", "/v1/svid/"),  # beside the plain route, answered before FastAPI's stack
        ("POST", "/v1/svid/renew/"),
    ],
)
def test_a_trailing_slash_is_an_unknown_path_not_a_redirect(
    rest: Rest, method: str, path: str
) -> None:
    """Regression: Starlette answered a trailing slash, before any credential was read, with a
    307 whose Location it built from the Host header (``Host: evil.example`` →
    ``https://evil.example/v1/entries``). No Trellis path ends in one: 404, as any unknown path."""
    response = rest.client.request(
        method, path, headers={"Host": "evil.example"}, follow_redirects=False
    )
    problem = assert_problem(response, 404)
    assert problem["code"] == "not-found"
    assert "location" not in response.headers


def test_two_authorization_fields_are_refused_whatever_they_hold(
    rest: Rest, admin_token: str, world: dict[str, str]
) -> None:
    """Regression: only the first ``Authorization`` field was read, so a good admin token
    followed by junk was served (and one reading the last field, a proxy or a log, saw the
    junk). RFC 9110 §11.6.2 allows one credential: two are 400 and nothing is done, on the
    admin routes and on both ``/v1/svid`` routes (plain and FastAPI alike,
    tests/api/test_svid_plain_routes.py), where the join token keeps its use."""
    good, junk = f"Bearer {admin_token}", "Bearer junk"
    for pair in ((good, junk), (junk, good), (good, good)):
        headers = [("Authorization", value) for value in pair]
        for operation in ADMIN_OPERATIONS:
            response = _call(rest, operation, world, headers=headers)
            problem = assert_problem(response, 400)
            assert problem["detail"] == "2 Authorization header fields: send one (RFC 9110 §11.6.2)"
    _unchanged(rest, world)
    join = f"Bearer {world['join']}"
    twice = [("Authorization", join), ("Authorization", join)]
    uses = rest.token(world["token"])["uses_remaining"]
    for path in ("/v1/svid", "/v1/svid/renew"):
        response = rest.client.post(path, json={"csr": make_csr()[1]}, headers=twice)
        assert "Authorization header fields" in assert_problem(response, 400)["detail"]
    assert rest.token(world["token"])["uses_remaining"] == uses
    assert rest.certificate_count() == 1
    assert rest.client.get("/v1/entries", headers=rest.admin).status_code == 200
