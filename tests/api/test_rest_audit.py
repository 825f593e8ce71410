"""The audit trail names the REST request behind every change (docs/operations.md: "A change made
over REST records the admin token ... and the request id"), not only behind revocations."""

from __future__ import annotations

import pytest

from ca import audit
from ca.config import Context
from ca.entries import EntryParams, create_entry
from ca.identity import SpiffeId
from tests.api.restkit import Rest, Svid, bearer, make_csr


def _ids(ctx: Context) -> dict[str, set[str | None]]:
    found: dict[str, set[str | None]] = {}
    for record in audit.list_audit(ctx, limit=1000):
        found.setdefault(record.event, set()).add(record.request_id)
    return found


def test_every_rest_change_records_its_request_id(rest: Rest, ctx: Context) -> None:
    def asked(rid: str) -> dict[str, str]:
        return {**rest.admin, "X-Request-ID": rid}

    client = rest.client
    entry = client.post(
        "/v1/entries", json={"spiffe_id": "spiffe://example.org/web"}, headers=asked("rid-entry")
    )
    assert entry.status_code == 201, entry.text
    entry_id = entry.json()["id"]
    join = client.post("/v1/tokens", json={"entry_id": entry_id}, headers=asked("rid-join"))
    assert join.status_code == 201, join.text
    admin = client.post("/v1/tokens", json={"admin": True}, headers=asked("rid-admin"))
    assert admin.status_code == 201, admin.text
    revoked = client.post(f"/v1/tokens/{admin.json()['id']}/revoke", headers=asked("rid-tokrev"))
    assert revoked.status_code == 200, revoked.text

    key, csr = make_csr()
    issued = client.post(
        "/v1/svid",
        json={"csr": csr},
        headers={**bearer(join.json()["token"]), "X-Request-ID": "rid-svid"},
    )
    assert issued.status_code == 200, issued.text
    _new_key, new_csr = make_csr()
    proof = rest.proof(Svid(key, issued.json()), new_csr)
    renewed = client.post(
        "/v1/svid/renew",
        json={"csr": new_csr},
        headers={**bearer(proof), "X-Request-ID": "rid-renew"},
    )
    assert renewed.status_code == 200, renewed.text

    disabled = client.post(f"/v1/entries/{entry_id}/disable", headers=asked("rid-disable"))
    assert disabled.status_code == 200, disabled.text
    enabled = client.post(f"/v1/entries/{entry_id}/enable", headers=asked("rid-enable"))
    assert enabled.status_code == 200, enabled.text
    deleted = client.delete(f"/v1/entries/{entry_id}", headers=asked("rid-delete"))
    assert deleted.status_code == 200, deleted.text

    ids = _ids(ctx)
    assert ids["entry.created"] == {"rid-entry"}
    # The fixture's admin token was made in-process, as by the CLI: no request.
    assert ids["token.created"] == {"rid-join", "rid-admin", None}
    assert ids["token.revoked"] == {"rid-tokrev"}
    assert ids["certificate.issued"] == {"rid-svid"}
    assert ids["certificate.renewed"] == {"rid-renew"}
    assert ids["entry.disabled"] == {"rid-disable"}
    assert ids["entry.enabled"] == {"rid-enable"}
    assert ids["entry.deleted"] == {"rid-delete"}


def test_a_change_outside_a_request_records_no_request_id(ctx: Context) -> None:
    """In-process changes outside a request (the scheduler's jobs) have none; a CLI command sets
    its ``cli-<hex>`` id (tests/cli/test_operations.py)."""
    create_entry(ctx, EntryParams(SpiffeId.parse("spiffe://example.org/cli")), actor="cli")
    assert _ids(ctx)["entry.created"] == {None}


@pytest.mark.parametrize("given", ["cli-deadbeefdeadbeef", "CLI-deadbeefdeadbeef", "Cli-1"])
def test_a_rest_request_cannot_take_the_cli_s_request_id_prefix(
    rest: Rest, ctx: Context, given: str
) -> None:
    """``cli-<hex>`` is what a command run on the host records (``cli.common.State``): a REST
    caller sending it had its change pass for one, by its request id. The id is replaced by a
    generated one (docs/api.md), echoed and recorded; the request goes through."""
    created = rest.client.post(
        "/v1/entries",
        json={"spiffe_id": "spiffe://example.org/posing"},
        headers={**rest.admin, "X-Request-ID": given},
    )
    assert created.status_code == 201, created.text
    returned = created.headers["x-request-id"]
    assert not returned.lower().startswith("cli-")
    assert _ids(ctx)["entry.created"] == {returned}
    # An id that merely holds the prefix further on is the caller's, as any sane one.
    again = rest.client.post(
        "/v1/entries",
        json={"spiffe_id": "spiffe://example.org/other"},
        headers={**rest.admin, "X-Request-ID": "from-cli-deadbeef"},
    )
    assert again.headers["x-request-id"] == "from-cli-deadbeef"


def test_disabling_or_enabling_an_entry_is_recorded_only_when_it_changes(
    rest: Rest, ctx: Context
) -> None:
    """As a gateway consumer's disabling: every call was recorded, and three ``entry.disabled``
    in a row read as three changes. The unchanged calls still answer 200 with the state."""
    entry_id = rest.create_entry("spiffe://example.org/web")
    answers = []
    for action, rid in [
        ("enable", "enable-0"),
        ("disable", "disable-1"),
        ("disable", "disable-2"),
        ("disable", "disable-3"),
        ("enable", "enable-4"),
        ("enable", "enable-5"),
    ]:
        response = rest.client.post(
            f"/v1/entries/{entry_id}/{action}", headers={**rest.admin, "X-Request-ID": rid}
        )
        assert response.status_code == 200, response.text
        answers.append(response.json()["enabled"])

    assert answers == [True, False, False, False, True, True]
    records = [
        (record.event, record.request_id)
        for record in audit.list_audit(ctx, limit=1000)
        if record.event in ("entry.disabled", "entry.enabled")
    ]
    assert sorted(records) == [("entry.disabled", "disable-1"), ("entry.enabled", "enable-4")]
