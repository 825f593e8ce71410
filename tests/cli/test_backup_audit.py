"""``trellis backup`` and ``trellis restore`` in the audit trail, as real processes: a backup
exports every CA key and the admin token, a restore replaces the trail; each is recorded (who,
where, what, never a secret), and the restored trail, with its restore as the newest record,
goes on verifying and sealing."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.cli.test_walkthrough import Trellis

pytestmark = pytest.mark.slow


def _records(cli: Trellis, *args: str) -> list[dict[str, Any]]:
    found = cli.json("audit", "list", *args)
    assert isinstance(found, list)
    return found


def _manifest_sha256(archive: Path) -> str:
    with tarfile.open(archive) as opened:
        member = opened.extractfile("manifest.json")
        assert member is not None
        return hashlib.sha256(member.read()).hexdigest()


def _when(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_a_backup_and_a_restore_are_recorded_and_the_restored_trail_verifies(
    tmp_path: Path,
) -> None:
    source = Trellis(tmp_path / "a", f"sqlite:///{tmp_path / 'a' / 'trellis.db'}")
    source.set_up("init", "--trust-domain", "example.org")
    sealed = source.json("audit", "seal")
    assert isinstance(sealed, dict) and sealed["signed_seq"] == sealed["head_seq"]
    witnessed = f"{sealed['head_seq']}:{sealed['head_hash']}"
    archive = tmp_path / "backups" / "trellis.tgz"
    source.run("backup", "--out", str(archive))

    (made,) = _records(source, "--event", "backup.")
    assert made["event"] == "backup.created" and made["subject"] == str(archive)
    assert made["actor"] == "cli" and made["request_id"].startswith("cli-")
    assert made["detail"]["manifest_sha256"] == _manifest_sha256(archive)
    contents = made["detail"]["contents"]
    assert contents["trellis.db"] == contents["admin-token"] == contents["bundle.pem"] == 1
    assert contents["keys"] >= 2  # the root's and the intermediate's key files
    # What it holds, never a secret: not the admin token, not the key passphrase.
    shown = json.dumps(made)
    assert (tmp_path / "a" / "admin-token").read_text().strip() not in shown
    assert source.env["TRELLIS_KEY_PASSPHRASE"] not in shown

    restored = Trellis(tmp_path / "b", f"sqlite:///{tmp_path / 'b' / 'trellis.db'}")
    restored.run("restore", str(archive))
    newest, *older = _records(restored, "--limit", "100")
    assert newest["event"] == "backup.restored" and newest["subject"] == str(archive)
    assert newest["actor"] == "cli" and newest["request_id"].startswith("cli-")
    assert newest["request_id"] != made["request_id"]
    assert newest["seq"] is None and all(o["id"] < newest["id"] for o in older)
    detail = newest["detail"]
    assert detail["manifest_sha256"] == made["detail"]["manifest_sha256"]  # the same archive
    assert detail["data_dir"] == str(tmp_path / "b")
    assert detail["backup"]["data_dir"] == str(tmp_path / "a")
    assert _when(detail["backup"]["taken_at"]) == _when(made["at"])
    assert _when(newest["at"]) >= _when(made["at"])
    # The snapshot was taken before the backup's own record: the restored trail lacks it.
    assert [r["event"] for r in _records(restored, "--event", "backup.")] == ["backup.restored"]

    restored.run("audit", "verify", "--head", witnessed)  # exit 1 if it were broken
    sealed_again = restored.json("audit", "seal")
    assert isinstance(sealed_again, dict) and sealed_again["records"] == 1
    verified = restored.json("audit", "verify", "--head", witnessed)
    assert isinstance(verified, dict) and verified["ok"], verified
    assert verified["unsealed"] == 0 and verified["unsigned"] == 0
    (chained,) = _records(restored, "--limit", "1")
    assert (chained["event"], chained["seq"]) == ("backup.restored", sealed_again["head_seq"])
