"""Backup and restore of a single-node (SQLite) installation.

A backup is a gzip'd tar holding a consistent snapshot of the database (SQLite's online backup
API, so a running server keeps serving), the CA key files and sealed secrets exactly as stored
(still encrypted), the published bundle, the admin token, the serving certificate, and a
manifest with the schema revision and a SHA-256 per file. The key passphrase is deliberately NOT
included: keep it (``TRELLIS_KEY_PASSPHRASE`` or the ``key-passphrase`` file) in a different
place than the backups, or a stolen backup is a stolen CA. What else a data dir holds, and why
it is left out, is listed in docs/operations.md.

A restore goes into an empty data directory and an empty database only (never merge two CAs);
the restored instance serves the same bundle and continues serial and CRL numbering, because
both live in the restored database. The archive is checked whole before anything is written,
and the files are written to a staging directory and moved into place last, so a refused or
failed restore leaves the data dir as it found it. PostgreSQL deployments back up with
``pg_dump`` (docs/operations.md).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sqlite3
import tarfile
import tempfile
import zlib
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from ca.config import Context, Settings
from ca.errors import Conflict, InvalidInput, Unavailable
from ca.files import write_atomic, write_private
from ca.store import db

__all__ = ["BackupResult", "backup", "restore"]

FORMAT = "trellis-backup/1"
_DB_NAME = "trellis.db"
# What a restored instance needs to go on: directories (every file under them) and files.
_DIRECTORIES = ("keys", "secrets", "server")
_FILES = ("bundle.pem", "admin-token")
_PUBLIC = ("bundle.pem", "server/tls.crt")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class BackupResult:
    path: Path
    files: tuple[str, ...]
    schema: str | None


def _sqlite_path(settings: Settings) -> Path:
    url = make_url(db.normalise_url(settings.effective_database_url))
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        raise InvalidInput(
            "trellis backup covers SQLite installations; for PostgreSQL use pg_dump "
            "(see docs/operations.md) and back up the key files or Vault separately"
        )
    return Path(url.database)


def _add(archive: tarfile.TarFile, name: str, data: bytes, mode: int = 0o600) -> str:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    archive.addfile(info, io.BytesIO(data))
    return hashlib.sha256(data).hexdigest()


def backup(ctx: Context, out: Path) -> BackupResult:
    source = _sqlite_path(ctx.settings)
    schema, _ = db.schema_status(ctx.engine)
    with tempfile.TemporaryDirectory() as scratch:
        snapshot = Path(scratch) / _DB_NAME
        with closing(sqlite3.connect(source)) as live, closing(sqlite3.connect(snapshot)) as copy:
            live.backup(copy)  # a consistent copy, taken while writers may be running
        copy_data = snapshot.read_bytes()
    digests: dict[str, str] = {}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        digests[_DB_NAME] = _add(archive, _DB_NAME, copy_data)
        data_dir = ctx.settings.data_dir
        for name in (*_DIRECTORIES, *_FILES):
            path = data_dir / name
            for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
                if file.is_file():
                    relative = file.relative_to(data_dir).as_posix()
                    digests[relative] = _add(
                        archive, relative, file.read_bytes(), file.stat().st_mode & 0o777
                    )
        manifest = {"format": FORMAT, "schema": schema, "files": digests}
        _add(
            archive, "manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode(), 0o644
        )
    write_private(out, buffer.getvalue())
    return BackupResult(out, tuple(sorted(digests)), schema)


def restore(archive_path: Path, settings: Settings) -> BackupResult:
    """Into an empty data dir and an empty database only (never merge two CAs). The archive is
    checked whole first (manifest, names, every file's digest); nothing is written unless all
    of it can be, and a failure part-way removes what was written."""
    target_db = _sqlite_path(settings)
    data_dir = settings.data_dir
    _check_data_dir_empty(data_dir)
    _check_database_empty(target_db)
    contents, schema = _verified_contents(archive_path)
    _check_database_apart(target_db, data_dir, contents)
    _install(contents, data_dir, target_db)
    return BackupResult(archive_path, tuple(sorted(contents)), schema)


def _check_data_dir_empty(data_dir: Path) -> None:
    if data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
        what = "is not empty" if data_dir.is_dir() else "is not a directory"
        raise Conflict(f"{data_dir} {what}: restore only into an empty data directory")


def _check_database_empty(path: Path) -> None:
    """The database may live outside the data dir (``TRELLIS_DATABASE_URL``): the data dir
    being empty says nothing about it. Only a database holding nothing is replaced: none yet,
    an empty file, or a schema whose tables are empty (``alembic_version`` aside)."""
    if not path.exists():
        return
    refusal = f"the database {path} already exists"
    if not path.is_file():
        raise Conflict(f"{refusal} and is not a file: restore only into an empty database")
    if path.stat().st_size == 0:
        return
    try:
        uri = f"{path.resolve().as_uri()}?mode=ro"
        with closing(sqlite3.connect(uri, uri=True)) as connection:
            tables = [
                str(name)
                for (name,) in connection.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                    " AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND name != 'alembic_version'"
                )
            ]
            held = [
                table
                for table in sorted(tables)
                if connection.execute(
                    f'SELECT 1 FROM "{table.replace(chr(34), chr(34) * 2)}" LIMIT 1'  # noqa: S608
                ).fetchone()
            ]
    except sqlite3.Error:
        raise Conflict(
            f"{refusal} and is not an empty SQLite database: restore will not overwrite it"
        ) from None
    if held:
        raise Conflict(
            f"{refusal} and holds data (tables {', '.join(held[:5])}): restore only into an"
            " empty database, never over a CA"
        )


def _check_database_apart(target_db: Path, data_dir: Path, contents: dict[str, bytes]) -> None:
    """A database URL pointing into the data dir at a name the archive also fills (say
    ``sqlite:///var/keys``) would have one overwrite the other."""
    try:
        inside = target_db.resolve().relative_to(data_dir.resolve()).parts
    except ValueError:
        return
    taken = {name.split("/")[0] for name in contents if name != _DB_NAME}
    if not inside or inside[0] in taken:
        raise InvalidInput(
            f"the database {target_db} would take the place of the data dir or of a file in it"
        )


def _verified_contents(archive_path: Path) -> tuple[dict[str, bytes], str | None]:
    """The archive's files by name, each checked against a manifest checked first. A path that
    is not there is the caller's mistake (exit 2); a file that is there but cannot be read is
    ``Unavailable`` (exit 8); anything wrong inside it is not a backup (exit 2)."""
    try:
        raw = archive_path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise InvalidInput(f"{archive_path}: no such backup file") from None
    except OSError as error:
        raise Unavailable(f"{archive_path}: cannot be read: {error.strerror or error}") from None
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as archive:
            members = archive.getmembers()
            names = [member.name for member in members]
            if len(set(names)) != len(names):
                raise InvalidInput(f"{archive_path} has two members of the same name")
            by_name = {member.name: member for member in members if member.isfile()}
            if "manifest.json" not in by_name:
                raise InvalidInput(f"{archive_path} has no manifest: not a Trellis backup")
            digests, schema = _manifest(_read(archive, by_name["manifest.json"]))
            contents: dict[str, bytes] = {}
            for name, digest in digests.items():
                if name not in by_name:
                    raise InvalidInput(f"backup entry {name!r} is missing or not a regular file")
                data = _read(archive, by_name[name])
                if hashlib.sha256(data).hexdigest() != digest:
                    raise InvalidInput(f"backup entry {name!r} is corrupt (checksum mismatch)")
                contents[name] = data
    except (OSError, EOFError, zlib.error, tarfile.TarError):
        raise InvalidInput(f"{archive_path} is not a readable Trellis backup") from None
    return contents, schema


def _manifest(raw: bytes) -> tuple[dict[str, str], str | None]:
    """The manifest's files (name → SHA-256) and schema, refused unless every part has the
    shape ``backup`` writes: a restore must not find out half-way that it cannot go on."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            raise InvalidInput("the backup manifest names an entry twice")
        return dict(pairs)

    try:
        manifest = json.loads(raw, object_pairs_hook=unique)
    except (ValueError, RecursionError):
        raise InvalidInput("the backup manifest is not JSON") from None
    if not isinstance(manifest, dict):
        raise InvalidInput("the backup manifest is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise InvalidInput(f"unsupported backup format {str(manifest.get('format'))[:40]!r}")
    schema, files = manifest.get("schema"), manifest.get("files")
    if schema is not None and not isinstance(schema, str):
        raise InvalidInput("the backup manifest's schema is not a string")
    if not isinstance(files, dict):
        raise InvalidInput("the backup manifest has no files object")
    for name, digest in files.items():
        if not _restorable(name):
            raise InvalidInput(f"backup entry {name[:80]!r} is not a file a Trellis backup holds")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise InvalidInput(f"backup entry {name!r} has no SHA-256 digest")
    if _DB_NAME not in files:
        raise InvalidInput(f"the backup has no database ({_DB_NAME})")
    return files, schema


def _restorable(name: str) -> bool:
    """A relative path inside the data dir, of a file ``backup`` takes: the database, a file of
    ``_FILES`` or one under ``_DIRECTORIES``. Nothing else (no ``.``, ``..``, absolute or empty
    parts, no WAL beside the database, no ``key-passphrase``) is written."""
    parts = name.split("/")
    if any(part in ("", ".", "..") or "\\" in part or "\0" in part for part in parts):
        return False
    if len(parts) == 1:
        return name in (_DB_NAME, *_FILES)
    return parts[0] in _DIRECTORIES


def _install(contents: dict[str, bytes], data_dir: Path, target_db: Path) -> None:
    """Write everything into a staging directory inside the data dir and the database beside
    its target, then move each into place; on any failure, remove all of it (the data dir and
    the database's directory too, if this made them)."""
    made: list[Path] = []
    try:
        made += _make_dirs(data_dir)
        staging = Path(tempfile.mkdtemp(dir=data_dir, prefix=".restore-"))
        made.append(staging)
        for name, data in contents.items():
            if name != _DB_NAME:
                target = staging / name
                _make_dirs(target.parent, private_parents=True)
                write_atomic(target, data, 0o644 if name in _PUBLIC else 0o600)
        made += _make_dirs(target_db.parent)
        fd, staged_db = tempfile.mkstemp(dir=target_db.parent, prefix=f".{target_db.name}.")
        made.append(Path(staged_db))
        with os.fdopen(fd, "wb") as handle:  # mkstemp made it 0600
            handle.write(contents[_DB_NAME])
            handle.flush()
            os.fsync(handle.fileno())
        for entry in sorted(staging.iterdir()):
            made.append(data_dir / entry.name)
            entry.rename(data_dir / entry.name)
        staging.rmdir()
        for sidecar in ("-wal", "-shm", "-journal"):  # of the empty database replaced, if any
            Path(f"{target_db}{sidecar}").unlink(missing_ok=True)
        os.replace(staged_db, target_db)
    except BaseException:
        for path in reversed(made):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise


def _make_dirs(directory: Path, *, private_parents: bool = False) -> list[Path]:
    """Create ``directory`` (0700) and any missing parents (0700 too if ``private_parents``,
    else the umask's mode, as ``mkdir -p``); returns those made, outermost first."""
    missing = list(reversed([d for d in (directory, *directory.parents) if not d.exists()]))
    for each in missing:
        each.mkdir(mode=0o700 if private_parents or each == directory else 0o777)
    return missing


def _read(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = archive.extractfile(member)
    if handle is None:
        raise InvalidInput(f"backup entry {member.name!r} cannot be read")
    return handle.read()
