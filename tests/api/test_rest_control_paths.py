"""A path holding a control character once percent-decoded is an unknown path, 404, on every
route (``api.plainpath``): Starlette's ``^...$`` route patterns let ``$`` match before a final
newline, so ``/metrics%0A`` was ``/metrics`` and ``POST /v1/entries%0A`` created an entry, past
a proxy guarding the exact path. Both databases."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from starlette.routing import Route

from api.app import TrellisApi
from tests.api.restkit import Rest, assert_problem

NEW = "spiffe://example.org/new"

# (case, method, path): each was answered as the route without the character.
SERVED_BEFORE: list[tuple[str, str, str]] = [
    ("metrics/newline", "GET", "/metrics%0A"),
    ("healthz/newline", "GET", "/healthz%0A"),
    ("readyz/newline", "GET", "/readyz%0a"),
    ("crl/newline", "GET", "/v1/crl/mesh/root.crl%0A"),
    ("bundle-pem/newline", "GET", "/v1/bundle%0A"),
    ("bundle/newline", "GET", "/v1/bundle.jwks%0A"),
    ("entries/newline", "GET", "/v1/entries%0A"),
    ("openapi/newline", "GET", "/openapi.json%0A"),
    ("metrics/head", "HEAD", "/metrics%0A"),
]


@pytest.mark.parametrize(
    ("case", "method", "path"), SERVED_BEFORE, ids=[c[0] for c in SERVED_BEFORE]
)
def test_a_route_with_a_newline_after_it_is_not_served(
    rest: Rest, case: str, method: str, path: str
) -> None:
    plain = path.removesuffix("%0A").removesuffix("%0a")
    assert rest.client.request(method, plain, headers=rest.admin).status_code == 200
    response = rest.client.request(method, path, headers=rest.admin)
    if method == "HEAD":
        assert response.status_code == 404 and not response.content, case
        assert response.headers["content-type"] == "application/problem+json"
        return
    problem = assert_problem(response, 404)
    assert problem["code"] == "not-found"
    assert "LF (U+000A)" in problem["detail"], problem
    assert problem["request_id"] == response.headers["x-request-id"]


def test_an_entry_posted_to_a_path_with_a_newline_is_not_created(rest: Rest) -> None:
    entries = rest.client.get("/v1/entries", headers=rest.admin).json()

    response = rest.client.post("/v1/entries%0A", json={"spiffe_id": NEW}, headers=rest.admin)

    assert_problem(response, 404)
    assert rest.client.get("/v1/entries", headers=rest.admin).json() == entries


# Every C0 control, DEL, and a C1 control (U+0085 NEXT LINE, percent-encoded as UTF-8), at the
# end and in the middle of a path.
CONTROLS = [f"%{code:02X}" for code in [*range(0x20), 0x7F]] + ["%C2%85"]


@pytest.mark.parametrize("where", ["end", "middle"])
def test_every_control_character_is_refused(rest: Rest, where: str) -> None:
    for control in CONTROLS:
        path = "/healthz" + control if where == "end" else "/v1/crl/mesh/ro" + control + "ot.crl"
        problem = assert_problem(rest.client.get(path), 404)
        assert "a control character" in problem["detail"], (control, problem)
    assert rest.client.get("/healthz").status_code == 200
    # A printable character outside ASCII is no control character: a CA name that does not
    # parse, 400 as ever.
    problem = assert_problem(rest.client.get("/v1/crl/mesh/ro%C3%A9ot.crl"), 400)
    assert "control" not in problem["detail"]


def served(routes: Iterable[Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path template) of every route, documented or not, however routers nest."""
    for route in routes:
        if isinstance(route, Route):
            for method in sorted(route.methods or ()):
                yield method, prefix + route.path
            continue
        nested = getattr(route, "original_router", None) or route
        context = getattr(route, "include_context", None)
        yield from served(getattr(nested, "routes", ()), prefix + getattr(context, "prefix", ""))


def test_no_route_is_reached_with_a_control_character_in_its_path(rest: Rest) -> None:
    """Every route the application serves, each of its methods, and the issuance routes it
    answers before its middleware (``api.app.TrellisApi.hot``): routes added later cannot skip
    the rule."""
    app = rest.client.app
    assert isinstance(app, TrellisApi)
    every = {*served(app.routes), *app.hot}
    for method, template in sorted(every):
        path = re.sub(r"\{[^}]*\}", "x", template)
        for control in ("%0A", "%0D", "%09", "%00"):
            response = rest.client.request(method, path + control, headers=rest.admin)
            if method == "HEAD":
                assert response.status_code == 404, (method, path)
                continue
            problem = assert_problem(response, 404)
            assert "a control character" in problem["detail"], (method, path, problem)
    assert len(every) > 40
