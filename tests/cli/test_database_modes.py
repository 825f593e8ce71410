"""A SQLite database outside the data dir is Trellis's alone, like its keys: a loose file (and
its -wal and -shm, which SQLite makes with the database's mode) is tightened to 0600 with a
warning; a directory any user may write to is refused (exit 2, one line), one its group may
write to is used with a warning. Real ``trellis`` processes."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tests.cli.test_walkthrough import Trellis

pytestmark = pytest.mark.slow


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _outside(tmp_path: Path, directory_mode: int) -> tuple[Trellis, Path]:
    """A CLI whose database is ``extdb/y.db``, made by hand 0666 in a directory of
    ``directory_mode`` (``mkdir -m``, ``touch``, ``chmod``)."""
    directory = tmp_path / "extdb"
    directory.mkdir()
    directory.chmod(directory_mode)
    database = directory / "y.db"
    database.touch()
    database.chmod(0o666)
    return Trellis(tmp_path / "ext-var", f"sqlite:///{database}"), database


def test_a_loose_database_file_is_tightened_with_a_warning(tmp_path: Path) -> None:
    trellis, database = _outside(tmp_path, 0o755)
    result = trellis.run("init", "--trust-domain", "e.org")
    assert _mode(database) == 0o600
    assert f"warning: {database} was mode 0666: tightened to 0600" in result.stderr
    again = trellis.run("certs", "list")
    assert "warning" not in again.stderr, again.stderr


def test_its_journals_are_0600_too(tmp_path: Path) -> None:
    """SQLite creates the -wal and -shm with the database file's mode: before, a database
    left 0666 had both 0666 while ``serve`` ran. Ones left behind loose are tightened too."""
    trellis, database = _outside(tmp_path, 0o755)
    trellis.run("init", "--trust-domain", "e.org")
    journals = [Path(f"{database}-wal"), Path(f"{database}-shm")]
    database.chmod(0o666)
    with trellis.serving(tmp_path / "serve.log"):
        assert {p.name: _mode(p) for p in [database, *journals]} == {
            "y.db": 0o600,
            "y.db-wal": 0o600,
            "y.db-shm": 0o600,
        }
    for journal in journals:  # planted loose, before the first connection opens them
        journal.touch()
        journal.chmod(0o666)
    database.chmod(0o666)
    with trellis.serving(tmp_path / "serve2.log") as serving:
        assert {p.name: _mode(p) for p in [database, *journals]} == {
            "y.db": 0o600,
            "y.db-wal": 0o600,
            "y.db-shm": 0o600,
        }
        assert serving.process.poll() is None
    log = (tmp_path / "serve2.log").read_text()
    for path in [database, *journals]:
        assert f"{path} was mode 0666: tightened to 0600" in log, log


@pytest.mark.parametrize("directory_mode", [0o777, 0o1777], ids=["0777", "sticky-1777"])
def test_a_directory_anyone_may_write_to_is_refused(tmp_path: Path, directory_mode: int) -> None:
    """Another user could put a -wal of their own beside the database (the sticky bit stops
    renames, not a new file), or without the sticky bit the database itself: an admin token
    row of their making. Refused before anything is made or changed."""
    trellis, database = _outside(tmp_path, directory_mode)
    result = trellis.run("init", "--trust-domain", "e.org", ok=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"trellis: the SQLite database {database} is in {database.parent}")
    assert f"which any user may write to (mode {directory_mode:04o})" in lines[0]
    assert _mode(database.parent) == directory_mode  # not Trellis's to change
    assert _mode(database) == 0o666 and database.stat().st_size == 0
    assert not trellis.data_dir.exists()


def test_a_directory_its_group_may_write_to_is_used_with_a_warning(tmp_path: Path) -> None:
    trellis, database = _outside(tmp_path, 0o775)
    result = trellis.run("init", "--trust-domain", "e.org")
    assert (
        f"warning: the SQLite database {database} is in {database.parent}, which its group may"
        " write to (mode 0775)"
    ) in result.stderr
    assert _mode(database.parent) == 0o775
    assert _mode(database) == 0o600


def test_the_data_dir_is_judged_once(tmp_path: Path) -> None:
    """The default database lives in the data dir, which ``data_directory`` tightens to 0700
    (with its own warning): no second warning about the same directory."""
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    data_dir.chmod(0o777)
    trellis = Trellis(data_dir, f"sqlite:///{data_dir / 'trellis.db'}")
    result = trellis.run("init", "--trust-domain", "e.org")
    assert result.stderr.count("warning") == 1, result.stderr
    assert f"{data_dir} was mode 0777: tightened to 0700" in result.stderr
    assert _mode(data_dir / "trellis.db") == 0o600
