"""GET /v1/certificates, GET /v1/certificates/{serial}, POST .../{serial}/revoke."""

from __future__ import annotations

import datetime as dt

from ca.clock import FixedClock
from tests.api.restkit import Rest, assert_problem, make_csr


def _issue(rest: Rest, spiffe_id: str, count: int = 1, ttl: str | None = None) -> list[str]:
    token = rest.join_token(rest.create_entry(spiffe_id), uses=count)
    fields = {"ttl": ttl} if ttl else {}
    serials = []
    for _ in range(count):
        response = rest.request_svid(token, make_csr()[1], **fields)
        assert response.status_code == 200, response.text
        serials.append(response.json()["serial"])
    return serials


def test_list_filters_by_spiffe_id_and_status(rest: Rest, clock: FixedClock) -> None:
    short = _issue(rest, "spiffe://example.org/short", ttl="1h")
    long = _issue(rest, "spiffe://example.org/long", count=2, ttl="12h")
    revoked = long[1]
    response = rest.client.post(
        f"/v1/certificates/{revoked}/revoke", json={"reason": "superseded"}, headers=rest.admin
    )
    assert response.status_code == 200, response.text

    def serials(**params: str) -> set[str]:
        return {item["serial"] for item in rest.certificates(**params)}

    assert serials() == {*short, *long}
    assert serials(spiffe_id="spiffe://example.org/long") == set(long)
    assert serials(spiffe_id="spiffe://example.org/nobody") == set()
    assert serials(status="active") == {*short, long[0]}
    assert serials(status="revoked") == {revoked}
    assert serials(status="expired") == set()

    clock.advance(dt.timedelta(hours=2))  # "expired" is derived from the clock, not stored

    assert serials(status="expired") == set(short)
    assert serials(status="active") == {long[0]}
    assert serials(status="revoked") == {revoked}
    by_serial = {item["serial"]: item["status"] for item in rest.certificates()}
    assert by_serial == {short[0]: "expired", long[0]: "active", revoked: "revoked"}


def test_list_pages_in_serial_order(rest: Rest) -> None:
    issued = _issue(rest, "spiffe://example.org/paged", count=5)
    seen: list[str] = []
    after: str | None = None
    pages = 0
    while True:
        params = {"limit": 2} | ({"after": after} if after else {})
        response = rest.client.get("/v1/certificates", params=params, headers=rest.admin)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["items"]) <= 2
        seen += [item["serial"] for item in page["items"]]
        pages += 1
        after = page["next_after"]
        if after is None:
            break
        assert after == page["items"][-1]["serial"]
        assert pages < 10
    assert seen == sorted(issued)  # the stored (hex) serials, in order
    assert pages == 3


def test_the_cursor_must_be_a_listed_serial(rest: Rest) -> None:
    """Regression: ?after= was compared as text with the stored serials, so "abcdef" (a valid
    serial, below every issued one) gave an empty list and "0x10" all of them. A serial a page
    ended with pages on, however it is written; any other one is refused."""
    issued = sorted(_issue(rest, "spiffe://example.org/cursor", count=3))
    first = issued[0]
    for spelling in (
        first,
        first.upper(),
        "0x" + first,
        ":".join(first[i : i + 2] for i in range(0, len(first), 2)),
    ):
        response = rest.client.get(
            "/v1/certificates", params={"after": spelling}, headers=rest.admin
        )
        assert response.status_code == 200, (spelling, response.text)
        assert [item["serial"] for item in response.json()["items"]] == issued[1:]
    for cursor in ("abcdef", "0x10", "7" + "f" * 39, issued[-1][:-1]):
        for extra in ({}, {"expiring_within": "1d"}):
            response = rest.client.get(
                "/v1/certificates", params={"after": cursor, **extra}, headers=rest.admin
            )
            assert "not there to page after" in assert_problem(response, 400)["detail"], cursor


def test_a_full_last_page_says_it_is_the_end(rest: Rest) -> None:
    _issue(rest, "spiffe://example.org/two", count=2)
    response = rest.client.get("/v1/certificates", params={"limit": 2}, headers=rest.admin)
    assert response.status_code == 200, response.text
    assert len(response.json()["items"]) == 2
    assert response.json()["next_after"] is None


# Case tables are looped inside one test: each row would otherwise cost a fresh database.
BAD_QUERIES = [
    "status=valid",
    "limit=0",
    "limit=1001",
    "limit=two",
    "after=not-hex",
    "spiffe_id=http://example.org/web",
    "spiffe_id=spiffe://example.org/web/",
]


def test_list_rejects_bad_query_parameters(rest: Rest) -> None:
    for query in BAD_QUERIES:
        response = rest.client.get(f"/v1/certificates?{query}", headers=rest.admin)
        assert response.status_code == 400, query
        assert_problem(response, 400)


def test_show_includes_pem_and_no_response_carries_a_private_key(rest: Rest) -> None:
    token = rest.join_token(rest.create_entry())
    issued = rest.request_svid(token, make_csr()[1]).json()
    serial = issued["serial"]

    listed = rest.client.get("/v1/certificates", headers=rest.admin)
    shown = rest.client.get(f"/v1/certificates/{serial}", headers=rest.admin)
    upper = rest.client.get(f"/v1/certificates/{serial.upper()}", headers=rest.admin)

    assert listed.status_code == shown.status_code == upper.status_code == 200
    (item,) = listed.json()["items"]
    assert item["certificate"] is None
    assert "BEGIN CERTIFICATE" not in listed.text
    body = shown.json()
    assert body["certificate"] == issued["certificate"]
    assert body["serial"] == serial and body["spiffe_id"] == issued["spiffe_id"]
    assert body["status"] == "active" and body["profile"] == "x509-svid"
    assert upper.json() == body
    for response in (listed, shown, upper):
        assert "PRIVATE KEY" not in response.text


def test_revoke_once_then_conflict(rest: Rest) -> None:
    serial, other = _issue(rest, "spiffe://example.org/revoked", count=2)
    url = f"/v1/certificates/{serial}/revoke"

    first = rest.client.post(url, json={"reason": "keyCompromise"}, headers=rest.admin)
    again = rest.client.post(url, json={"reason": "keyCompromise"}, headers=rest.admin)

    assert first.status_code == 200, first.text
    body = first.json()
    assert body["status"] == "revoked"
    assert body["revocation_reason"] == "keyCompromise"
    assert body["revoked_at"] is not None
    assert body["revoked_by"].startswith("admin-token:")
    assert assert_problem(again, 409)["code"] == "conflict"
    shown = rest.client.get(f"/v1/certificates/{serial}", headers=rest.admin).json()
    assert shown["status"] == "revoked"
    assert shown["revocation_reason"] == "keyCompromise"
    # Without a reason, the reason is "unspecified".
    default = rest.client.post(f"/v1/certificates/{other}/revoke", json={}, headers=rest.admin)
    assert default.status_code == 200, default.text
    assert default.json()["revocation_reason"] == "unspecified"


def test_revoke_takes_no_body_as_an_empty_one(rest: Rest) -> None:
    """Regression: no body was 400 "invalid request body", though docs/api.md documents
    ``{"reason"?, "invalidity_date"?}`` and the emergency switch and rotate take none."""
    (serial,) = _issue(rest, "spiffe://example.org/bodiless")
    revoked = rest.client.post(f"/v1/certificates/{serial}/revoke", headers=rest.admin)
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["status"] == "revoked"
    assert revoked.json()["revocation_reason"] == "unspecified"


def test_a_missing_body_where_one_is_required_is_named(rest: Rest) -> None:
    """Regression: the detail was "invalid request body", as for a body of the wrong shape."""
    for path in ("/v1/entries", "/v1/tokens", "/v1/revocations"):
        problem = assert_problem(rest.client.post(path, headers=rest.admin), 400)
        assert problem["detail"] == "a request body is required: a JSON object", (path, problem)
    assert not rest.client.get("/v1/entries", headers=rest.admin).json()


def test_a_body_that_is_not_json_is_named(rest: Rest) -> None:
    """Regression: the detail was pydantic's "12: JSON decode error", the offset as a field."""
    headers = rest.admin | {"Content-Type": "application/json"}
    for path in ("/v1/entries", "/v1/tokens", "/v1/revocations"):
        sent = rest.client.post(path, content=b'{"spiffe_id": ', headers=headers)
        problem = assert_problem(sent, 400)
        assert problem["detail"].startswith("the body is not valid JSON ("), (path, problem)
        assert problem["detail"].endswith(" at character 14)"), (path, problem)
    assert not rest.client.get("/v1/entries", headers=rest.admin).json()


REVOKE_REFUSALS = [
    # (case, serial or ISSUED, body, status)
    ("unknown-serial", "abcdef0123456789", {"reason": "keyCompromise"}, 404),
    ("malformed-serial", "xyz", {"reason": "keyCompromise"}, 400),
    ("zero-serial", "0", {"reason": "keyCompromise"}, 400),
    ("too-long-serial", "f" * 41, {"reason": "keyCompromise"}, 400),
    ("bad-reason", "ISSUED", {"reason": "bored"}, 400),
    ("remove-from-crl", "ISSUED", {"reason": "removeFromCRL"}, 400),
    ("certificate-hold", "ISSUED", {"reason": "certificateHold"}, 400),
    ("unknown-field", "ISSUED", {"reason": "keyCompromise", "by": "me"}, 400),
    ("reason-not-a-string", "ISSUED", {"reason": 7}, 400),
]


def test_revoke_refusals_change_nothing(rest: Rest) -> None:
    (issued,) = _issue(rest, "spiffe://example.org/kept")
    for case, serial, body, status in REVOKE_REFUSALS:
        url = f"/v1/certificates/{issued if serial == 'ISSUED' else serial}/revoke"
        response = rest.client.post(url, json=body, headers=rest.admin)
        assert response.status_code == status, (case, response.text)
        assert_problem(response, status)
    removal = rest.client.post(
        f"/v1/certificates/{issued}/revoke", json={"reason": "removeFromCRL"}, headers=rest.admin
    )  # an RFC 5280 code, only not one to revoke with: not "unknown"
    assert "removeFromCRL is not a reason to revoke" in assert_problem(removal, 400)["detail"]
    hold = rest.client.post(
        f"/v1/certificates/{issued}/revoke", json={"reason": "certificateHold"}, headers=rest.admin
    )  # a reversible reason, and a Trellis revocation is not: said so, not "unknown"
    assert "certificateHold is not a reason" in assert_problem(hold, 400)["detail"]
    for serial, status in (("abcdef0123456789", 404), ("not-a-serial", 400)):
        assert_problem(rest.client.get(f"/v1/certificates/{serial}", headers=rest.admin), status)

    (item,) = rest.certificates()
    assert item["status"] == "active"
    assert item["revoked_at"] is None


def test_expiring_within_lists_live_certificates_soonest_first_and_pages(
    rest: Rest, clock: FixedClock
) -> None:
    """Live certificates that expire within the window, ordered by expiry, paged by serial;
    expired and revoked ones, and those expiring later, are not listed."""
    entry_id = rest.create_entry("spiffe://example.org/expiring")
    token = rest.join_token(entry_id, uses=5)
    expiries = {}
    for ttl in ("50m", "10m", "30m", "2h", "20m"):
        body = rest.request_svid(token, make_csr()[1], ttl=ttl).json()
        expiries[body["serial"]] = body["expires_at"]
    later = sorted((e, s) for s, e in expiries.items())
    revoked = later[0][1]  # the 10m one
    assert rest.client.post(
        f"/v1/certificates/{revoked}/revoke", json={"reason": "superseded"}, headers=rest.admin
    ).is_success

    seen, after = [], None
    while True:
        params = {"expiring_within": "1h", "limit": 2} | ({"after": after} if after else {})
        page = rest.client.get("/v1/certificates", params=params, headers=rest.admin).json()
        seen += [item["serial"] for item in page["items"]]
        after = page["next_after"]
        if after is None:
            break
    # 20m, 30m, 50m: not the revoked 10m one, not the 2h one
    assert seen == [s for e, s in later if s != revoked][:3]

    refused = rest.client.get(
        "/v1/certificates",
        params={"expiring_within": "1h", "status": "revoked"},
        headers=rest.admin,
    )
    assert refused.status_code == 400
    assert refused.headers["content-type"] == "application/problem+json"
