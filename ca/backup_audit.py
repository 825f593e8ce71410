"""The audit records of ``trellis backup`` and ``trellis restore``.

A backup exports every file CA key (still encrypted), the sealed secrets and the admin token:
the instance's trail records who took it, where to and what it holds (``backup.created``),
never a secret. A restore replaces the trail with the archive's: the restored trail records
the restore as its newest record (``backup.restored``), from which archive, of which instance,
taken when. Both name the archive by the SHA-256 of its manifest, which lists every file's
digest, so the restore's record and the backup's, in the original's trail, name the same
archive whatever it was renamed or copied to.

Neither record is chained here: the restored instance's sealer chains ``backup.restored``
after the restored chain's head as any new record (it is the newest by id and by time), so
``trellis audit verify`` of the restored trail goes on verifying.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ca import audit
from ca.config import Context

__all__ = ["BACKUP_CREATED", "BACKUP_RESTORED", "record_backup", "record_restore", "source"]

BACKUP_CREATED = "backup.created"
BACKUP_RESTORED = "backup.restored"
_SOURCE_FIELDS = ("taken_at", "host", "data_dir")
_SHOWN = 255  # what a manifest's own field may put into a record, at most


def source(ctx: Context, at: dt.datetime) -> dict[str, str]:
    """What the manifest says of the instance the backup is of, for the restore's record."""
    return {
        "taken_at": at.isoformat(),
        "host": socket.gethostname(),
        "data_dir": str(ctx.settings.data_dir.absolute()),
    }


def _contents(names: Iterable[str]) -> dict[str, int]:
    """How many files the archive holds under each top-level name (``keys``: CA key files,
    ``secrets``: sealed secrets, ``admin-token``, ...): what it exposes, without the names."""
    counts: dict[str, int] = {}
    for name in names:
        top = name.split("/", 1)[0]
        counts[top] = counts.get(top, 0) + 1
    return dict(sorted(counts.items()))


def _has_trail(connection: sa.Connection) -> bool:
    """A database of a schema before the audit trail (revision 0008) has none to record in:
    a backup takes one as it is, a restore installs it, and the first ``trellis serve``
    migrates it."""
    return sa.inspect(connection).has_table("audit_log")


def record_backup(
    ctx: Context,
    out: Path,
    *,
    manifest: bytes,
    files: Iterable[str],
    schema: str | None,
    at: dt.datetime,
    actor: str,
) -> None:
    """In a transaction of its own, once the archive is complete and before it takes its
    name: a backup whose record cannot be written fails, leaving no archive behind."""
    detail = {
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "schema": schema,
        "contents": _contents(files),
    }
    with ctx.engine.begin() as connection:
        if _has_trail(connection):
            audit.record(
                connection,
                BACKUP_CREATED,
                str(out.absolute()),
                actor=actor,
                at=at,
                detail=detail,
            )


def record_restore(
    database: Path,
    *,
    archive: Path,
    manifest: bytes,
    schema: str,
    data_dir: Path,
    at: dt.datetime,
    actor: str,
) -> bool:
    """Into the staged database ``database`` (checked, not yet in place), so that it arrives
    with its record or not at all. Returns whether it had a trail to record in."""
    engine = sa.create_engine(
        sa.engine.URL.create("sqlite", database=str(database)), poolclass=sa.pool.NullPool
    )
    try:
        # NullPool: the one connection is closed at the end of the block, which checkpoints
        # a WAL database (as a snapshot of one is) and removes its -wal and -shm files.
        with engine.begin() as connection:
            if not _has_trail(connection):
                return False
            audit.record(
                connection,
                BACKUP_RESTORED,
                str(archive.absolute()),
                actor=actor,
                at=at,
                detail={
                    "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
                    "schema": schema,
                    "backup": _source_of(manifest),
                    "host": socket.gethostname(),
                    "data_dir": str(data_dir.absolute()),
                },
            )
            return True
    finally:
        engine.dispose()


def _source_of(manifest: bytes) -> dict[str, Any]:
    """The manifest's account of the instance backed up and when (``source``); None for each
    part an archive made before they were written does not have, or has as no string."""
    try:
        body = json.loads(manifest)
    except ValueError:  # checked by ca.backup before: cannot happen
        body = {}
    given = body.get("source") if isinstance(body, dict) else None
    given = given if isinstance(given, dict) else {}
    return {
        name: value[:_SHOWN] if isinstance(value := given.get(name), str) else None
        for name in _SOURCE_FIELDS
    }
