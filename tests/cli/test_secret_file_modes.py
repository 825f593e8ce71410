"""``admin-token`` and ``server/tls.key`` left loose (copied in by hand without their mode) are
tightened to 0600 with a warning by every command that opens the data dir, as ``keys/``,
``key-passphrase`` and ``secrets/`` are. Before, they were used as they were: Trellis never
reads them back itself (uvicorn loads the key; the token is the operator's), so no read
tightened them. Real ``trellis`` processes."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tests.ca.svidkit import SQLITE_ONLY
from tests.cli.test_walkthrough import Trellis

pytestmark = [pytest.mark.slow, SQLITE_ONLY]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_loose_admin_token_and_serving_key_are_tightened(trellis: Trellis, tmp_path: Path) -> None:
    token = trellis.data_dir / "admin-token"
    key = trellis.data_dir / "server" / "tls.key"
    with trellis.serving(tmp_path / "first.log"):
        pass  # makes server/tls.key
    for path in (token, key):
        path.chmod(0o644)
    result = trellis.run("certs", "list")
    for path in (token, key):
        assert _mode(path) == 0o600, path
        assert f"warning: {path} was mode 0644: tightened to 0600 (it is a secret)" in (
            result.stderr
        ), result.stderr
    assert "warning" not in trellis.run("certs", "list").stderr


def test_serve_tightens_its_key_before_it_serves_with_it(trellis: Trellis, tmp_path: Path) -> None:
    key = trellis.data_dir / "server" / "tls.key"
    with trellis.serving(tmp_path / "first.log"):
        pass
    key.chmod(0o640)
    log = tmp_path / "second.log"
    with trellis.serving(log):
        assert _mode(key) == 0o600
    assert f"{key} was mode 0640: tightened to 0600" in log.read_text()
