"""A database at an older schema revision, as after installing a newer Trellis: only
``trellis migrate``, ``trellis serve`` and ``init --exists-ok`` (what deploy/ runs before
``serve``) migrate it. Every other command leaves it as it is, so the backup taken before an
upgrade still restores into the version that made it, and a newer CLI run against a
PostgreSQL shared with older replicas does not change the schema under them. Real ``trellis``
processes, on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import socket
import tarfile
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command

from ca.store import db
from tests.cli.test_walkthrough import Trellis
from tests.conftest import free_port

pytestmark = pytest.mark.slow

OLDER = "0012"
HEAD = ",".join(sorted(db.SCHEMA_HEADS))
OUTDATED = (
    f"trellis: the database schema ({OLDER}) is older than this Trellis ({HEAD}): take a"
    " backup, then run 'trellis migrate' (or start 'trellis serve')\n"
)


def _url(cli: Trellis) -> str:
    return cli.env["TRELLIS_DATABASE_URL"]


def _downgrade(url: str, revision: str = OLDER) -> None:
    """The database at ``url`` taken back to ``revision``: the install of an older Trellis,
    with its CA, as the newer one finds it."""
    engine = db.connect(url)
    config = db._config()
    try:
        with engine.connect() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, revision)
            connection.commit()
    finally:
        engine.dispose()


def _revision(url: str) -> str:
    engine = db.connect(url)
    try:
        with engine.connect() as connection:
            rows = connection.exec_driver_sql("SELECT version_num FROM alembic_version").all()
    finally:
        engine.dispose()
    return ",".join(sorted(row[0] for row in rows))


@pytest.fixture
def older(trellis: Trellis) -> Trellis:
    _downgrade(_url(trellis))
    assert _revision(_url(trellis)) == OLDER
    return trellis


@pytest.mark.parametrize(
    "args",
    [
        ("certs", "list"),
        ("audit", "verify"),
        ("init", "--trust-domain", "example.org"),
        ("gateway", "init"),
    ],
    ids=["certs-list", "audit-verify", "init", "gateway-init"],
)
def test_a_command_refuses_an_older_schema_and_leaves_it(older: Trellis, args: tuple[str]) -> None:
    refused = older.run(*args, ok=False)
    assert (refused.returncode, refused.stdout, refused.stderr) == (7, "", OUTDATED)
    assert _revision(_url(older)) == OLDER


def test_migrate_brings_the_schema_to_the_head_once(older: Trellis) -> None:
    migrated = older.run("migrate")
    assert migrated.stdout == f"migrated the database schema from {OLDER} to {HEAD}\n"
    assert _revision(_url(older)) == HEAD
    again = older.run("migrate")
    assert again.stdout == f"the database schema is already at {HEAD}: nothing to do\n"
    assert older.json("migrate") == {"from": HEAD, "to": HEAD, "migrated": False}
    certs = older.json("certs", "list")
    assert certs == []


def test_migrate_json_names_both_revisions(older: Trellis) -> None:
    assert older.json("migrate") == {"from": OLDER, "to": HEAD, "migrated": True}


def test_init_exists_ok_migrates_as_serve_does(older: Trellis) -> None:
    """deploy/ runs it just before 'serve' (systemd's ExecStartPre, the StatefulSet's init
    container): refusing there would stop every upgrade of those installs."""
    older.run("init", "--exists-ok", "--trust-domain", "example.org")
    assert _revision(_url(older)) == HEAD


def test_init_exists_ok_refused_leaves_the_older_schema(older: Trellis) -> None:
    """Regression: ``init --exists-ok`` for another trust domain migrated the schema, then
    refused (a CA for example.org exists): the one step that cannot be undone, for nothing.
    Only an init that goes on migrates."""
    refused = older.run("init", "--exists-ok", "--trust-domain", "other.org", ok=False)
    assert refused.returncode == 6
    assert "a CA for example.org already exists" in refused.stderr
    assert _revision(_url(older)) == OLDER


def test_serve_migrates_and_logs_which_replica_did(older: Trellis, tmp_path: Path) -> None:
    """Regression: the schema changed under the other replicas without a line in any log."""
    log = tmp_path / "serve.log"
    with older.serving(log):
        assert _revision(_url(older)) == HEAD
    logged = [line for line in log.read_text().splitlines() if "database schema" in line]
    assert len(logged) == 1, log.read_text()
    assert f"migrated the database schema from {OLDER} to {HEAD} (node " in logged[0]
    assert f", host {socket.gethostname()}, pid " in logged[0]

    with older.serving(tmp_path / "again.log"):  # nothing to migrate: nothing said
        pass
    assert "database schema" not in (tmp_path / "again.log").read_text()


def test_serve_on_a_port_in_use_leaves_the_older_schema(older: Trellis) -> None:
    """Regression: serve migrated the database, then found the port taken (exit 8): the
    schema changed under the other replicas, and no log line said so, for a server that never
    started. The port is bound first."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = older.run("serve", "--port", str(port), ok=False)
    assert (refused.returncode, refused.stdout) == (8, ""), refused
    assert refused.stderr == f"trellis: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    assert _revision(_url(older)) == OLDER


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_migrate_needs_the_database_only(older: Trellis, tmp_path: Path) -> None:
    """docs/cli.md: "It needs the database only". With a PostgreSQL URL and no data dir (a
    migration run from a Job or an operator's laptop) it stopped with exit 7, "no Trellis data
    dir"; the data dir holds keys and files, which no migration touches."""
    elsewhere = Trellis(tmp_path / "no-such-dir", _url(older))
    del elsewhere.env["TRELLIS_KEY_PASSPHRASE"]
    migrated = elsewhere.run("migrate", ok=False)
    assert (migrated.returncode, migrated.stderr) == (0, "")
    assert migrated.stdout == f"migrated the database schema from {OLDER} to {HEAD}\n"
    assert _revision(_url(older)) == HEAD
    assert not (tmp_path / "no-such-dir").exists()


def test_migrate_without_a_sqlite_database_creates_none(tmp_path: Path) -> None:
    """On SQLite the database is a file: a missing one is refused, not made empty."""
    cli = Trellis(tmp_path / "var", f"sqlite:///{tmp_path / 'nothing.db'}")
    refused = cli.run("migrate", ok=False)
    assert refused.returncode == 7
    assert refused.stderr.startswith(f"trellis: no Trellis database at {tmp_path / 'nothing.db'}")
    assert not (tmp_path / "nothing.db").exists()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_backup_keeps_an_older_schema_and_restores_it(older: Trellis, tmp_path: Path) -> None:
    """The backup taken before an upgrade (with either version) is the way back: it holds the
    schema as it was, and the restored copy is migrated when asked to."""
    archive = tmp_path / "before-upgrade.tgz"
    written = older.json("backup", "--out", str(archive))
    assert isinstance(written, dict) and written["schema"] == OLDER
    assert _revision(_url(older)) == OLDER
    with tarfile.open(archive) as opened:
        manifest = opened.extractfile("manifest.json")
        assert manifest is not None and json.load(manifest)["schema"] == OLDER

    restored = Trellis(tmp_path / "restored", f"sqlite:///{tmp_path / 'restored.db'}")
    restored.env["TRELLIS_KEY_PASSPHRASE"] = older.env["TRELLIS_KEY_PASSPHRASE"]
    restored.run("restore", str(archive))
    assert _revision(_url(restored)) == OLDER
    assert restored.run("certs", "list", ok=False).returncode == 7
    restored.run("migrate")
    assert _revision(_url(restored)) == HEAD
    assert restored.json("certs", "list") == []


def test_an_up_to_date_database_is_left_to_every_command(trellis: Trellis) -> None:
    """No regression for the usual case: nothing to migrate, nothing refused."""
    assert trellis.json("migrate") == {"from": HEAD, "to": HEAD, "migrated": False}
    assert trellis.json("certs", "list") == []


def test_a_database_without_a_schema_is_given_one(tmp_path: Path, database_url: str) -> None:
    """Nothing to roll back and no older Trellis using it: creating the schema is safe for any
    command, as it always was (an init that failed before its first migration, say)."""
    cli = Trellis(tmp_path / "var", database_url)
    (tmp_path / "var").mkdir(mode=0o700)
    engine = db.connect(database_url)  # an empty database (SQLite: an empty file)
    try:
        with engine.connect() as connection:
            assert not sa.inspect(connection).get_table_names()
    finally:
        engine.dispose()
    assert cli.json("migrate") == {"from": None, "to": HEAD, "migrated": True}
    assert _revision(database_url) == HEAD


@pytest.mark.parametrize(
    "args",
    [("migrate",), ("init", "--exists-ok", "--trust-domain", "example.org"), ("serve",)],
    ids=["migrate", "init-exists-ok", "serve"],
)
def test_a_migration_the_database_refuses_is_one_line_exit_8(
    older: Trellis, args: tuple[str, ...]
) -> None:
    """A column made by hand where 0015 adds its own: SQLAlchemy's error came out (on SQLite
    as 'cannot reach the database', on PostgreSQL as a traceback, exit 1). Now one line naming
    the revision that failed and where the database stays, exit 8, and it stays there."""
    engine = db.connect(_url(older))
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("ALTER TABLE ocsp_responder ADD COLUMN generation INTEGER")
    finally:
        engine.dispose()
    if args == ("serve",):
        args = ("serve", "--port", str(free_port()))
    refused = older.run(*args, ok=False)
    prefix = (
        f"trellis: the schema migration to revision 0015 failed and was rolled back (the"
        f" database stays at revision {OLDER}): "
    )
    assert (refused.returncode, refused.stdout) == (8, "")
    assert refused.stderr.startswith(prefix) and refused.stderr.count("\n") == 1, refused.stderr
    assert "generation" in refused.stderr
    assert _revision(_url(older)) == OLDER
