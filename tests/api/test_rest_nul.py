"""U+0000 anywhere a caller can put text: PostgreSQL's text cannot hold it (the write or lookup
failed with a 500 and a traceback) while SQLite stored it. On both databases a body field
holding it is 400, a path holding it 404 (it names nothing), a query parameter 400, and
nothing is written."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

from api.schemas import RequestBody
from tests.api.restkit import Rest, assert_problem, schema_routes

NUL = "\x00"


NEW = "spiffe://example.org/new"

# (case, method, path, JSON body): one of each kind of field, in every area.
BODIES: list[tuple[str, str, str, dict[str, Any]]] = [
    ("token/admin-description", "POST", "/v1/tokens", {"admin": True, "description": "a\0b"}),
    ("token/join-description", "POST", "/v1/tokens", {"entry_id": "{entry}", "description": NUL}),
    ("token/entry-id", "POST", "/v1/tokens", {"entry_id": "{entry}\0"}),
    ("entry/dns-name", "POST", "/v1/entries", {"spiffe_id": NEW, "dns_names": ["a\0.org"]}),
    ("entry/ttl", "POST", "/v1/entries", {"spiffe_id": NEW, "ttl": "1h\0"}),
    ("revocations/reason", "POST", "/v1/revocations", {"spiffe_id": NEW, "reason": NUL}),
    (
        "federation/url",
        "POST",
        "/v1/federation",
        {"trust_domain": "partner.org", "url": "https://partner.org/\0", "profile": "https_web"},
    ),
    ("gateway/contact", "POST", "/v1/gateway/consumers", {"name": "acme", "contact": "a\0@b.c"}),
    (
        "gateway/pkcs12-password",
        "POST",
        "/v1/gateway/consumers/acme/certificates",
        {"pkcs12": {"password": "long enough pass\0word"}},
    ),
    ("openvpn/client-name", "POST", "/v1/openvpn/clients", {"name": "al\0ice"}),
    ("openvpn/remote", "PATCH", "/v1/openvpn", {"remote": "vpn.example.org\0"}),
]
# (case, method, path, status): a path parameter is 404, a query parameter 400.
URLS: list[tuple[str, str, str, int]] = [
    ("token/revoke", "POST", "/v1/tokens/a%00b/revoke", 404),
    ("entry/show", "GET", "/v1/entries/a%00b", 404),
    ("entry/disable", "POST", "/v1/entries/{entry}%00/disable", 404),
    ("certificate/show", "GET", "/v1/certificates/ab%00", 404),
    ("certificate/list", "GET", "/v1/certificates?spiffe_id=spiffe://example.org/a%00", 400),
    ("authority/status", "GET", "/v1/authorities/me%00sh", 404),
    ("federation/show", "GET", "/v1/federation/partner%00.org", 404),
    ("gateway/consumer", "GET", "/v1/gateway/consumers/ac%00me", 404),
    ("gateway/certificates", "GET", "/v1/gateway/certificates?consumer=ac%00me", 400),
    ("openvpn/client-revoke", "POST", "/v1/openvpn/clients/al%00ice/revoke", 404),
    ("openvpn/crl", "GET", "/v1/openvpn/crl.pem?authority=v%00pn", 400),
    ("crl", "GET", "/v1/crl/mesh/ro%00ot.crl", 404),
]


def test_nul_is_refused_everywhere_and_nothing_is_written(rest: Rest) -> None:
    entry = rest.create_entry("spiffe://example.org/web")
    tokens_before = rest.client.get("/v1/tokens", headers=rest.admin).json()
    entries_before = rest.client.get("/v1/entries", headers=rest.admin).json()
    attempts = [(case, method, path, body, 400) for case, method, path, body in BODIES]
    attempts += [(case, method, path, None, status) for case, method, path, status in URLS]
    for case, method, path, body, status in attempts:
        if body is not None and "entry_id" in body:
            body = {**body, "entry_id": body["entry_id"].replace("{entry}", entry)}
        response = rest.client.request(
            method, path.replace("{entry}", entry), json=body, headers=rest.admin
        )
        problem = assert_problem(response, status)
        assert "NUL" in problem["detail"], (case, problem)
        assert problem["request_id"], case
    assert rest.client.get("/v1/tokens", headers=rest.admin).json() == tokens_before
    assert rest.client.get("/v1/entries", headers=rest.admin).json() == entries_before
    assert rest.certificate_count() == 0
    # The same values without the NUL are fine.
    made = rest.client.post(
        "/v1/tokens", json={"admin": True, "description": "ab"}, headers=rest.admin
    )
    assert made.status_code == 201, made.text


def test_every_body_and_every_url_goes_through_the_rule(rest: Rest) -> None:
    """Routes added later cannot skip it: every request body model is a ``RequestBody`` (its
    nested models too), every operation answers a NUL in any of its path parameters with 404
    and one in any query parameter it reads with 400."""

    def models(annotation: Any) -> list[type[BaseModel]]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            nested = [m for f in annotation.model_fields.values() for m in models(f.annotation)]
            return [annotation, *nested]
        return [m for arg in getattr(annotation, "__args__", ()) for m in models(arg)]

    bodies = paths = queries = 0
    for (method, path), route in schema_routes(rest.client).items():
        if route.body_field is not None:
            for model in models(route.body_field.field_info.annotation):
                assert issubclass(model, RequestBody), (method, path, model)
                bodies += 1
        plain = path.replace("{", "").replace("}", "")
        for parameter in route.dependant.query_params:
            query = f"{plain}?{parameter.alias}=a%00b"
            assert_problem(rest.client.request(method, query, headers=rest.admin), 400)
            queries += 1
        if "{" in path:
            nul = re.sub(r"\{[^}]*\}", "a%00b", path)
            assert_problem(rest.client.request(method, nul, headers=rest.admin), 404)
            paths += 1
    assert bodies > 15 and paths > 15 and queries > 15
