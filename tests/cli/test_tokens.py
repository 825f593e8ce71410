"""``trellis token``: what the CLI refuses instead of ignoring or repeating."""

from __future__ import annotations

import json
from pathlib import Path

from tests.ca.svidkit import SQLITE_ONLY
from tests.cli.test_walkthrough import Trellis


@SQLITE_ONLY  # the CLI calls what REST calls (tests/api/test_rest_tokens.py, both databases)
def test_admin_uses_is_refused_and_a_second_revocation_is_a_conflict(
    tmp_path: Path, database_url: str
) -> None:
    cli = Trellis(tmp_path / "var", database_url)
    cli.set_up("init", "--trust-domain", "example.org")

    def listed(*args: str) -> list[dict[str, object]]:  # read in-process: not under test
        found = json.loads(cli.set_up(*args, "--json"))
        assert isinstance(found, list)
        return found

    before = listed("token", "list")

    refused = cli.run("token", "create", "--admin", "--uses", "5", ok=False)
    assert refused.returncode == 2 and "--uses applies to join tokens only" in refused.stderr
    assert listed("token", "list") == before  # nothing created

    created = json.loads(cli.set_up("token", "create", "--admin", "--json"))
    assert isinstance(created, dict)
    first = cli.json("token", "revoke", created["id"])
    assert isinstance(first, dict) and first["revoked_at"] is not None
    again = cli.run("token", "revoke", created["id"], ok=False)
    assert again.returncode == 6 and "already revoked" in again.stderr, again.stderr
    (shown,) = [t for t in listed("token", "list") if t["id"] == created["id"]]
    assert shown["revoked_at"] == first["revoked_at"]
    assert len(listed("audit", "list", "--event", "token.revoked")) == 1
