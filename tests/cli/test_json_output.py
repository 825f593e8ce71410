"""What the CLI builds into ``--json`` itself (not from a REST model) writes instants as REST
does, ``...Z`` (docs/cli.md), and ``audit seal`` reports the chain's head it leaves."""

from __future__ import annotations

import re
from pathlib import Path

from tests.cli.test_operations import _serial
from tests.cli.test_walkthrough import Trellis

ZULU = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


def _zulu(value: object) -> bool:
    return isinstance(value, str) and ZULU.fullmatch(value) is not None


def test_instants_the_cli_renders_itself_end_in_z(tmp_path: Path) -> None:
    cli = Trellis(tmp_path / "var", f"sqlite:///{tmp_path / 'trellis.db'}")
    created = cli.json("init", "--trust-domain", "example.org")
    assert isinstance(created, dict)
    assert _zulu(created["root_not_after"]) and _zulu(created["intermediate_not_after"])
    cli.run("svid", "mint", "--spiffe-id", "spiffe://example.org/w", "--out", str(tmp_path / "w"))
    cli.run("revoke", _serial(tmp_path / "w" / "svid.pem"), "--reason", "superseded", "--yes")

    crl = cli.json("crl", "show")
    assert isinstance(crl, dict) and _zulu(crl["this_update"]) and _zulu(crl["next_update"])
    assert [_zulu(e["revoked_at"]) for e in crl["revoked"]] == [True]
    assert "+00:00" not in cli.run("crl", "show").stdout  # the REVOKED AT column too
    records = cli.json("audit", "list")
    assert isinstance(records, list) and records and all(_zulu(r["at"]) for r in records)
    # What POST /v1/authorities/{a}/rotate answers: a bare array (it was {"transitions": [...]})
    rotated = cli.json("authority", "rotate", "--now")
    assert isinstance(rotated, list) and rotated
    assert all(set(t) == {"event", "serial", "at"} and _zulu(t["at"]) for t in rotated)


def test_audit_seal_reports_the_head_it_leaves(tmp_path: Path) -> None:
    """It printed "head at seq -" whenever this run chained nothing, signed head or not."""
    cli = Trellis(tmp_path / "var", f"sqlite:///{tmp_path / 'trellis.db'}")
    cli.set_up("init", "--trust-domain", "example.org")
    first = cli.json("audit", "seal")
    assert isinstance(first, dict) and first["records"] >= 1
    assert first["head_seq"] >= first["records"] and first["signed_seq"] == first["head_seq"]
    assert re.fullmatch(r"[0-9a-f]{64}", first["head_hash"])
    again = cli.json("audit", "seal")
    assert again == {**first, "records": 0}
    said = cli.run("audit", "seal").stdout
    assert f"head at seq {first['head_seq']} ({first['head_hash']})" in said, said
    assert f"signed at seq {first['head_seq']}" in said
    verified = cli.run("audit", "verify", "--head", f"{first['head_seq']}:{first['head_hash']}")
    assert verified.returncode == 0
