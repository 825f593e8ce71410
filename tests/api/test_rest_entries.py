"""/v1/entries: registration entries (create, list, show, delete)."""

from __future__ import annotations

from tests.api.restkit import Rest, assert_problem, make_csr


def test_create_list_show_delete(rest: Rest) -> None:
    created = rest.client.post(
        "/v1/entries",
        json={
            "spiffe_id": "spiffe://example.org/ns/prod/sa/api",
            "dns_names": ["API.example.org", "api.example.org."],
            "ttl": "30m",
            "max_ttl": "12h",
        },
        headers=rest.admin,
    )
    assert created.status_code == 201, created.text
    entry = created.json()
    assert entry["spiffe_id"] == "spiffe://example.org/ns/prod/sa/api"
    assert entry["dns_names"] == ["api.example.org"]  # normalised, then de-duplicated
    assert (entry["ttl"], entry["max_ttl"]) == ("30m", "12h")
    other = rest.create_entry("spiffe://example.org/a-first")

    listed = rest.client.get("/v1/entries", headers=rest.admin)
    shown = rest.client.get(f"/v1/entries/{entry['id']}", headers=rest.admin)

    assert listed.status_code == 200
    assert [e["id"] for e in listed.json()] == [other, entry["id"]]  # by SPIFFE ID
    assert shown.status_code == 200 and shown.json() == entry

    deleted = rest.client.delete(f"/v1/entries/{entry['id']}", headers=rest.admin)
    assert deleted.status_code == 200 and deleted.json() == entry
    assert_problem(rest.client.get(f"/v1/entries/{entry['id']}", headers=rest.admin), 404)
    assert_problem(rest.client.delete(f"/v1/entries/{entry['id']}", headers=rest.admin), 404)
    assert [e["id"] for e in rest.client.get("/v1/entries", headers=rest.admin).json()] == [other]


def test_unknown_entry_ids_are_404(rest: Rest) -> None:
    for entry_id in ("6f1c0b52-0000-4000-8000-000000000000", "not-a-uuid", "x" * 300):
        for method in ("GET", "DELETE"):
            response = rest.client.request(method, f"/v1/entries/{entry_id}", headers=rest.admin)
            assert response.status_code == 404, (method, entry_id)
            assert_problem(response, 404)


def test_duplicate_spiffe_id_is_a_conflict(rest: Rest) -> None:
    rest.create_entry("spiffe://example.org/twice")
    for spelling in ("spiffe://example.org/twice", "SPIFFE://EXAMPLE.ORG/twice"):
        response = rest.client.post("/v1/entries", json={"spiffe_id": spelling}, headers=rest.admin)
        assert response.status_code == 409, spelling
        assert assert_problem(response, 409)["code"] == "conflict"
    assert len(rest.client.get("/v1/entries", headers=rest.admin).json()) == 1


def test_upper_case_scheme_is_normalised_and_defaults_apply(rest: Rest) -> None:
    response = rest.client.post(
        "/v1/entries", json={"spiffe_id": "SPIFFE://Example.ORG/Mixed/Case"}, headers=rest.admin
    )
    assert response.status_code == 201, response.text
    body = response.json()
    # The path stays case-sensitive; scheme and trust domain are canonicalised.
    assert body["spiffe_id"] == "spiffe://example.org/Mixed/Case"
    # TTL defaults to the authority's SVID TTL, max TTL to a day.
    assert (body["ttl"], body["max_ttl"], body["dns_names"]) == ("1h", "1d", [])


INVALID_ENTRIES = [
    # (case, body, code)
    ("foreign-trust-domain", {"spiffe_id": "spiffe://other.org/x"}, "policy-violation"),
    ("trust-domain-id", {"spiffe_id": "spiffe://example.org"}, "policy-violation"),
    ("reserved-path", {"spiffe_id": "spiffe://example.org/trellis/server"}, "policy-violation"),
    ("trailing-slash", {"spiffe_id": "spiffe://example.org/web/"}, "invalid-spiffe-id"),
    ("dot-dot", {"spiffe_id": "spiffe://example.org/a/../b"}, "invalid-spiffe-id"),
    ("dot", {"spiffe_id": "spiffe://example.org/./b"}, "invalid-spiffe-id"),
    ("empty-segment", {"spiffe_id": "spiffe://example.org//b"}, "invalid-spiffe-id"),
    ("wrong-scheme", {"spiffe_id": "https://example.org/web"}, "invalid-spiffe-id"),
    ("port", {"spiffe_id": "spiffe://example.org:443/web"}, "invalid-spiffe-id"),
    ("query", {"spiffe_id": "spiffe://example.org/web?x=1"}, "invalid-spiffe-id"),
    ("percent", {"spiffe_id": "spiffe://example.org/w%20b"}, "invalid-spiffe-id"),
    ("non-ascii", {"spiffe_id": "spiffe://example.org/café"}, "invalid-spiffe-id"),
    # ca's reason (as the CLI's), not the schema's: "spiffe_id: String should have at most..."
    ("too-long", {"spiffe_id": "spiffe://example.org/" + "a" * 2100}, "invalid-spiffe-id"),
    ("bad-dns", {"spiffe_id": "spiffe://example.org/d", "dns_names": ["a_b"]}, "policy-violation"),
    (
        "non-ascii-dns",
        {"spiffe_id": "spiffe://example.org/d", "dns_names": ["ünï.org"]},
        "policy-violation",
    ),
    # U+212A KELVIN SIGN lower-cases to an ASCII "k": it was stored as "k.org", not refused.
    (
        "kelvin-dns",
        {"spiffe_id": "spiffe://example.org/d", "dns_names": ["\u212a.org"]},
        "policy-violation",
    ),
    (
        "dotless-i-dns",
        {"spiffe_id": "spiffe://example.org/d", "dns_names": ["\u0130.org"]},
        "policy-violation",
    ),
    (
        "ip-as-dns",
        {"spiffe_id": "spiffe://example.org/d", "dns_names": ["10.0.0.1"]},
        "policy-violation",
    ),
    ("ttl-over-max", {"spiffe_id": "spiffe://example.org/t", "ttl": "2d"}, "invalid-input"),
    ("bad-ttl", {"spiffe_id": "spiffe://example.org/t", "ttl": "1 hour"}, "invalid-input"),
    ("zero-ttl", {"spiffe_id": "spiffe://example.org/t", "max_ttl": "0s"}, "invalid-input"),
    ("unknown-field", {"spiffe_id": "spiffe://example.org/u", "admin": True}, "invalid-request"),
    ("missing-id", {"dns_names": []}, "invalid-request"),
]


def test_invalid_entries_are_400_and_nothing_is_stored(rest: Rest) -> None:
    for case, body, code in INVALID_ENTRIES:
        response = rest.client.post("/v1/entries", json=body, headers=rest.admin)
        assert response.status_code == 400, (case, response.text)
        assert assert_problem(response, 400)["code"] == code, case
    assert rest.client.get("/v1/entries", headers=rest.admin).json() == []


def test_deleting_an_entry_kills_its_join_tokens(rest: Rest) -> None:
    entry_id = rest.create_entry()
    token = rest.join_token(entry_id)

    assert rest.client.delete(f"/v1/entries/{entry_id}", headers=rest.admin).status_code == 200

    assert_problem(rest.request_svid(token, make_csr()[1]), 401)
    assert rest.certificate_count() == 0
