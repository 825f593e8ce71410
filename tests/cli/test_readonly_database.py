"""A SQLite database its owner may not write (``chmod 400``, a file handed to another user)
does not leave Trellis refusing writes for good once it may write it again. Real ``trellis``
processes, run as root without the capabilities that let root write any file (``setpriv``), so
that file modes apply to them as to any other user."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.cli.test_walkthrough import TRELLIS, Trellis

pytestmark = pytest.mark.slow

# Root keeps CAP_FOWNER (to chmod what it does not own): Trellis only changes its own files.
WITHOUT_DAC = (
    ("setpriv", "--bounding-set=-dac_override,-dac_read_search") if os.geteuid() == 0 else ()
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _files(database: Path) -> list[Path]:
    return [database, *(Path(f"{database}{suffix}") for suffix in ("-wal", "-shm", "-journal"))]


def _run(trellis: Trellis, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*WITHOUT_DAC, TRELLIS, *args],
        env=trellis.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_database_left_read_only_is_made_0600_when_opened(tmp_path: Path) -> None:
    """Before, ``chmod 400`` left the database read-only: a command opened it so, and SQLite
    made its ``-shm`` 0400 with it; after ``chmod 600`` every command still failed, exit 8
    "attempt to write a readonly database", until someone chmodded the ``-shm``. Journals
    left read-only beside it are made 0600 too."""
    data_dir = tmp_path / "var"
    database = data_dir / "trellis.db"
    trellis = Trellis(data_dir, f"sqlite:///{database}")
    trellis.run("init", "--trust-domain", "example.org")
    database.chmod(0o400)
    listed = _run(trellis, "entry", "list")
    assert listed.returncode == 0, listed.stderr
    assert f"{database} was mode 0400: set to 0600" in listed.stderr
    assert {p.name: _mode(p) for p in _files(database) if p.exists()} == {"trellis.db": 0o600}

    database.chmod(0o400)
    for journal in _files(database)[1:3]:  # left behind read-only, by hand or by an old Trellis
        journal.touch()
        journal.chmod(0o400)
    created = _run(trellis, "token", "create", "--admin", "--ttl", "1h")
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith("trellis-admin-")
    for path in _files(database)[:3]:
        assert f"{path} was mode 0400: set to 0600" in created.stderr, created.stderr
    assert all(_mode(p) == 0o600 for p in _files(database) if p.exists())
