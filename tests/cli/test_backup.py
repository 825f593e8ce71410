"""``trellis backup`` and ``trellis restore``: what the archive holds, and restores that are
refused (a bad archive, a database that holds a CA) or fail part-way, which leave the data dir
and the database as they were.

In-process through ``cli.main.main`` (the entry point's own error handling), as
tests/gateway/test_gateway_cli.py does; tests/cli/test_operations.py runs the round trip as
real processes, and tests/cli/test_backup_processes.py what only a process shows (its peak
memory, a write that fails part-way, the umask).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from ca import audit, backup
from ca.config import Settings, build_context
from ca.errors import Unavailable
from ca.serving import ensure_server_certificate
from tests.ca.test_migration_upgrade import _at_revision
from tests.conftest import PASSPHRASE
from tests.gateway.test_gateway_cli import Cli

Files = dict[str, bytes | None]  # a member's content; None: a symbolic link


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The backup of a CA with an OpenVPN authority (its tls-crypt keys are sealed files under
    secrets/) and a serving certificate (server/)."""
    root = tmp_path_factory.mktemp("source")
    data = root / "var"
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TRELLIS_DATABASE_URL", raising=False)
        patch.setenv("TRELLIS_KEY_PASSPHRASE", PASSPHRASE)
        for args in (
            ["init", "--trust-domain", "example.org"],
            ["openvpn", "init"],
            ["openvpn", "configure", "--remote", "vpn.example.org"],
            ["openvpn", "client", "add", "alice", "--out", str(root / "alice.ovpn")],
        ):
            _main("--data-dir", str(data), *args)
        ctx = build_context(Settings(data_dir=data))
        try:
            ensure_server_certificate(ctx)  # what 'trellis serve' does first
        finally:
            ctx.close()
        _main("--data-dir", str(data), "backup", "--out", str(root / "backup.tgz"))
    return root / "backup.tgz"


def _main(*args: str) -> None:
    from cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(list(args))
        raise SystemExit(0)
    assert exited.value.code in (0, None), args


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    monkeypatch.delenv("TRELLIS_DATABASE_URL", raising=False)
    monkeypatch.delenv("TRELLIS_DATA_DIR", raising=False)
    monkeypatch.setenv("TRELLIS_KEY_PASSPHRASE", PASSPHRASE)
    return Cli(capsys)


def test_the_archive_holds_secrets_and_a_restored_openvpn_authority_issues(
    archive: Path, cli: Cli, tmp_path: Path
) -> None:
    """secrets/ was left out: the restored instance could not make another .ovpn profile (the
    tls-crypt-v2 server key was missing). Restored files are 0600 (the bundle and the serving
    certificate 0644), directories 0700 (server/ was 0755)."""
    with tarfile.open(archive) as opened:
        names = set(opened.getnames())
    assert any(name.startswith("secrets/") and name.endswith(".sealed") for name in names)
    assert {"server/tls.crt", "server/tls.key"} <= names
    restored = tmp_path / "restored"
    cli.run("--data-dir", str(restored), "restore", str(archive))
    cli.run("--data-dir", str(restored), "openvpn", "client", "add", "bob",
            "--out", str(tmp_path / "bob.ovpn"))  # fmt: skip
    assert (tmp_path / "bob.ovpn").read_text().count("<tls-crypt-v2>") == 1
    public = {"bundle.pem", "server/tls.crt"}
    for path in [restored, *restored.rglob("*")]:
        name = path.relative_to(restored).as_posix()
        wanted = 0o700 if path.is_dir() else 0o644 if name in public else 0o600
        assert path.stat().st_mode & 0o777 == wanted, name
    assert {"keys", "secrets", "server"} <= {p.name for p in restored.iterdir() if p.is_dir()}


def test_restore_asks_for_the_key_passphrase_of_what_it_restored(
    archive: Path, cli: Cli, tmp_path: Path
) -> None:
    """File keys and sealed secrets (keys/, secrets/) are what the passphrase decrypts; a Vault
    instance's archive has neither (tests/vault/test_vault_cli.py)."""
    said = cli.run("--data-dir", str(tmp_path / "restored"), "restore", str(archive))
    assert "set TRELLIS_KEY_PASSPHRASE (or restore the key-passphrase file)" in said
    shown = cli.json("--data-dir", str(tmp_path / "again"), "restore", str(archive))
    assert shown["needs_key_passphrase"] is True
    again = tmp_path / "again.tgz"
    said = cli.run("--data-dir", str(tmp_path / "restored"), "backup", "--out", str(again))
    assert "the key passphrase is NOT in the backup: keep it somewhere else" in said


def test_restore_never_replaces_a_database_that_holds_a_ca(
    archive: Path, cli: Cli, tmp_path: Path
) -> None:
    """The database may live outside the data dir: an empty data dir with TRELLIS_DATABASE_URL
    pointing at another CA's database overwrote that CA (exit 0)."""
    cli.run("--data-dir", str(tmp_path / "other"), "init", "--trust-domain", "other.example")
    other = tmp_path / "other" / "trellis.db"
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not SQLite, but someone's file\n" * 100)
    for database in (other, garbage):
        before = database.read_bytes()
        refused = cli.run("--data-dir", str(tmp_path / "new"), "--database-url",
                          f"sqlite:///{database}", "restore", str(archive), code=6)  # fmt: skip
        assert f"the database {database} already exists" in refused, refused
        assert refused.count("\n") == 1
        assert database.read_bytes() == before
        assert not (tmp_path / "new").exists()
    with sqlite3.connect(other) as connection:
        assert connection.execute("SELECT trust_domain FROM authority").fetchall() == [
            ("other.example",)
        ]
    # PostgreSQL restores with pg_restore (docs/operations.md): refused before connecting.
    postgres = "postgresql://trellis@127.0.0.1:1/trellis"
    assert "pg_dump" in cli.run("--data-dir", str(tmp_path / "new"), "--database-url", postgres,
                                "restore", str(archive), code=2)  # fmt: skip
    # An empty file where the database goes holds nothing: it is replaced.
    empty = tmp_path / "elsewhere" / "trellis.db"
    empty.parent.mkdir()
    empty.touch()
    cli.run("--data-dir", str(tmp_path / "new"), "--database-url", f"sqlite:///{empty}",
            "restore", str(archive))  # fmt: skip
    assert cli.run("--data-dir", str(tmp_path / "new"), "--database-url", f"sqlite:///{empty}",
                   "bundle", "show").startswith("-----BEGIN CERTIFICATE")  # fmt: skip


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _listed(name: str, data: bytes | None = b"x") -> Callable[[Files, dict[str, Any]], object]:
    """A case: ``name`` in the archive (``data``) and in the manifest with its digest."""

    def edit(files: Files, manifest: dict[str, Any]) -> None:
        files[name] = data
        manifest["files"][name] = _sha(data or b"")

    return edit


def _duplicate(files: Files, manifest: dict[str, Any]) -> bytes:
    pairs = [*manifest["files"].items(), ("bundle.pem", manifest["files"]["bundle.pem"])]
    listed = ", ".join(f'"{name}": "{digest}"' for name, digest in pairs)
    return f'{{"format": "{manifest["format"]}", "schema": null, "files": {{{listed}}}}}'.encode()


def _without_database(files: Files, manifest: dict[str, Any]) -> None:
    del files["trellis.db"], manifest["files"]["trellis.db"]


def _database(edit: Callable[[sqlite3.Connection], object] | None = None) -> Callable[..., None]:
    """A case: the archive's database replaced by what ``edit`` makes of it (a database of
    its own when ``edit`` is None), with the right digest: the digest says nothing about
    whether it is a Trellis database."""

    def replace(files: Files, manifest: dict[str, Any]) -> None:
        with closing(sqlite3.connect(":memory:")) as connection:
            if edit is None:
                connection.execute("CREATE TABLE notes (body TEXT)")
                connection.execute("INSERT INTO notes VALUES ('someone else''s')")
            else:
                snapshot = bytearray(files["trellis.db"] or b"")
                snapshot[18:20] = b"\x01\x01"  # the rollback journal: no WAL in memory
                connection.deserialize(bytes(snapshot))
                edit(connection)
            connection.commit()
            data = connection.serialize()
        _listed("trellis.db", data)(files, manifest)

    return replace


def _future_schema(connection: sqlite3.Connection) -> None:
    connection.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")


def _no_core_tables(connection: sqlite3.Connection) -> None:
    connection.execute("DROP TABLE certificate")


def _no_audit_seal_table(connection: sqlite3.Connection) -> None:
    connection.execute("DROP TABLE audit_seal")


def _no_requested_by_column(connection: sqlite3.Connection) -> None:
    connection.execute("ALTER TABLE certificate DROP COLUMN requested_by")


BAD_ARCHIVES: dict[str, Callable[[Files, dict[str, Any]], object]] = {
    "manifest/no-files": lambda files, manifest: manifest.pop("files"),
    "manifest/a-list": lambda files, manifest: json.dumps([manifest]).encode(),
    "manifest/files-a-list": lambda files, manifest: manifest.update(files=list(files)),
    "manifest/not-json": lambda files, manifest: b"{files: none",
    "manifest/name-twice": _duplicate,
    "manifest/digest-not-hex": lambda files, manifest: manifest["files"].update(
        {"bundle.pem": "not-a-digest"}
    ),
    "name/dot": _listed("."),
    "name/dot-dot": _listed("../escaped"),
    "name/inner-dot-dot": _listed("keys/../../escaped"),
    "name/absolute": _listed("/tmp/trellis-restore-escaped"),
    "name/keys-as-a-file": _listed("keys"),
    "name/file-under-a-file": _listed("bundle.pem/x"),
    "name/wal-beside-the-database": _listed("trellis.db-wal"),
    "name/key-passphrase": _listed("key-passphrase"),
    "member/missing": lambda files, manifest: manifest["files"].update({"keys/gone.pem": "0" * 64}),
    "member/symlink": _listed("keys/link.pem", None),
    "member/checksum": lambda files, manifest: files.update({"bundle.pem": b"tampered"}),
    "database/missing": _without_database,
    # Each was restored (exit 0), and every later command then failed (exit 8).
    "database/not-sqlite": _listed("trellis.db", b"not a database at all" * 100),
    "database/another-schema": _database(),
    "database/no-certificate-table": _database(_no_core_tables),
    "database/newer-schema": _database(_future_schema),
    # Restored (exit 0): only six core tables were checked, and audit verify and audit seal
    # then failed on "no such table: audit_seal" (exit 8).
    "database/no-audit-seal-table": _database(_no_audit_seal_table),
    "database/no-certificate-column": _database(_no_requested_by_column),
    # Each was exit 8, naming the staging directory ("File exists", "File name too long",
    # the latter in a message kilobytes long).
    "name/file-and-directory": lambda files, manifest: [
        _listed("keys/a")(files, manifest),
        _listed("keys/a/b")(files, manifest),
    ],
    "name/directory-and-file": lambda files, manifest: [
        _listed("keys/a/b")(files, manifest),
        _listed("keys/a")(files, manifest),
    ],
    "name/part-too-long": _listed("keys/" + "A" * 300),
    "name/too-long": _listed("keys/" + "/".join(["d" * 200] * 25)),
    "name/too-deep": _listed("keys/" + "/".join(["d"] * 2000)),
    "name/not-utf-8": _listed("keys/\udcff"),
    # Read into memory whole: a 7 MB archive inflating to 1.5 GiB took 1.7 GB of memory.
    "member/larger-than-a-key": _listed("keys/big.pem", b"0" * (2**20 + 1)),
}


def _tampered(archive: Path, out: Path, edit: Callable[[Files, dict[str, Any]], object]) -> Path:
    with tarfile.open(archive) as opened:
        files: Files = {}
        for member in opened.getmembers():
            handle = opened.extractfile(member)
            assert handle is not None
            files[member.name] = handle.read()
    manifest = json.loads(files.pop("manifest.json") or b"")
    raw = edit(files, manifest)
    files["manifest.json"] = raw if isinstance(raw, bytes) else json.dumps(manifest).encode()
    with tarfile.open(out, "w:gz") as written:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                written.addfile(info)
            else:
                info.size = len(data)
                written.addfile(info, io.BytesIO(data))
    return out


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Path]:
    """A directory whose listing a refused restore must not change (nothing staged beside the
    data dir, nothing left in it)."""
    place = tmp_path / "place"
    place.mkdir()
    (place / "empty").mkdir(mode=0o700)
    yield place


@pytest.mark.parametrize("case", list(BAD_ARCHIVES))
def test_a_bad_archive_is_refused_whole_and_writes_nothing(
    case: str, archive: Path, cli: Cli, tmp_path: Path, workspace: Path
) -> None:
    """Each was a traceback (exit 1), a half-restored data dir that a retry then found "not
    empty" (exit 8), or a success without a database (exit 0)."""
    bad = _tampered(archive, tmp_path / "bad.tgz", BAD_ARCHIVES[case])
    for data_dir in (workspace / "absent", workspace / "empty"):
        refused = cli.run("--data-dir", str(data_dir), "restore", str(bad), code=2)
        assert refused.startswith("trellis: ") and refused.count("\n") == 1, refused
        assert len(refused) < 300 and ".restore-" not in refused, refused
        assert sorted(p.name for p in workspace.iterdir()) == ["empty"], case
        assert list((workspace / "empty").iterdir()) == []
    assert not Path("/tmp/trellis-restore-escaped").exists()
    assert not (tmp_path / "escaped").exists()
    cli.run("--data-dir", str(workspace / "empty"), "restore", str(archive))  # a retry works


def test_restore_reports_the_database_s_schema_and_takes_an_older_one(
    archive: Path, cli: Cli, tmp_path: Path
) -> None:
    """A database at 0008 (tables later revisions add are missing, as they should be) in an
    archive whose manifest says otherwise: restored, and reported as 0008, not as the
    manifest's revision, which nothing checks (it said "schema 0016", --json too)."""
    older = tmp_path / "older.db"
    _at_revision(f"sqlite:///{older}", "0008").dispose()
    bad = _tampered(archive, tmp_path / "older.tgz", _listed("trellis.db", older.read_bytes()))
    with tarfile.open(bad) as opened:
        manifest = json.loads(opened.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert manifest["schema"] not in (None, "0008")
    restored = cli.json("--data-dir", str(tmp_path / "restored"), "restore", str(bad))
    assert restored["schema"] == "0008"


def test_a_restore_of_a_schema_before_the_audit_trail_is_restored_unrecorded(
    archive: Path, cli: Cli, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Revision 0007 has no audit_log (0008 adds it): nothing to record the restore in, which
    must not refuse the restore; the first 'trellis serve' migrates the database."""
    older = tmp_path / "older.db"
    _at_revision(f"sqlite:///{older}", "0007").dispose()
    bad = _tampered(archive, tmp_path / "older.tgz", _listed("trellis.db", older.read_bytes()))
    with caplog.at_level(logging.WARNING, logger="trellis.backup"):
        restored = cli.json("--data-dir", str(tmp_path / "restored"), "restore", str(bad))
    assert restored["schema"] == "0007"
    assert "has no audit trail: the restore is not recorded" in caplog.text
    with closing(sqlite3.connect(tmp_path / "restored" / "trellis.db")) as connection:
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master")}
    assert "audit_log" not in tables


def test_a_restore_that_fails_while_writing_leaves_nothing_behind(
    archive: Path, cli: Cli, tmp_path: Path, workspace: Path
) -> None:
    """A file where the database's directory should be: exit 8, and the data dir is absent
    again (nothing staged is left, inside it or beside it)."""
    (tmp_path / "a-file").write_text("not a directory\n")
    database = f"sqlite:///{tmp_path / 'a-file' / 'trellis.db'}"
    failed = cli.run("--data-dir", str(workspace / "absent"), "--database-url", database,
                     "restore", str(archive), code=8)  # fmt: skip
    assert failed.startswith("trellis: ") and failed.count("\n") == 1, failed
    assert sorted(p.name for p in workspace.iterdir()) == ["empty"]
    cli.run("--data-dir", str(workspace / "absent"), "restore", str(archive))


def test_a_backup_path_that_is_not_a_file_is_a_usage_error(cli: Cli, tmp_path: Path) -> None:
    """docs/cli.md: a path that is not there is the argument's mistake (exit 2); a file there
    that cannot be read would be exit 8."""
    for path in (tmp_path / "nonexistent.tgz", tmp_path):
        refused = cli.run("--data-dir", str(tmp_path / "var"), "restore", str(path), code=2)
        assert refused == f"trellis: {path}: no such backup file\n"
    unreadable = cli.run("--data-dir", str(tmp_path / "var"), "restore", "/proc/self/mem", code=8)
    assert unreadable.startswith("trellis: /proc/self/mem: cannot be read"), unreadable
    assert not (tmp_path / "var").exists()


def test_the_snapshot_is_taken_beside_the_archive_not_in_tmpdir(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The snapshot went to TMPDIR: memory where /tmp is a tmpfs (a database of gigabytes in
    RAM), and maybe another file system than --out's. A TMPDIR that cannot be used is no
    matter now; the snapshot's temporary file is gone afterwards."""
    cli.run("--data-dir", str(tmp_path / "var"), "init", "--trust-domain", "example.org")
    unusable = tmp_path / "not-a-directory"
    unusable.write_text("TMPDIR points here\n")
    monkeypatch.setattr(tempfile, "tempdir", str(unusable))
    out = tmp_path / "backups" / "b.tgz"
    cli.run("--data-dir", str(tmp_path / "var"), "backup", "--out", str(out))
    assert [p.name for p in out.parent.iterdir()] == ["b.tgz"]
    with tarfile.open(out) as opened:
        assert "trellis.db" in opened.getnames()


def test_a_failed_backup_removes_the_directories_it_made_for_the_archive(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A backup failing part-way (here the disk filling up while the archive is written)
    removed its temporary files but left the missing parents of --out it had made."""
    cli.run("--data-dir", str(tmp_path / "var"), "init", "--trust-domain", "example.org")

    def full(*_: object, **__: object) -> str:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(backup, "_add_file", full)
    failed = cli.run("--data-dir", str(tmp_path / "var"), "backup",
                     "--out", str(tmp_path / "new" / "deep" / "b.tgz"), code=8)  # fmt: skip
    assert failed.startswith("trellis: ") and failed.count("\n") == 1, failed
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    cli.run("--data-dir", str(tmp_path / "var"), "backup",
            "--out", str(tmp_path / "kept" / "b.tgz"), code=8)  # fmt: skip
    assert list((tmp_path / "kept").iterdir()) == []  # an existing directory stays


def test_a_backup_whose_audit_record_cannot_be_written_leaves_no_archive(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The record (``backup.created``) is written before the archive takes its name: a backup
    that cannot be recorded exports nothing, and an earlier archive at --out stays as it was."""
    cli.run("--data-dir", str(tmp_path / "var"), "init", "--trust-domain", "example.org")
    out = tmp_path / "backups" / "b.tgz"
    cli.run("--data-dir", str(tmp_path / "var"), "backup", "--out", str(out))
    earlier = out.read_bytes()

    def locked(*_: object, **__: object) -> None:
        raise Unavailable("the database is locked")

    monkeypatch.setattr(audit, "record", locked)
    failed = cli.run("--data-dir", str(tmp_path / "var"), "backup", "--out", str(out), code=8)
    assert failed == "trellis: the database is locked\n"
    assert [p.name for p in out.parent.iterdir()] == ["b.tgz"] and out.read_bytes() == earlier


def test_an_archive_over_the_limits_is_refused_before_it_is_read(
    archive: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch, workspace: Path
) -> None:
    """The limits (docs/operations.md) are checked on each tar header, before its member is
    read: the real ones are far above this archive, so they are lowered here."""
    for limit, value in (
        ("MAX_DATABASE_BYTES", 4096),
        ("MAX_FILES_TOTAL_BYTES", 1024),
        ("MAX_FILES", 3),
    ):
        with monkeypatch.context() as patch:
            patch.setattr(backup, limit, value)
            refused = cli.run("--data-dir", str(workspace / "empty"), "restore", str(archive),
                              code=2)  # fmt: skip
        assert refused.startswith("trellis: ") and refused.count("\n") == 1, refused
        assert sorted(p.name for p in workspace.iterdir()) == ["empty"], limit
        assert list((workspace / "empty").iterdir()) == [], limit


KILLED_AFTER_TWO_MOVES = """
import os, pathlib, signal, sys
from cli.main import main
rename, moved = pathlib.Path.rename, []
def killing(self, target):
    result = rename(self, target)
    moved.append(target)
    if len(moved) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return result
pathlib.Path.rename = killing
main(sys.argv[1:])
"""


def _restore_killed(script: str, args: list[str], archive: Path, cwd: Path | None = None) -> None:
    """``trellis *args restore archive`` run by ``script``, which SIGKILLs it part way."""
    killed = subprocess.run(
        [sys.executable, "-c", script, *args, "restore", str(archive)],
        env={**os.environ, "TRELLIS_KEY_PASSPHRASE": PASSPHRASE},
        capture_output=True,
        check=False,
        timeout=60,
        cwd=cwd,
    )
    assert killed.returncode == -9, killed


def test_a_restore_killed_part_way_is_named_by_the_retry(
    archive: Path, cli: Cli, tmp_path: Path
) -> None:
    """kill -9 runs no clean-up: the retry said only "is not empty". It now says a restore
    was interrupted, and what to remove (the staged database copy lies beside a database
    outside the data dir); once removed, the retry goes ahead."""
    data_dir, database = tmp_path / "var", tmp_path / "db" / "trellis.db"
    args = ["--data-dir", str(data_dir), "--database-url", f"sqlite:///{database}"]
    _restore_killed(KILLED_AFTER_TWO_MOVES, args, archive)
    staged = [p for p in database.parent.iterdir() if p.name.startswith(".trellis.db.")]
    assert len(staged) == 1 and not database.exists()
    refused = cli.run(*args, "restore", str(archive), code=6)
    assert refused.count("\n") == 1, refused
    assert "a restore was interrupted and left .restore-" in refused, refused
    assert f"remove {data_dir} and {staged[0]} and restore again" in refused, refused
    shutil.rmtree(data_dir)
    staged[0].unlink()
    cli.run(*args, "restore", str(archive))
    assert cli.run(*args, "bundle", "show").startswith("-----BEGIN CERTIFICATE")
    # A working instance (its database is there) is never taken for leftovers to remove.
    (database.parent / ".trellis.db.abcd1234").write_bytes(b"stale")
    refused = cli.run(*args, "restore", str(archive), code=6)
    assert refused.endswith("is not empty: restore only into an empty data directory\n")


KILLED_WHILE_STAGING = """
import os, signal, sys
from ca import backup
from cli.main import main
def killing(path):
    os.kill(os.getpid(), signal.SIGKILL)
backup._check_schema = killing  # once the database is staged, before anything is moved
main(sys.argv[1:])
"""


@pytest.mark.parametrize("database", ["inside", "outside", "default-relative"])
def test_the_staging_files_of_a_restore_killed_before_moving_are_removed_by_the_next(
    archive: Path,
    cli: Cli,
    tmp_path: Path,
    database: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """kill -9 while the database was being staged (the long part: gigabytes) left the
    staging directory and the staged database copy, and every retry refused until they were
    removed by hand. The next restore removes them itself (they are a restore's own names, and
    no restore holds its lock on their directories), unless a restore is running there.
    default-relative: a relative --data-dir (the default ./var is one) with the database in it
    by default; the staged copy's path, resolved, was compared with the data dir's relative
    entries, so it was taken for someone else's file and the retry refused (exit 6)."""
    data_dir = tmp_path / "var"
    target = data_dir / "trellis.db" if database != "outside" else tmp_path / "db" / "trellis.db"
    args = ["--data-dir", str(data_dir), "--database-url", f"sqlite:///{target}"]
    if database == "default-relative":
        monkeypatch.chdir(tmp_path)
        args = ["--data-dir", "var"]
    _restore_killed(KILLED_WHILE_STAGING, args, archive, cwd=tmp_path)

    def listing() -> list[str]:
        return sorted({p.name for p in [*data_dir.iterdir(), *target.parent.iterdir()]})

    left = listing()
    assert [name[:9] for name in left] == [".restore-", ".trellis."], left
    # A restore running there holds the lock: its files are not taken for leftovers.
    fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        refused = cli.run(*args, "restore", str(archive), code=6)
    finally:
        os.close(fd)
    assert refused == f"trellis: a restore or an init into {args[1]} is running: wait for" \
        " it to end, then look again\n"  # fmt: skip
    assert listing() == left
    cli.run(*args, "restore", str(archive))
    assert not [name for name in listing() if name.startswith((".restore-", ".trellis.db."))]
    assert cli.run(*args, "bundle", "show").startswith("-----BEGIN CERTIFICATE")


def test_a_restore_into_an_existing_loose_data_dir_tightens_it(
    archive: Path, cli: Cli, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An existing empty data dir is restored into as it was found: one left 0777 stayed so,
    with the keys under it, until the next command tightened it. docs/cli.md: the data dir is
    0700; restore tightens it, with the warning every other command gives."""
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    data_dir.chmod(0o777)
    with caplog.at_level(logging.WARNING, logger="trellis"):
        cli.run("--data-dir", str(data_dir), "restore", str(archive))
    assert data_dir.stat().st_mode & 0o777 == 0o700
    assert f"{data_dir} was mode 0777: tightened to 0700" in caplog.text, caplog.text
    caplog.clear()
    cli.run("--data-dir", str(data_dir), "bundle", "show")
    assert "tightened" not in caplog.text


KILLED_WHILE_ARCHIVING = """
import os, signal, sys
from ca import backup
from cli.main import main
def killing(*_):
    os.kill(os.getpid(), signal.SIGKILL)
backup._add_file = killing  # once the snapshot is taken and the archive begun
main(sys.argv[1:])
"""


def test_the_temporary_files_of_a_backup_killed_part_way_are_removed_by_the_next(
    cli: Cli, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """kill -9 (a cron job under 'timeout -s KILL') left the snapshot, a 0600 copy of the
    database, and the partial archive beside --out, and nothing removed them: each such run
    took as much disk again. The next backup to that --out removes them, with a warning
    naming each, but never one a backup still running holds (its flock)."""
    data_dir, out = tmp_path / "var", tmp_path / "backups" / "y.tgz"
    cli.run("--data-dir", str(data_dir), "init", "--trust-domain", "example.org")
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_WHILE_ARCHIVING, "--data-dir", str(data_dir), "backup",
         "--out", str(out)],
        env={**os.environ, "TRELLIS_KEY_PASSPHRASE": PASSPHRASE},
        capture_output=True, check=False, timeout=60,
    )  # fmt: skip
    assert killed.returncode == -9, killed
    left = sorted(p.name for p in out.parent.iterdir())  # a partial archive and a snapshot
    assert len(left) == 2 and all(name.startswith(".y.tgz.") for name in left), left
    assert len([name for name in left if name.startswith(".y.tgz.snapshot-")]) == 1, left
    # The snapshot's rollback journal, left where SQLite was killed while copying.
    left.append(".y.tgz.snapshot-zz99zz99-journal")
    (out.parent / left[-1]).write_bytes(b"journal")
    # What a backup running meanwhile holds, and a file of someone else's, stay.
    running = out.parent / ".y.tgz.abcd1234"
    running.write_bytes(b"being written")
    (out.parent / ".y.tgz.notmine").write_bytes(b"x")
    fd = os.open(running, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with caplog.at_level(logging.WARNING, logger="trellis"):
            cli.run("--data-dir", str(data_dir), "backup", "--out", str(out))
    finally:
        os.close(fd)
    assert sorted(p.name for p in out.parent.iterdir()) == [
        ".y.tgz.abcd1234",
        ".y.tgz.notmine",
        "y.tgz",
    ]
    for name in left:
        assert f"removed {out.parent / name}, left by a backup that was interrupted" in (
            caplog.text
        ), caplog.text
    assert "abcd1234" not in caplog.text
