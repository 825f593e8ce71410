"""Backup and restore of a single-node (SQLite) installation.

A backup is a gzip'd tar holding a consistent snapshot of the database (SQLite's online backup
API, so a running server keeps serving), the CA key files exactly as stored (still encrypted),
the published bundle, and a manifest with the schema revision and a SHA-256 per file. The key
passphrase is deliberately NOT included: keep it (``TRELLIS_KEY_PASSPHRASE`` or the
``key-passphrase`` file) in a different place than the backups, or a stolen backup is a stolen CA.

A restore goes into an empty data directory only; the restored instance serves the same bundle
and continues serial and CRL numbering, because both live in the restored database. PostgreSQL
deployments back up with ``pg_dump`` (docs/operations.md).
"""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from ca.config import Context, Settings
from ca.errors import Conflict, InvalidInput
from ca.files import write_atomic, write_private
from ca.store import db

__all__ = ["BackupResult", "backup", "restore"]

FORMAT = "trellis-backup/1"
_DB_NAME = "trellis.db"
_INCLUDE = ("keys", "bundle.pem", "admin-token", "server")
_PUBLIC = ("bundle.pem", "server/tls.crt")


@dataclass(frozen=True, slots=True)
class BackupResult:
    path: Path
    files: tuple[str, ...]
    schema: str | None


def _sqlite_path(settings: Settings) -> Path:
    url = make_url(db.normalise_url(settings.effective_database_url))
    if url.get_backend_name() != "sqlite" or not url.database:
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
        with sqlite3.connect(source) as live, sqlite3.connect(snapshot) as copy:
            live.backup(copy)  # a consistent copy, taken while writers may be running
        copy_data = snapshot.read_bytes()
    digests: dict[str, str] = {}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        digests[_DB_NAME] = _add(archive, _DB_NAME, copy_data)
        data_dir = ctx.settings.data_dir
        for name in _INCLUDE:
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
    """Into an empty data dir only (never merge two CAs); verifies every file's digest first."""
    data_dir = settings.data_dir
    if data_dir.exists() and any(data_dir.iterdir()):
        raise Conflict(f"{data_dir} is not empty: restore only into an empty data directory")
    target_db = _sqlite_path(settings)
    try:
        contents, manifest = _verified_contents(archive_path)
    except (OSError, EOFError, zlib.error, tarfile.TarError, ValueError):
        raise InvalidInput(f"{archive_path} is not a readable Trellis backup") from None
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, data in contents.items():
        if name == _DB_NAME:
            write_private(target_db, data)
        elif name in _PUBLIC:
            write_atomic(data_dir / name, data)
        else:
            write_private(data_dir / name, data)
    return BackupResult(archive_path, tuple(sorted(contents)), manifest.get("schema"))


def _verified_contents(archive_path: Path) -> tuple[dict[str, bytes], dict[str, Any]]:
    with tarfile.open(archive_path, mode="r:gz") as archive:
        members = {m.name: m for m in archive.getmembers() if m.isfile()}
        if "manifest.json" not in members:
            raise InvalidInput(f"{archive_path} has no manifest: not a Trellis backup")
        manifest = json.loads(_read(archive, members["manifest.json"]))
        if manifest.get("format") != FORMAT:
            raise InvalidInput(f"unsupported backup format {manifest.get('format')!r}")
        contents: dict[str, bytes] = {}
        for name, digest in manifest["files"].items():
            if name not in members or ".." in Path(name).parts or Path(name).is_absolute():
                raise InvalidInput(f"backup entry {name!r} is missing or unsafe")
            data = _read(archive, members[name])
            if hashlib.sha256(data).hexdigest() != digest:
                raise InvalidInput(f"backup entry {name!r} is corrupt (checksum mismatch)")
            contents[name] = data
    return contents, manifest


def _read(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = archive.extractfile(member)
    if handle is None:
        raise InvalidInput(f"backup entry {member.name!r} cannot be read")
    return handle.read()
