"""POST /v1/svid and /v1/svid/renew are served by plain Starlette routes in front of the FastAPI
operations that document them (``api.routes.svid``). Both are sent the same requests, good and
bad, and must answer alike: status, problem code and detail, headers that matter, and the
shape of a success. Both databases."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.app import TrellisApi, create_app
from api.limits import MAX_BODY
from ca.config import Context
from tests.api.restkit import Rest, make_csr
from tests.ca.svidkit import SQLITE_ONLY

Send = Callable[[TestClient], httpx.Response]


@pytest.fixture
def reference(ctx: Context) -> Iterator[TestClient]:
    """The same application without the plain routes: FastAPI serves the operations."""
    app = create_app(ctx, plain_svid_routes=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def _post(path: str, body: bytes | None, headers: dict[str, str] | list[tuple[str, str]]) -> Send:
    return lambda client: client.post(path, content=body, headers=headers)


def _comparable(response: httpx.Response) -> dict[str, Any]:
    seen: dict[str, Any] = {
        "status": response.status_code,
        "content-type": response.headers.get("content-type"),
        "www-authenticate": response.headers.get("www-authenticate"),
        "allow": response.headers.get("allow"),
    }
    document = response.json()
    if response.status_code == 200:
        seen["fields"] = sorted(document)
        seen["spiffe_id"] = document["spiffe_id"]
    else:
        seen["problem"] = {k: v for k, v in document.items() if k != "request_id"}
    return seen


def _requests(rest: Rest, token: str) -> dict[str, Send]:
    _key, csr = make_csr()
    good = json.dumps({"csr": csr}).encode()
    as_json = {"Content-Type": "application/json"}
    auth = {"Authorization": f"Bearer {token}"}
    both = auth | as_json
    cases: dict[str, Send] = {
        "ok": _post("/v1/svid", good, both),
        "ok/lower-case-scheme": _post(
            "/v1/svid", good, {"Authorization": f"bearer {token}"} | as_json
        ),
        "ok/charset": _post(
            "/v1/svid", good, auth | {"Content-Type": "application/json; charset=utf-8"}
        ),
        "ok/+json": _post(
            "/v1/svid", good, auth | {"Content-Type": "application/merge-patch+json"}
        ),
        "ok/ttl": _post("/v1/svid", json.dumps({"csr": csr, "ttl": "10m"}).encode(), both),
        "auth/none": _post("/v1/svid", good, as_json),
        "auth/basic": _post("/v1/svid", good, {"Authorization": f"Basic {token}"} | as_json),
        "auth/empty": _post("/v1/svid", good, {"Authorization": "Bearer "} | as_json),
        "auth/scheme-only": _post("/v1/svid", good, {"Authorization": "Bearer"} | as_json),
        "auth/unknown-token": _post("/v1/svid", good, {"Authorization": "Bearer nope"} | as_json),
        "auth/twice": _post(
            "/v1/svid",
            good,
            [
                ("Authorization", f"Bearer {token}"),
                ("Authorization", "Bearer nope"),
                *as_json.items(),
            ],
        ),
        "auth/twice-before-no-body": _post(
            "/v1/svid", b"", [("Authorization", f"Bearer {token}"), ("Authorization", "Bearer x")]
        ),
        "body/syntax": _post("/v1/svid", b'{"csr": ', both),
        "body/syntax-before-auth": _post("/v1/svid", b'{"csr": ', as_json),
        "body/fields-after-auth": _post("/v1/svid", b'{"ttl": "1h"}', as_json),
        "body/empty": _post("/v1/svid", b"", both),
        "body/no-content-type": _post("/v1/svid", good, auth),
        "body/text-plain": _post("/v1/svid", good, auth | {"Content-Type": "text/plain"}),
        "body/list": _post("/v1/svid", json.dumps([csr]).encode(), both),
        "body/missing-csr": _post("/v1/svid", b'{"ttl": "1h"}', both),
        "body/unknown-field": _post("/v1/svid", json.dumps({"csr": csr, "x": 1}).encode(), both),
        "body/csr-not-string": _post("/v1/svid", b'{"csr": 42}', both),
        "body/csr-too-long": _post("/v1/svid", json.dumps({"csr": "A" * 60_001}).encode(), both),
        "body/csr-garbage": _post("/v1/svid", b'{"csr": "not a CSR"}', both),
        "body/ttl-bad": _post("/v1/svid", json.dumps({"csr": csr, "ttl": "soon"}).encode(), both),
        "body/ttl-over-max": _post(
            "/v1/svid", json.dumps({"csr": csr, "ttl": "999h"}).encode(), both
        ),
        "method/get": lambda client: client.get("/v1/svid", headers=auth),
        "renew/no-auth": _post("/v1/svid/renew", good, as_json),
        "renew/garbage-proof": _post(
            "/v1/svid/renew", good, {"Authorization": "Bearer x.y.z"} | as_json
        ),
        "renew/empty-body": _post(
            "/v1/svid/renew", b"", {"Authorization": "Bearer x.y.z"} | as_json
        ),
    }
    # Bodies whose fields are bad, with a credential that fails and with one that passes.
    bad_fields = {
        "csr-not-string": b'{"csr": 42}',
        "ttl-not-string": json.dumps({"csr": csr, "ttl": 5}).encode(),
        "unknown-field": json.dumps({"csr": csr, "x": 1}).encode(),
        "missing-csr": b'{"ttl": "1h"}',
        "list": json.dumps([csr]).encode(),
        "text-plain": good,
    }
    for name, body in bad_fields.items():
        content = {"Content-Type": "text/plain"} if name == "text-plain" else as_json
        for path in ("/v1/svid", "/v1/svid/renew"):
            for credential in ("nope", "x.y.z", token):
                headers = {"Authorization": f"Bearer {credential}"} | content
                cases[f"fields/{name}{path}/{credential[:4]}"] = _post(path, body, headers)
    return cases


def test_issuance_is_answered_before_the_fastapi_middleware_stack(
    rest: Rest, client: TestClient
) -> None:
    """The plain handlers bring their own request id, body limit and problem responses."""
    token = rest.join_token(rest.create_entry("spiffe://example.org/hot"), uses=10)
    app = client.app
    assert isinstance(app, TrellisApi)
    assert set(app.hot) == {("POST", "/v1/svid"), ("POST", "/v1/svid/renew")}

    async def unreachable(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError(f"{scope['method']} {scope['path']} went through the stack")

    app.middleware_stack = unreachable  # type: ignore[assignment]
    _key, csr = make_csr()
    headers = {"Authorization": f"Bearer {token}", "X-Request-ID": "hot-1"}
    issued = client.post("/v1/svid", json={"csr": csr}, headers=headers)
    assert issued.status_code == 200, issued.text
    assert issued.headers["x-request-id"] == "hot-1"
    assert issued.json()["spiffe_id"] == "spiffe://example.org/hot"
    too_big = client.post("/v1/svid", content=b"x" * (MAX_BODY + 1), headers=headers)
    assert (too_big.status_code, too_big.json()["code"]) == (413, "payload-too-large")
    refused = client.post("/v1/svid", json={"csr": csr}, headers={"X-Request-ID": "hot-2"})
    assert refused.status_code == 401
    assert refused.json()["request_id"] == "hot-2"
    assert refused.headers["content-type"] == "application/problem+json"


def test_plain_and_fastapi_routes_answer_alike(
    rest: Rest, client: TestClient, reference: TestClient, ctx: Context
) -> None:
    token = rest.join_token(rest.create_entry("spiffe://example.org/same"), uses=100)
    for case, send in _requests(rest, token).items():
        plain, fastapi = send(client), send(reference)
        assert _comparable(plain) == _comparable(fastapi), case
        if case.startswith("ok"):
            assert plain.status_code == 200, (case, plain.text)
        elif not case.startswith("method"):
            assert plain.status_code in (400, 401), (case, plain.text)
    # Every issuance declared under way ended, refused or not: none is waited for any more
    # (``ca.issue.under_way``).
    assert not ctx.writes._coming


def test_renewal_answers_alike(rest: Rest, client: TestClient, reference: TestClient) -> None:
    enrolled = rest.enrol("spiffe://example.org/renewing")
    answers = []
    for app in (client, reference):
        _key, csr = make_csr()
        proof = rest.proof(enrolled, csr)
        first = app.post(
            "/v1/svid/renew", json={"csr": csr}, headers={"Authorization": f"Bearer {proof}"}
        )
        replayed = app.post(
            "/v1/svid/renew", json={"csr": csr}, headers={"Authorization": f"Bearer {proof}"}
        )
        answers.append((_comparable(first), _comparable(replayed)))
    assert answers[0] == answers[1]
    (ok, refused) = answers[0]
    assert (ok["status"], refused["status"]) == (200, 401)


def test_the_credential_is_judged_before_the_body_fields(
    client: TestClient, reference: TestClient
) -> None:
    """Regression: a bad ``ttl`` was parsed before the credential, so an unauthenticated caller
    got 400 invalid-input for its body instead of 401, on the plain routes and the FastAPI
    operations alike."""
    body = {"csr": "x", "ttl": "bogus"}
    for app in (client, reference):
        for path in ("/v1/svid", "/v1/svid/renew"):
            response = app.post(path, json=body, headers={"Authorization": "Bearer bogus"})
            assert response.status_code == 401, (path, response.text)
            assert response.headers["www-authenticate"].lower().startswith("bearer")


def _unauthenticated(client: TestClient) -> float:
    wanted = {"authority": "mesh", "profile": "x509-svid", "result": "unauthenticated"}
    exposition = text_string_to_metric_families(client.get("/metrics").text)
    return sum(
        sample.value
        for family in exposition
        for sample in family.samples
        if sample.name == "trellis_certificates_issued_total" and sample.labels == wanted
    )


@pytest.mark.parametrize(
    "body",
    [
        {"csr": "x", "ttl": 5},
        {"csr": 5},
        {"csr": ["x"]},
        {"csr": "x", "unknown": 1},
        {"ttl": "1h"},
        ["x"],
        "x",
    ],
    ids=["ttl-number", "csr-number", "csr-list", "unknown-field", "no-csr", "list", "string"],
)
def test_a_bad_credential_is_401_whatever_the_body_fields(
    client: TestClient, reference: TestClient, body: Any
) -> None:
    """Regression: the body's fields were checked against the schema before the credential, so
    a bad one with a body whose fields have the wrong type, are missing or unknown was 400
    invalid-request (telling the caller about its body) and not counted as unauthenticated.
    A join token needs nothing from the body; a renewal proof binds a CSR, and a ``csr`` that is
    not a string is one that does not decode (``ca.grants``)."""
    before = _unauthenticated(client)
    for app in (client, reference):
        for path, credential in (("/v1/svid", "bogus"), ("/v1/svid/renew", "x.y.z")):
            response = app.post(
                path,
                content=json.dumps(body),
                headers={
                    "Authorization": f"Bearer {credential}",
                    "Content-Type": "application/json",
                },
            )
            assert response.status_code == 401, (path, response.text)
            assert response.json()["code"] == "unauthenticated"
    assert _unauthenticated(client) == before + 4


def _issued(client: TestClient) -> float:
    exposition = text_string_to_metric_families(client.get("/metrics").text)
    return sum(
        sample.value
        for family in exposition
        for sample in family.samples
        if sample.name == "trellis_certificates_issued_total"
    )


@SQLITE_ONLY
@pytest.mark.parametrize(
    "body",
    [{"ttl": "1h"}, {"csr": 42}, None, [1]],
    ids=["no-csr", "csr-a-number", "null", "a-list"],
)
def test_a_renewal_whose_body_is_no_request_is_refused_as_such(
    rest: Rest, client: TestClient, reference: TestClient, body: Any
) -> None:
    """Regression: with a proof that verifies, a body that is no request was 400 invalid-csr
    and counted as one, where /v1/svid answers 400 invalid-request and counts nothing (a body
    with no string csr was taken for a CSR that does not decode). The proof stays unused."""
    enrolled = rest.enrol("spiffe://example.org/no-request")
    _key, csr = make_csr()
    proof = rest.proof(enrolled, csr)
    for app in (client, reference):
        before = _issued(client)
        response = app.post(
            "/v1/svid/renew",
            content=json.dumps(body),
            headers={"Authorization": f"Bearer {proof}", "Content-Type": "application/json"},
        )
        assert response.status_code == 400, response.text
        assert response.json()["code"] == "invalid-request", response.text
        assert _issued(client) == before
    renewed = client.post(
        "/v1/svid/renew", json={"csr": csr}, headers={"Authorization": f"Bearer {proof}"}
    )
    assert renewed.status_code == 200, renewed.text
