"""A SQLite database its owner may not write (``chmod 400``, a file handed to another user)
does not leave Trellis refusing writes for good once it may write it again. Real ``trellis``
processes, run as root without the capabilities that let root write any file (``setpriv``), so
that file modes apply to them as to any other user."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.api.restkit import bearer, make_csr
from tests.cli.test_walkthrough import TRELLIS, Trellis

pytestmark = pytest.mark.slow

# Root keeps CAP_FOWNER (to chmod what it does not own): Trellis only changes its own files.
WITHOUT_DAC = (
    ("setpriv", "--bounding-set=-dac_override,-dac_read_search") if os.geteuid() == 0 else ()
)
NOBODY = 65534


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


@pytest.mark.skipif(os.geteuid() != 0, reason="handing the database to another user needs root")
def test_a_server_that_met_a_read_only_database_issues_once_it_is_writable(
    tmp_path: Path,
) -> None:
    """A database Trellis may read but not write, and cannot chmod (another user's, 0644):
    ``serve`` opens it read-only. Before, the connections opened so were kept after a write
    was refused (the pool's, and the group commit's): once the file was writable again every
    issuance stayed a 503 "the database cannot be reached right now" until a restart, while
    ``/readyz`` ran ``SELECT 1`` and said the database was ok throughout."""
    data_dir = tmp_path / "var"
    database = data_dir / "trellis.db"
    trellis = Trellis(data_dir, f"sqlite:///{database}")
    trellis.run("init", "--trust-domain", "example.org")
    entry = trellis.run("entry", "create", "--spiffe-id", "spiffe://example.org/w").stdout
    token = trellis.run("token", "create", "--entry", entry.strip(), "--uses", "5").stdout.strip()
    with trellis.serving(tmp_path / "first.log"):  # prepares the serving certificate: a write
        pass
    os.chown(database, NOBODY, -1)
    database.chmod(0o644)

    with trellis.serving(tmp_path / "serve.log", wrapper=WITHOUT_DAC, up="/healthz") as serving:

        def issue() -> httpx.Response:
            return httpx.post(
                f"{serving.url}/v1/svid",
                json={"csr": make_csr()[1]},
                headers=bearer(token),
                verify=serving.tls,
                timeout=30,
            )

        def ready() -> httpx.Response:
            return httpx.get(f"{serving.url}/readyz", verify=serving.tls, timeout=30)

        refused = issue()
        assert refused.status_code == 503, refused.text
        unready = ready()
        assert unready.status_code == 503, unready.text
        assert unready.json()["detail"]["database"].startswith("unavailable")

        # Writable again, by its owner: the journals too, which SQLite made with the
        # database's owner and mode
        for path in _files(database):
            if path.exists():
                os.chown(path, os.geteuid(), -1)

        issued = issue()  # the first request after: no connection opened read-only is kept
        assert issued.status_code == 200, issued.text
        assert ready().status_code == 200, ready().text
        assert serving.process.poll() is None
