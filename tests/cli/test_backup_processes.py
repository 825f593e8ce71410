"""``trellis backup`` and ``trellis restore`` as real processes, for what only a process shows:
the modes of the directories it makes under the umask it was started with.
tests/cli/test_backup.py checks the archive's content and refusals in-process."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from tests.cli.test_walkthrough import TRELLIS, Trellis

pytestmark = pytest.mark.slow


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_directories_made_under_umask_000_are_never_writable_by_others(tmp_path: Path) -> None:
    """restore made the data dir's missing parents, and init and restore the parents of a
    database outside the data dir (and its own directory), with mode 0777 minus the umask:
    0777 under umask 000, so anyone could move them away and plant a CA of their own.
    docs/cli.md: parents made on the way are at most 0755; the directory holding keys or the
    database is 0700."""

    def run(cli: Trellis, *args: str) -> None:
        done = subprocess.run(
            [TRELLIS, *args], env=cli.env, capture_output=True, text=True, timeout=60,
            check=False, umask=0,
        )  # fmt: skip
        assert done.returncode == 0, done

    source = Trellis(tmp_path / "nd" / "x", f"sqlite:///{tmp_path / 'idb' / 'a' / 'b' / 't.db'}")
    run(source, "init", "--trust-domain", "example.org")
    run(source, "backup", "--out", str(tmp_path / "bx" / "deep" / "b.tgz"))
    outside = Trellis(
        tmp_path / "rx" / "deep" / "dd", f"sqlite:///{tmp_path / 'dbdir' / 'a' / 'b' / 't.db'}"
    )
    run(outside, "restore", str(tmp_path / "bx" / "deep" / "b.tgz"))
    inside = Trellis(tmp_path / "ry" / "deep" / "dd", f"sqlite:///{tmp_path / 'ry/deep/dd/t.db'}")
    run(inside, "restore", str(tmp_path / "bx" / "deep" / "b.tgz"))
    modes = {
        path: _mode(tmp_path / path)
        for path in (
            "nd", "nd/x", "idb", "idb/a", "idb/a/b", "bx", "bx/deep",
            "rx", "rx/deep", "rx/deep/dd", "dbdir", "dbdir/a", "dbdir/a/b",
            "ry", "ry/deep", "ry/deep/dd",
        )
    }  # fmt: skip
    private = {"nd/x", "idb/a/b", "bx/deep", "rx/deep/dd", "dbdir/a/b", "ry/deep/dd"}
    assert modes == {path: 0o700 if path in private else 0o755 for path in modes}
    assert _mode(tmp_path / "dbdir" / "a" / "b" / "t.db") == 0o600
