"""A SQLite database URL that would have Trellis and SQLite use different files is refused,
as real ``trellis`` processes see it: one line naming what is wrong, exit 2, and no file made
(docs/configuration.md). tests/ca/test_config_database_url.py tables the URLs themselves."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import tarfile
from contextlib import closing
from pathlib import Path

import pytest

from tests import zygote
from tests.cli.test_walkthrough import Trellis

pytestmark = pytest.mark.slow


def _tree(root: Path) -> dict[str, int]:
    """Every path under ``root`` and its size (0 for a directory): a stray file shows."""
    return {
        str(path.relative_to(root)): 0 if path.is_dir() else path.stat().st_size
        for path in sorted(root.rglob("*"))
    }


def _refused(result: subprocess.CompletedProcess[str], setting: str, message: str) -> None:
    """Exit 2, one line naming the setting and saying ``message`` (the value it repeats is
    cut short, and a password in it masked: not compared)."""
    assert result.returncode == 2, result
    assert result.stderr.startswith(f"trellis: {setting}="), result.stderr
    assert f": {message}" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr


def _tables(database: Path) -> set[str]:
    with closing(sqlite3.connect(database)) as connection:
        return {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}


@pytest.mark.parametrize(
    ("query", "named"),
    [
        # init made 'ca.db' (0 bytes, 0600) and the CA in 'ca.db?cache=private' (0644); the
        # backup was of the empty one, exit 0
        ("?uri=true&cache=private", "'cache', 'uri'"),
        ("?timeout=abc", "'timeout'"),  # a traceback, exit 1
        # the other options (mode=ro: a SAWarning, and read-write) are refused by the same
        # check: tests/ca/test_config_database_url.py has each of them
    ],
)
def test_a_sqlite_url_with_a_query_is_refused_and_makes_nothing(
    tmp_path: Path, query: str, named: str
) -> None:
    existing = tmp_path / "db" / "ca.db"
    cli = Trellis(tmp_path / "var", f"sqlite:///{existing}")
    cli.set_up("init", "--trust-domain", "example.org")
    before = _tree(tmp_path)
    for database, command in (
        (existing, ["certs", "list"]),
        (existing, ["backup", "--out", str(tmp_path / "backup.tgz")]),
        (tmp_path / "new" / "ca.db", ["init", "--trust-domain", "new.example.org"]),
    ):
        url = f"sqlite:///{database}{query}"
        cli.env["TRELLIS_DATABASE_URL"] = url
        refused = f"SQLite query options are not supported ({named}):"
        _refused(cli.run(*command, ok=False), "TRELLIS_DATABASE_URL", refused)
    assert _tree(tmp_path) == before


def test_a_sqlite_url_with_a_host_is_refused(tmp_path: Path) -> None:
    """SQLAlchemy's ArgumentError once the file existed: a traceback, exit 1."""
    existing = tmp_path / "db" / "ca.db"
    cli = Trellis(tmp_path / "var", f"sqlite:///{existing}")
    cli.set_up("init", "--trust-domain", "example.org")
    cli.env["TRELLIS_DATABASE_URL"] = f"sqlite://localhost/{existing}"
    _refused(
        cli.run("certs", "list", ok=False),
        "TRELLIS_DATABASE_URL",
        "a user, password or host in a SQLite URL",
    )


def test_a_sqlite_uri_filename_is_refused(tmp_path: Path) -> None:
    """``sqlite:///file:ca.db`` made the file 'file:ca.db', but the backup snapshot handed
    that name to sqlite3, which read it as a URI: it was of a new, empty 'ca.db' (exit 0)."""
    env = {**os.environ, "TRELLIS_KEY_PASSPHRASE": "walkthrough-passphrase"}
    given = ["--data-dir", "var", "--database-url", "sqlite:///file:ca.db"]
    result = zygote.run([*given, "init", "--trust-domain", "example.org"], env=env, cwd=tmp_path)
    _refused(result, "--database-url", "a SQLite URI filename")
    assert _tree(tmp_path) == {}


@pytest.mark.parametrize(
    "driver",
    ["postgresql+psycopg2", "mysql"],  # the others: test_config_database_url.py
)
def test_another_driver_is_refused_naming_the_urls_taken(tmp_path: Path, driver: str) -> None:
    """The message said "use sqlite or postgresql" to a URL that was postgresql."""
    url = f"{driver}://trellis@127.0.0.1/trellis"
    cli = Trellis(tmp_path / "var", url)
    _refused(
        cli.run("certs", "list", ok=False),
        "TRELLIS_DATABASE_URL",
        f"unsupported database {driver!r}: give sqlite:///path or postgresql://user@host/db"
        " (also postgres:// and postgresql+psycopg://",
    )
    assert _tree(tmp_path) == {}


@pytest.mark.parametrize("name", ["var?a=b", "p%41q"])
def test_the_default_database_is_in_the_data_dir_whatever_its_name(
    tmp_path: Path, name: str
) -> None:
    """The data dir's database was at ``sqlite:///{data_dir}/trellis.db``, a URL in which
    ``var?a=b`` was the file ``var`` and a query, and ``p%41q`` the directory ``pAq``: the CA
    beside the data dir, and left out of what Trellis counts as its own."""
    cli = Trellis(tmp_path / name, "")
    del cli.env["TRELLIS_DATABASE_URL"]
    cli.run("init", "--trust-domain", "example.org")
    cli.run("backup", "--out", str(tmp_path / name / "backup.tgz"))
    assert [path.name for path in tmp_path.iterdir()] == [name]
    assert "certificate" in _tables(tmp_path / name / "trellis.db")
    with tarfile.open(tmp_path / name / "backup.tgz") as archive:
        archive.extract("trellis.db", tmp_path / "unpacked", filter="data")
    assert "certificate" in _tables(tmp_path / "unpacked" / "trellis.db")


def test_restore_checks_the_archive_whatever_the_temporary_directory_is_called(
    tmp_path: Path,
) -> None:
    """A restore migrates the archive's schema in a scratch database under the temporary
    directory, whose URL was ``sqlite:///{path}``: under ``TMPDIR=.../t?a=b`` the scratch
    database was a new, empty file ``.../t`` beside it (the rest a query, ignored with a
    warning), so the check that the archive's schema migrates checked nothing, and the file
    stayed behind."""
    source = Trellis(tmp_path / "a", f"sqlite:///{tmp_path / 'a' / 'trellis.db'}")
    source.set_up("init", "--trust-domain", "example.org")
    source.run("backup", "--out", str(tmp_path / "backup.tgz"))
    temporary = tmp_path / "t?a=b"
    temporary.mkdir()
    restored = Trellis(tmp_path / "b", f"sqlite:///{tmp_path / 'b' / 'trellis.db'}")
    restored.env["TMPDIR"] = str(temporary)
    result = restored.run("restore", str(tmp_path / "backup.tgz"))
    assert "Warning" not in result.stderr, result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a", "b", "backup.tgz", "t?a=b"]
    assert list(temporary.iterdir()) == []
    assert restored.run("bundle", "show").stdout == source.run("bundle", "show").stdout
