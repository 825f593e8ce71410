"""/v1/tokens: join and admin tokens (create, list, revoke)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from ca import audit
from ca.clock import FixedClock
from ca.config import Context
from tests.api.restkit import Rest, assert_problem, bearer, make_csr


def test_admin_token_create_list_revoke(rest: Rest, admin_token: str, ctx: Context) -> None:
    created = rest.client.post(
        "/v1/tokens", json={"admin": True, "description": "ci"}, headers=rest.admin
    )
    assert created.status_code == 201, created.text
    body = created.json()
    secret = body["token"]
    assert secret.startswith("trellis-admin-")
    assert (body["kind"], body["entry_id"], body["description"]) == ("admin", None, "ci")
    new_admin = bearer(secret)
    assert rest.client.get("/v1/entries", headers=new_admin).status_code == 200

    listed = rest.client.get("/v1/tokens", headers=new_admin)
    assert listed.status_code == 200
    assert body["id"] in {t["id"] for t in listed.json()}
    assert secret not in listed.text and admin_token not in listed.text
    assert all("token" not in t for t in listed.json())

    revoked = rest.client.post(f"/v1/tokens/{body['id']}/revoke", headers=rest.admin)
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["revoked_at"] is not None
    assert "token" not in revoked.json()

    assert_problem(rest.client.get("/v1/entries", headers=new_admin), 401)
    # Revoking twice is a conflict, as for certificates (docs/cli.md: exit 6): the first
    # revocation stands, with its one audit record; the original admin is unaffected.
    again = rest.client.post(f"/v1/tokens/{body['id']}/revoke", headers=rest.admin)
    assert "already revoked" in assert_problem(again, 409)["detail"]
    assert rest.token(body["id"])["revoked_at"] == revoked.json()["revoked_at"]
    assert len(audit.list_audit(ctx, event="token.revoked")) == 1


def test_join_token_list_never_shows_secrets(rest: Rest) -> None:
    entry_id = rest.create_entry()
    created = rest.client.post(
        "/v1/tokens",
        json={"entry_id": entry_id, "uses": 3, "ttl": "10m", "description": "web-1"},
        headers=rest.admin,
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["token"].startswith("trellis-join-")
    assert (body["kind"], body["entry_id"], body["uses_remaining"]) == ("join", entry_id, 3)
    assert body["description"] == "web-1"
    assert dt.datetime.fromisoformat(body["expires_at"]) == rest.clock.now() + dt.timedelta(
        minutes=10
    )

    listed = rest.client.get("/v1/tokens", headers=rest.admin)

    assert listed.status_code == 200
    assert body["token"] not in listed.text
    assert all("token" not in t for t in listed.json())
    mine = rest.token(body["id"])
    assert {k: v for k, v in body.items() if k != "token"} == mine


def test_revoked_join_token_is_refused(rest: Rest) -> None:
    entry_id = rest.create_entry()
    created = rest.client.post("/v1/tokens", json={"entry_id": entry_id}, headers=rest.admin)
    token_id, secret = created.json()["id"], created.json()["token"]

    assert rest.client.post(f"/v1/tokens/{token_id}/revoke", headers=rest.admin).status_code == 200

    assert_problem(rest.request_svid(secret, make_csr()[1]), 401)
    assert rest.certificate_count() == 0


TOKEN_REFUSALS: list[tuple[str, dict[str, Any], int]] = [
    # (case, body, status)
    ("neither-entry-nor-admin", {}, 400),
    ("both-entry-and-admin", {"entry_id": "ENTRY", "admin": True}, 400),
    ("unknown-entry", {"entry_id": "6f1c0b52-0000-4000-8000-000000000000"}, 404),
    ("zero-uses", {"entry_id": "ENTRY", "uses": 0}, 400),
    ("too-many-uses", {"entry_id": "ENTRY", "uses": 1001}, 400),
    ("ttl-over-30d", {"entry_id": "ENTRY", "ttl": "31d"}, 400),
    ("bad-ttl", {"entry_id": "ENTRY", "ttl": "soon"}, 400),
    ("unknown-field", {"entry_id": "ENTRY", "secret": "mine"}, 400),
    ("long-description", {"admin": True, "description": "d" * 256}, 400),
    ("admin-with-uses", {"admin": True, "uses": 5}, 400),
]


def test_token_create_refusals_store_nothing(rest: Rest) -> None:
    entry_id = rest.create_entry()
    before = rest.client.get("/v1/tokens", headers=rest.admin).json()
    for case, body, status in TOKEN_REFUSALS:
        if body.get("entry_id") == "ENTRY":
            body = body | {"entry_id": entry_id}
        response = rest.client.post("/v1/tokens", json=body, headers=rest.admin)
        assert response.status_code == status, (case, response.text)
        assert_problem(response, status)
    revoked = rest.client.post("/v1/tokens/0123456789abcdef/revoke", headers=rest.admin)
    assert_problem(revoked, 404)
    assert rest.client.get("/v1/tokens", headers=rest.admin).json() == before


def test_admin_token_ttl_is_honoured(rest: Rest, clock: FixedClock) -> None:
    response = rest.client.post("/v1/tokens", json={"admin": True, "ttl": "1h"}, headers=rest.admin)
    assert response.status_code == 201, response.text
    body = response.json()
    assert dt.datetime.fromisoformat(body["expires_at"]) == clock.now() + dt.timedelta(hours=1)
    assert rest.client.get("/v1/entries", headers=bearer(body["token"])).status_code == 200

    clock.advance(dt.timedelta(hours=1))

    assert_problem(rest.client.get("/v1/entries", headers=bearer(body["token"])), 401)
    assert rest.client.get("/v1/entries", headers=rest.admin).status_code == 200
