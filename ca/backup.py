"""Backup and restore of a single-node (SQLite) installation.

A backup is a gzip'd tar holding a consistent snapshot of the database (SQLite's online backup
API, so a running server keeps serving), the CA key files and sealed secrets exactly as stored
(still encrypted), the published bundle, the admin token, the serving certificate, and a
manifest with the schema revision and a SHA-256 per file. The key passphrase is deliberately NOT
included: keep it (``TRELLIS_KEY_PASSPHRASE`` or the ``key-passphrase`` file) in a different
place than the backups, or a stolen backup is a stolen CA. What else a data dir holds, and why
it is left out, is listed in docs/operations.md.

A restore goes into an empty data directory and an empty database only (never merge two CAs);
the restored instance serves the same bundle and goes on with the same CAs, which live in the
restored database: it is a copy of the original, and acts on what the original acts on outside
its data dir (``ca.restored``: only one of them may run). Its CRL numbers go on from the
restore's time, above the original's. The archive is checked before anything is moved into
place (names, sizes within limits, digests, the database's schema), and the files are written
to a staging directory and moved into place last, so a refused or failed restore leaves the
data dir as it found it. PostgreSQL deployments back up with ``pg_dump`` (docs/operations.md).
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import glob
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sqlite3
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from ca import backup_audit, restored, tarheaders
from ca.config import Context, Settings
from ca.errors import Conflict, InvalidInput, Unavailable
from ca.files import (
    data_directory,
    held_temporary,
    make_directory,
    remove_if_abandoned,
    replacing,
    write_atomic,
)
from ca.progress import Progress, report
from ca.store import db

__all__ = ["BackupResult", "backup", "check_backup", "restore", "setting_up"]

log = logging.getLogger("trellis.backup")

FORMAT = "trellis-backup/1"
_DB_NAME = "trellis.db"
# What a restored instance needs to go on: directories (every file under them) and files.
_DIRECTORIES = ("keys", "secrets", "server")
_FILES = ("bundle.pem", "admin-token")
_PUBLIC = ("bundle.pem", "server/tls.crt")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 2**20  # what a file is read and copied in, backing up and restoring


@dataclass(frozen=True, slots=True)
class BackupResult:
    path: Path
    files: tuple[str, ...]
    schema: str | None
    # A restore's: what the restored instance acts on outside its data dir, as the instance
    # the backup was taken of does (docs/operations.md: only one of them may run).
    acts_on: restored.ActsOn = field(default_factory=restored.ActsOn)

    @property
    def needs_key_passphrase(self) -> bool:
        """Whether it holds what the key passphrase decrypts: CA key files (``keys/``) or sealed
        secrets (``secrets/``). An instance whose keys are all in Vault has neither and needs
        no passphrase (docs/vault.md, "The key passphrase")."""
        return any(name.startswith(("keys/", "secrets/")) for name in self.files)


def _sqlite_path(settings: Settings) -> Path:
    url = make_url(db.normalise_url(settings.effective_database_url))
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        raise InvalidInput(
            "backup and restore cover SQLite installations; for PostgreSQL use pg_dump and "
            "pg_restore (see docs/operations.md) and the key files or Vault separately"
        )
    return Path(url.database)


def _add(archive: tarfile.TarFile, name: str, data: bytes, mode: int) -> str:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    archive.addfile(info, io.BytesIO(data))
    return hashlib.sha256(data).hexdigest()


class _Hashing(io.BufferedReader):
    """A file read once, hashed as tarfile copies it out in chunks, each chunk counted."""

    def __init__(self, raw: io.RawIOBase, counted: _Counted | None = None) -> None:
        super().__init__(raw, _CHUNK)
        self.sha = hashlib.sha256()
        self.counted = counted

    def read(self, size: int | None = -1, /) -> bytes:
        data = super().read(size)
        self.sha.update(data)
        if self.counted is not None:
            self.counted.add(len(data))
        return data


@dataclass(slots=True)
class _Counted:
    """Bytes a backup has done of its total, told to its ``Progress``."""

    progress: Progress | None
    total: int
    done: int = 0

    def add(self, amount: int) -> None:
        self.done += amount
        # Never past the total: a file may grow between being measured and being archived.
        self.total = max(self.total, self.done)
        report(self.progress, self.done, self.total)


def _add_file(
    archive: tarfile.TarFile,
    name: str,
    path: Path,
    mode: int | None = None,
    counted: _Counted | None = None,
) -> str:
    """``path`` as the member ``name`` (with its own permission bits unless ``mode``), copied
    from its file object and hashed in the same pass: the archive holds the bytes its digest
    was taken of, and a database of gigabytes is never in memory."""
    with _Hashing(io.FileIO(path, "r"), counted) as source:
        status = os.fstat(source.fileno())
        info = tarfile.TarInfo(name)
        info.size = status.st_size
        info.mode = status.st_mode & 0o777 if mode is None else mode
        archive.addfile(info, source)
        return source.sha.hexdigest()


def check_backup(settings: Settings) -> None:
    """Before the store is opened: a PostgreSQL database is refused (exit 2) without being
    connected to, so that a database that is down does not hide that pg_dump is the tool."""
    _sqlite_path(settings)


def backup(
    ctx: Context, out: Path, *, actor: str = "local", progress: Progress | None = None
) -> BackupResult:
    """Snapshot the database into a 0600 temporary file beside ``out``, then stream the archive
    into another and rename it into place: memory stays flat whatever the database's size, the
    snapshot takes room where the archive goes (not in ``TMPDIR``, which is memory where /tmp
    is a tmpfs), and a failure part-way removes both temporary files and the directories made
    for ``out``, leaving everything as it was.

    The archive holds every file CA key and the admin token: the backup is recorded in the
    instance's trail (``backup_audit.record_backup``, under ``actor``) once the archive is
    complete, before it is renamed into place (so the snapshot does not hold its own record).

    ``progress`` counts bytes: the snapshot's as one step once taken (SQLite's backup in steps
    would restart whenever the running server writes meanwhile), then every byte archived."""
    source = _sqlite_path(ctx.settings)
    schema, _ = db.schema_status(ctx.engine)
    at = ctx.clock.now()
    digests: dict[str, str] = {}
    made = make_directory(out.parent, private=True)
    _remove_abandoned(out)
    try:
        with (
            _snapshot(source, out) as snapshot,
            replacing(out, 0o600, private=True) as handle,
        ):
            with tarfile.open(fileobj=handle, mode="w:gz") as archive:
                # Listed after the snapshot, as they were archived: a key the snapshot's rows
                # name was written before the row that names it was committed.
                files = _data_files(ctx.settings.data_dir)
                size = snapshot.stat().st_size
                counted = _Counted(progress, 2 * size + sum(_size_of(file) for _, file in files))
                counted.add(size)
                digests[_DB_NAME] = _add_file(archive, _DB_NAME, snapshot, 0o600, counted)
                for relative, file in files:
                    digests[relative] = _add_file(archive, relative, file, counted=counted)
                report(progress, counted.total, counted.total)  # a file that shrank meanwhile
                manifest = {
                    "format": FORMAT,
                    "schema": schema,
                    "files": digests,
                    "source": backup_audit.source(ctx, at),
                }
                raw = json.dumps(manifest, indent=2, sort_keys=True).encode()
                _add(archive, "manifest.json", raw, 0o644)
            backup_audit.record_backup(
                ctx, out, manifest=raw, files=digests, schema=schema, at=at, actor=actor
            )
    except BaseException:
        for directory in reversed(made):
            with suppress(OSError):  # not empty: someone else's file arrived meanwhile
                directory.rmdir()
        raise
    return BackupResult(out, tuple(sorted(digests)), schema)


def _data_files(data_dir: Path) -> list[tuple[str, Path]]:
    """What a backup takes besides the database, by name in the archive."""
    found = []
    for name in (*_DIRECTORIES, *_FILES):
        path = data_dir / name
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                found.append((file.relative_to(data_dir).as_posix(), file))
    return found


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # gone meanwhile: archiving it says so
        return 0


@contextmanager
def _snapshot(source: Path, out: Path) -> Iterator[Path]:
    """A consistent copy of the database at ``source`` (taken while writers may be running),
    in a 0600 temporary file beside ``out``, removed when the block ends, with the rollback
    journal SQLite writes beside it while copying."""
    fd, snapshot = held_temporary(out.parent, f".{out.name}.snapshot-")
    try:
        try:
            with (
                closing(sqlite3.connect(source)) as live,
                closing(sqlite3.connect(snapshot)) as copy,
            ):
                live.backup(copy)
        except sqlite3.Error as error:  # a full disk where --out goes, most likely (exit 8)
            raise Unavailable(f"the database snapshot for {out} cannot be taken: {error}") from None
        yield snapshot
    finally:
        snapshot.unlink(missing_ok=True)
        Path(f"{snapshot}-journal").unlink(missing_ok=True)
        os.close(fd)  # its flock last: until then, no clean-up takes these for abandoned


def _remove_abandoned(out: Path) -> None:
    """Remove what a backup to ``out`` killed part-way (``kill -9``, ``timeout -s KILL`` in a
    cron job: no clean-up runs) left beside it: its snapshot (a copy of the database), the
    snapshot's rollback journal, and the partial archive, each as large as the database, which
    every such run would add to until the disk is full. Only by their names (``held_temporary``'s
    for ``out``) and only those whose lock no process holds: a backup to the same ``out``
    running meanwhile keeps its own."""
    temporary = re.compile(re.escape(f".{out.name}.") + r"(?:snapshot-)?[a-z0-9_]{8}")
    journal = re.compile(re.escape(f".{out.name}.snapshot-") + r"[a-z0-9_]{8}-journal")
    try:
        names = sorted(entry.name for entry in os.scandir(out.parent))
    except OSError:
        return  # the archive's writing reports what is wrong with its directory
    removed = [name for name in names if temporary.fullmatch(name)
               and remove_if_abandoned(out.parent / name)]  # fmt: skip
    for name in names:
        # SQLite's, unlocked: abandoned once its snapshot is gone (removed just now, say).
        if journal.fullmatch(name) and not (out.parent / name[: -len("-journal")]).exists():
            with suppress(FileNotFoundError):
                (out.parent / name).unlink()
                removed.append(name)
    for name in removed:
        log.warning("removed %s, left by a backup that was interrupted", out.parent / name)


def restore(
    archive_path: Path,
    settings: Settings,
    *,
    actor: str = "local",
    progress: Progress | None = None,
) -> BackupResult:
    """Into an empty data dir and an empty database only (never merge two CAs). The archive is
    checked first (manifest, names, sizes, every small file's digest); the database is checked
    (its digest, that it is a Trellis schema this code knows) once staged beside its target.
    Nothing is moved into place unless all of it can be, and a failure part-way removes what
    was written.

    ``progress`` counts the database's bytes as they are staged, the longest step; the checks
    before it report no total (the archive is read several times over, a number no one could
    watch make sense of).

    The restored trail gets the restore as its newest record, under ``actor``
    (``backup_audit.record_restore``), written into the staged database before it is moved
    into place."""
    report(progress, 0, None)
    target_db = _sqlite_path(settings)
    data_dir = settings.data_dir
    handle = _opened(archive_path)  # first: a file that is not there is the argument's fault
    locks = _Locks()
    try:
        for directory in (data_dir, target_db.parent):
            if directory.is_dir():
                locks.hold(directory)
        ignored = _not_counted(data_dir, archive_path)
        _remove_stale_staging(data_dir, target_db, locks, ignored)
        _check_data_dir_empty(data_dir, target_db, ignored)
        _check_database_empty(target_db)
    except BaseException:
        handle.close()
        locks.release()
        raise
    with locks, handle, _unreadable_as_invalid(archive_path):
        _walk_headers(handle, archive_path)
        with tarfile.open(fileobj=handle, mode="r:gz") as archive:
            members = _members(archive, archive_path)
            if "manifest.json" not in members:
                raise InvalidInput(f"{archive_path} has no manifest: not a Trellis backup")
            raw_manifest = _read(archive, members["manifest.json"])
            digests = _manifest(raw_manifest)
            _check_archive_apart(archive_path, ignored, digests)
            contents = _verified_contents(archive, members, digests)
            _check_database_apart(target_db, data_dir, digests)
            database = _Database(archive, members[_DB_NAME], digests[_DB_NAME], archive_path)
            record = _RestoreRecord(raw_manifest, actor)
            schema, acts_on = _install(
                contents, database, data_dir, target_db, locks, ignored, record, progress
            )
    return BackupResult(archive_path, tuple(sorted(digests)), schema, acts_on)


class _Locks:
    """``flock``s a restore holds, for as long as it runs, on the data dir and on the
    database's directory: where it stages files. Another restore finding staging files there
    that it cannot lock knows they are a running restore's; ones it can lock were left by a
    restore that died (the kernel drops a dead process's locks), which it removes. A file
    system without ``flock`` (some network ones) leaves a directory unlocked and its staging
    files to the operator (``_check_data_dir_empty`` names them)."""

    def __init__(self) -> None:
        self._held: dict[tuple[int, int], int] = {}  # (device, inode) → descriptor

    def hold(self, directory: Path, *, shared: bool = False) -> None:
        """Lock ``directory`` unless held already (it may be both the data dir and the
        database's: a second descriptor of it would conflict with the first). A restore holds
        it exclusively; ``shared``, an init setting the data dir up (``setting_up``): inits
        do not exclude each other, a restore and an init do."""
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return  # checked and reported by whoever writes there
        status = os.fstat(fd)
        key = (status.st_dev, status.st_ino)
        if key in self._held:
            os.close(fd)
            return
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            running = "a restore" if shared else "a restore or an init"
            raise Conflict(
                f"{running} into {directory} is running: wait for it to end, then look again"
            ) from None
        except OSError:
            os.close(fd)
            return
        self._held[key] = fd

    def holds(self, directory: Path) -> bool:
        return _identity(directory) in self._held

    def release(self) -> None:
        for fd in self._held.values():
            os.close(fd)  # releases the flock
        self._held.clear()

    def __enter__(self) -> _Locks:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


@contextmanager
def setting_up(settings: Settings) -> Iterator[None]:
    """Around an init: the data dir (made if missing) is locked shared, so that no restore
    runs while the init writes keys into it, and an init is refused (``Conflict``, exit 6)
    while a restore runs there. A restore moves its files in at the end and, failing, removes
    what it moved: an init beside it had its keys removed under a CA it had just recorded."""
    locks = _Locks()
    make_directory(settings.data_dir, private=True)
    locks.hold(settings.data_dir, shared=True)
    with locks:
        yield


def _remove_stale_staging(
    data_dir: Path, target_db: Path, locks: _Locks, ignored: frozenset[str]
) -> None:
    """Remove what a restore that died (``kill -9``, a power cut: no clean-up ran) left before
    it moved anything into place: its staging directory in the data dir and its staged copy of
    the database beside the target, by their names only, in directories this restore holds
    locked (so no restore is running there), and only while no database is installed and the
    data dir holds nothing else. Had it begun moving files in, the data dir holds some of them:
    they are not told from an operator's by their names, and ``_check_data_dir_empty`` asks
    for the data dir to be removed instead."""
    if target_db.exists() and target_db.stat().st_size > 0:
        return
    staged_db: list[Path] = []
    if target_db.parent.is_dir():
        if not locks.holds(target_db.parent):
            return
        staged_db = sorted(target_db.parent.glob(f".{glob.escape(target_db.name)}.????????"))
    # The database is staged in the data dir by default. Its path is resolved
    # (``Settings.effective_database_url``) where the data dir's may be relative (./var):
    # entries are told apart by directory and name, whichever way either path is spelt.
    staged_here = (
        {path.name for path in staged_db}
        if _identity(data_dir) == _identity(target_db.parent)
        else set()
    )
    staging: list[Path] = []
    if data_dir.is_dir():
        if not locks.holds(data_dir):
            return
        for entry in sorted(data_dir.iterdir()):
            if entry.name in ignored:
                continue
            if _STAGING.fullmatch(entry.name):
                staging.append(entry)
            elif entry.name not in staged_here:
                return
    for path in [*staging, *staged_db]:
        log.warning("removing %s, left by a restore that was interrupted", path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _identity(directory: Path) -> tuple[int, int] | None:
    """A directory's (device, inode): the same directory, however its path is spelt."""
    try:
        status = directory.stat()
    except OSError:
        return None
    return (status.st_dev, status.st_ino)


# Sizes no real installation comes near (docs/operations.md): they stop an archive that
# inflates to more than the disk or the memory holds, before it is read. The database is
# streamed to disk (millions of certificates make gigabytes); every other file is a key, a
# sealed secret, a certificate or a token of a few kilobytes, read into memory.
MAX_DATABASE_BYTES = 256 * 2**30
MAX_FILE_BYTES = 2**20
MAX_FILES = 10_000
MAX_FILES_TOTAL_BYTES = 256 * 2**20
_MAX_NAME_BYTES = 1024
_MAX_PART_BYTES = 255  # NAME_MAX of every file system Trellis runs on
_SQLITE_HEADER = b"SQLite format 3\x00"
# Tables every Trellis schema has had since the first revision.
_CORE_TABLES = frozenset({"alembic_version", "authority", "ca", "entry", "token", "certificate"})


def _shown(name: str) -> str:
    """A name from the archive, short enough for a one-line message."""
    return repr(name if len(name) <= 80 else f"{name[:60]}...{name[-10:]}")


def _size(count: int) -> str:
    if count >= 2**30:
        return f"{count / 2**30:g} GiB"
    return f"{count / 2**20:g} MiB" if count >= 2**20 else f"{count} bytes"


def _opened(archive_path: Path) -> BinaryIO:
    """The archive, open and readable. A path that is not there is the caller's mistake (exit
    2); a file that is there but cannot be read is ``Unavailable`` (exit 8)."""
    try:
        handle = archive_path.open("rb")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise InvalidInput(f"{archive_path}: no such backup file") from None
    except OSError as error:
        raise Unavailable(f"{archive_path}: cannot be read: {error.strerror or error}") from None
    try:
        handle.read(1)
        handle.seek(0)
    except OSError as error:
        handle.close()
        raise Unavailable(f"{archive_path}: cannot be read: {error.strerror or error}") from None
    return handle


@contextmanager
def _unreadable_as_invalid(archive_path: Path) -> Iterator[None]:
    """A gzip or tar stream that breaks off or does not parse is not a Trellis backup."""
    try:
        yield
    except (EOFError, zlib.error, tarfile.TarError, gzip.BadGzipFile):
        raise InvalidInput(f"{archive_path} is not a readable Trellis backup") from None


def _walk_headers(handle: BinaryIO, archive_path: Path) -> None:
    """Every tar header, before ``tarfile`` reads one (``ca.tarheaders``: it would read an
    extended header whole, whatever size it declares); ``handle`` is rewound after."""
    with gzip.GzipFile(fileobj=handle, mode="rb") as stream:
        tarheaders.walk(
            stream,
            str(archive_path),
            max_members=MAX_FILES + 2,
            max_member_bytes=max(MAX_DATABASE_BYTES, MAX_FILE_BYTES),
        )
    handle.seek(0)


def _members(archive: tarfile.TarFile, archive_path: Path) -> dict[str, tarfile.TarInfo]:
    """The archive's regular files by name, each header checked before the next is read: the
    next header is found by reading past this member's data, which is what a bomb inflates."""
    by_name: dict[str, tarfile.TarInfo] = {}
    seen: set[str] = set()
    total = 0
    for member in archive:
        if member.name in seen:
            raise InvalidInput(f"{archive_path} has two members of the same name")
        seen.add(member.name)
        if len(seen) > MAX_FILES + 2:
            raise InvalidInput(
                f"{archive_path} has more than {MAX_FILES} files: not a Trellis backup"
            )
        limit = MAX_DATABASE_BYTES if member.name == _DB_NAME else MAX_FILE_BYTES
        if member.size > limit:
            raise InvalidInput(
                f"backup entry {_shown(member.name)} is larger than a Trellis backup holds"
                f" ({_size(limit)}): not restored"
            )
        if member.name != _DB_NAME:
            total += member.size
            if total > MAX_FILES_TOTAL_BYTES:
                raise InvalidInput(
                    f"{archive_path} holds more than {_size(MAX_FILES_TOTAL_BYTES)} besides the"
                    " database: not a Trellis backup"
                )
        if member.isfile():
            by_name[member.name] = member
    return by_name


def _verified_contents(
    archive: tarfile.TarFile, members: dict[str, tarfile.TarInfo], digests: dict[str, str]
) -> dict[str, bytes]:
    """Every file the manifest lists but the database, read and checked against its digest."""
    contents: dict[str, bytes] = {}
    for name, digest in digests.items():
        if name not in members:
            raise InvalidInput(f"backup entry {_shown(name)} is missing or not a regular file")
        if name == _DB_NAME:
            continue
        data = _read(archive, members[name])
        if hashlib.sha256(data).hexdigest() != digest:
            raise InvalidInput(f"backup entry {_shown(name)} is corrupt (checksum mismatch)")
        contents[name] = data
    return contents


_STAGING_PREFIX = ".restore-"
_STAGING = re.compile(re.escape(_STAGING_PREFIX) + r"[a-z0-9_]{8}")  # tempfile.mkdtemp's names


def _leftovers(data_dir: Path, target_db: Path) -> list[Path]:
    """What a restore killed part-way (no ``finally`` runs on SIGKILL) leaves: its staging
    directory in the data dir and its staged copy of the database beside the target."""
    found: list[Path] = []
    if data_dir.is_dir():
        found += sorted(data_dir.glob(f"{_STAGING_PREFIX}*"))
    if target_db.parent.is_dir():
        found += sorted(target_db.parent.glob(f".{glob.escape(target_db.name)}.????????"))
    return found


_LOST_AND_FOUND = "lost+found"


def _not_counted(data_dir: Path, archive_path: Path) -> frozenset[str]:
    """Names in the data dir that do not make it "not empty": ``lost+found``, which
    ``mkfs.ext4`` puts at the root of a volume (a Kubernetes PersistentVolume mounted as the
    data dir), and the archive itself where it lies in the data dir: in the shipped container
    the data dir is the one place a file can be copied to (docs/deploy.md). A restore leaves
    both as they are."""
    names: set[str] = set()
    found = data_dir / _LOST_AND_FOUND
    if found.is_dir() and not found.is_symlink():
        names.add(_LOST_AND_FOUND)
    with suppress(OSError):
        if archive_path.resolve().parent == data_dir.resolve():
            names.add(archive_path.resolve().name)
    return frozenset(names)


def _check_archive_apart(
    archive_path: Path, ignored: frozenset[str], names: dict[str, str]
) -> None:
    """An archive in the data dir under a name the restore writes would be in its way."""
    taken = {name.split("/")[0] for name in names} | {restored.MARKER}
    with suppress(OSError):
        name = archive_path.resolve().name
        if name in ignored and name in taken:
            raise InvalidInput(
                f"{archive_path} is in the data dir under a name the restore writes:"
                " move it to another name, then restore again"
            )


def _check_data_dir_empty(
    data_dir: Path, target_db: Path, ignored: frozenset[str] = frozenset()
) -> None:
    if data_dir.exists() and (
        not data_dir.is_dir() or any(entry.name not in ignored for entry in data_dir.iterdir())
    ):
        what = "is not empty" if data_dir.is_dir() else "is not a directory"
        # An interrupted restore never installed the database (it goes last): with a database
        # there, the data dir is an instance's, and no one is told to remove it.
        installed = target_db.exists() and target_db.stat().st_size > 0
        leftovers = _leftovers(data_dir, target_db) if data_dir.is_dir() else []
        if leftovers and not installed:
            left = [p.name if p.parent == data_dir else str(p) for p in leftovers]
            outside = [str(p) for p in leftovers if p.parent != data_dir]
            raise Conflict(
                f"{data_dir} is not empty: a restore was interrupted and left {', '.join(left)};"
                f" remove {' and '.join([str(data_dir), *outside])} and restore again"
            )
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


def _check_database_apart(target_db: Path, data_dir: Path, names: dict[str, str]) -> None:
    """A database URL pointing into the data dir at a name the archive also fills (say
    ``sqlite:///var/keys``) would have one overwrite the other."""
    try:
        inside = target_db.resolve().relative_to(data_dir.resolve()).parts
    except ValueError:
        return
    taken = {name.split("/")[0] for name in names if name != _DB_NAME}
    if not inside or inside[0] in taken:
        raise InvalidInput(
            f"the database {target_db} would take the place of the data dir or of a file in it"
        )


def _manifest(raw: bytes) -> dict[str, str]:
    """The manifest's files (name → SHA-256), refused unless every part has the shape
    ``backup`` writes (its schema a string or null): a restore must not find out half-way that
    it cannot go on. The schema a restore reports is read from the database itself."""

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
    if len(files) > MAX_FILES:
        raise InvalidInput(f"the backup manifest lists more than {MAX_FILES} files")
    for name, digest in files.items():
        if not _restorable(name):
            raise InvalidInput(f"backup entry {_shown(name)} is not a file a Trellis backup holds")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise InvalidInput(f"backup entry {_shown(name)} has no SHA-256 digest")
    for name in files:
        # "keys/a" and "keys/a/b": one would have to be a file and a directory at once.
        parts = name.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in files:
                raise InvalidInput(
                    f"backup entries {_shown('/'.join(parts[:depth]))} and {_shown(name)}"
                    " cannot both be restored: one is a file, the other under it"
                )
    if _DB_NAME not in files:
        raise InvalidInput(f"the backup has no database ({_DB_NAME})")
    return files


def _restorable(name: str) -> bool:
    """A relative path inside the data dir, of a file ``backup`` takes: the database, a file of
    ``_FILES`` or one under ``_DIRECTORIES``. Nothing else (no ``.``, ``..``, absolute or empty
    parts, no WAL beside the database, no ``key-passphrase``) is written, nor a name no file
    system takes (not UTF-8, a part over 255 bytes, the whole over ``_MAX_NAME_BYTES``)."""
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape
        return False
    parts = name.split("/")
    if len(encoded) > _MAX_NAME_BYTES or any(
        len(part.encode()) > _MAX_PART_BYTES for part in parts
    ):
        return False
    if any(part in ("", ".", "..") or "\\" in part or "\0" in part for part in parts):
        return False
    if len(parts) == 1:
        return name in (_DB_NAME, *_FILES)
    return parts[0] in _DIRECTORIES


@dataclass(frozen=True, slots=True)
class _Database:
    """The archive's database member, streamed to a staged file and checked there."""

    archive: tarfile.TarFile
    member: tarfile.TarInfo
    digest: str
    archive_path: Path

    def write_to(self, out: BinaryIO, progress: Progress | None = None) -> None:
        """Copy in chunks, hashing as it goes; stop at the first chunk that cannot be SQLite
        or once more than the header announced (and the cap) has come."""
        source = self.archive.extractfile(self.member)
        if source is None:
            raise InvalidInput(f"backup entry {_DB_NAME!r} cannot be read")
        sha, written = hashlib.sha256(), 0
        with source:
            while chunk := self._next_chunk(source):
                if written == 0 and not chunk.startswith(_SQLITE_HEADER):
                    raise InvalidInput(
                        f"backup entry {_DB_NAME!r} is not an SQLite database: not a Trellis backup"
                    )
                written += len(chunk)
                if written > min(self.member.size, MAX_DATABASE_BYTES):
                    raise InvalidInput(f"backup entry {_DB_NAME!r} is larger than it says")
                sha.update(chunk)
                out.write(chunk)
                report(progress, written, self.member.size)
        if sha.hexdigest() != self.digest:
            raise InvalidInput(f"backup entry {_DB_NAME!r} is corrupt (checksum mismatch)")

    def _next_chunk(self, source: IO[bytes]) -> bytes:
        """Read errors are the archive's (exit 2, or 8 for an I/O error); write errors, outside
        this, are the target's (exit 8)."""
        with _unreadable_as_invalid(self.archive_path):
            try:
                return source.read(_CHUNK)
            except OSError as error:
                if isinstance(error, gzip.BadGzipFile):
                    raise
                raise Unavailable(
                    f"{self.archive_path}: cannot be read: {error.strerror or error}"
                ) from None


def _check_schema(path: Path) -> str:
    """The staged database's schema revision(s), comma-joined, once it is found to be a
    database Trellis can run on. One whose digest matches is what the backup's maker put
    there, not necessarily a Trellis database: every later command would fail on it (exit 8).
    Its revision must be one this code knows how to run or migrate (one made by a newer
    Trellis is refused too), and it must hold every table and column that revision has
    (``_missing_after_migration``). The revision reported is the database's own, not the
    manifest's, which nothing checks."""
    try:
        with closing(sqlite3.connect(_read_only(path), uri=True)) as connection:
            tables = {
                str(name)
                for (name,) in connection.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                )
            }
            revisions = (
                {
                    str(row[0])
                    for row in connection.execute("SELECT version_num FROM alembic_version")
                }
                if "alembic_version" in tables
                else set()
            )
    except sqlite3.Error:
        raise InvalidInput(
            f"backup entry {_DB_NAME!r} is not an SQLite database: not a Trellis backup"
        ) from None
    if not tables >= _CORE_TABLES or not revisions:
        raise InvalidInput(f"backup entry {_DB_NAME!r} has no Trellis schema: not a Trellis backup")
    unknown = revisions - db.known_revisions()
    if unknown:
        raise InvalidInput(
            f"the backup's database schema ({_shown(', '.join(sorted(unknown)))}) is newer than"
            " this Trellis: restore it with the Trellis version that made it, or a newer one"
        )
    schema = ",".join(sorted(revisions))
    missing = _missing_after_migration(path, revisions)
    if missing:
        raise InvalidInput(
            f"backup entry {_DB_NAME!r} lacks Trellis tables or columns of its schema {schema}"
            f" ({_shown(', '.join(missing))}): not a Trellis backup"
        )
    return schema


def _read_only(path: Path) -> str:
    return f"{path.resolve().as_uri()}?mode=ro&immutable=1"  # no journal files beside it


def _missing_after_migration(path: Path, revisions: set[str]) -> list[str]:
    """What the database at ``path`` lacks of the schema Trellis runs on, once migrated from
    its own revision(s) as the first ``trellis serve`` will migrate it.

    The models describe the newest revision only: a database at an older one rightly lacks
    what later migrations add, and the migrations are what must work on it, so the comparison
    (``db.missing_from_models``) is made after migrating. What is migrated is the schema alone,
    in a scratch database made from the staged one's DDL and revision: the migrations alter
    tables and columns whatever rows they hold, so rows decide nothing here, and migrating a
    copy of the data would take as much disk and time again as a database of gigabytes does.
    A schema the migrations fail on is as bad as one that lacks a table."""
    order = {"table": 0, "index": 1, "view": 2, "trigger": 3}
    with tempfile.TemporaryDirectory() as scratch:
        shape = Path(scratch) / "schema.db"
        try:
            with (
                closing(sqlite3.connect(_read_only(path), uri=True)) as source,
                closing(sqlite3.connect(shape)) as copy,
            ):
                ddl = source.execute(
                    "SELECT type, sql FROM sqlite_master WHERE sql IS NOT NULL"
                    " AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
                ).fetchall()
                for _, statement in sorted(ddl, key=lambda row: order.get(str(row[0]), 4)):
                    copy.execute(str(statement))
                copy.executemany(
                    "INSERT INTO alembic_version (version_num) VALUES (?)",
                    [(revision,) for revision in sorted(revisions)],
                )
                copy.commit()
        except sqlite3.Error:
            raise InvalidInput(
                f"backup entry {_DB_NAME!r} has no Trellis schema: not a Trellis backup"
            ) from None
        engine = sa.create_engine(db.sqlite_url(shape))
        try:
            db.upgrade(engine)
            return db.missing_from_models(engine)
        except Exception:  # the schema is the archive's: whatever a migration fails on is too
            raise InvalidInput(
                f"backup entry {_DB_NAME!r}: its schema cannot be migrated to this Trellis's:"
                " not a Trellis backup"
            ) from None
        finally:
            engine.dispose()


@dataclass(frozen=True, slots=True)
class _RestoreRecord:
    """What the restore's audit record is made of, besides what ``_install`` finds."""

    manifest: bytes
    actor: str


def _install(
    contents: dict[str, bytes],
    database: _Database,
    data_dir: Path,
    target_db: Path,
    locks: _Locks,
    ignored: frozenset[str],
    record: _RestoreRecord,
    progress: Progress | None = None,
) -> tuple[str, restored.ActsOn]:
    """Stage the database beside its target (streamed, then checked) and the files in a
    staging directory inside the data dir, then move each into place, the database last; on
    any failure, remove all of it (the data dir and the database's directory too, if this
    made them and nothing else is in them: what another process put there stays). Returns
    the database's schema revision and what the restored instance acts on (``ca.restored``),
    whose Vault keys it records in ``restored.json``."""
    made: list[Path] = []  # this restore's own files and trees: removed whole on failure
    directories: list[Path] = []  # made for the data dir and the database: removed if empty
    try:
        # Each directory is locked before it is staged in, and before it counts as made: one
        # that another restore locked first is that restore's to remove.
        made_now = make_directory(data_dir, private=True)
        data_directory(data_dir, create=False)  # an existing one, 0777 say, as other commands
        locks.hold(data_dir)
        directories += made_now
        made_now = make_directory(target_db.parent, private=True)
        locks.hold(target_db.parent)
        directories += made_now
        # Checked again under the locks: an init may have set the data dir up since the first
        # look (it takes the same lock, so none can from here on).
        _check_data_dir_empty(data_dir, target_db, ignored)
        _check_database_empty(target_db)
        staging = Path(tempfile.mkdtemp(dir=data_dir, prefix=_STAGING_PREFIX))
        made.append(staging)
        fd, staged_db = tempfile.mkstemp(dir=target_db.parent, prefix=f".{target_db.name}.")
        made.append(Path(staged_db))
        # Its journals while the restore's record is written into it (none are left after).
        made += [Path(f"{staged_db}{sidecar}") for sidecar in ("-wal", "-shm", "-journal")]
        with os.fdopen(fd, "wb") as handle:  # mkstemp made it 0600
            database.write_to(handle, progress)
            handle.flush()
            os.fsync(handle.fileno())
        schema = _check_schema(Path(staged_db))
        acts_on = restored.acts_on(Path(staged_db))
        at = dt.datetime.now(dt.UTC)
        if not backup_audit.record_restore(
            Path(staged_db),
            archive=database.archive_path,
            manifest=record.manifest,
            schema=schema,
            data_dir=data_dir,
            # Whole seconds, as every record's time (ca.clock): with microseconds, an ``audit
            # seal`` in the same second (its cutoff whole seconds too) left the record out.
            # The marker keeps the microseconds: its CRL numbers count from them.
            at=at.replace(microsecond=0),
            actor=record.actor,
        ):
            log.warning(
                "the backup's schema %s has no audit trail: the restore is not recorded", schema
            )
        # The Vault keys the original signs with, which this instance must never destroy.
        contents = {
            **contents,
            restored.MARKER: restored.marker(database.archive_path, at, acts_on),
        }
        for name, data in contents.items():
            target = staging / name
            parts = name.split("/")
            for depth in range(1, len(parts)):
                # keys/, secrets/, server/ and what is under them: 0700 each, as a data dir's
                make_directory(staging.joinpath(*parts[:depth]), private=True)
            write_atomic(target, data, 0o644 if name in _PUBLIC else 0o600)
        for entry in sorted(staging.iterdir()):
            _move_in(entry, data_dir / entry.name)
            made.append(data_dir / entry.name)  # only once it is this restore's
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
        for directory in reversed(directories):
            with suppress(OSError):  # not empty: another's file arrived meanwhile
                directory.rmdir()
        raise
    return schema, acts_on


def _move_in(entry: Path, target: Path) -> None:
    """Move a staged file or directory to ``target``, which must not exist: a rename would
    replace a file there (and a directory that is empty), and a failure after would remove
    it, though not this restore's. A file is linked (which refuses an existing name) and its
    staged name removed; a directory goes in place of an empty one made for it, which a
    rename replaces only while it stays empty."""
    refusal = Conflict(f"{target} appeared while restoring: restore only into an empty data dir")
    if entry.is_dir():
        try:
            target.mkdir(mode=0o700)
        except FileExistsError:
            raise refusal from None
        try:
            entry.rename(target)
        except OSError:
            with suppress(OSError):
                target.rmdir()  # still empty: ours; otherwise no longer only ours
            raise
        return
    try:
        os.link(entry, target)
    except FileExistsError:
        raise refusal from None
    except OSError as error:
        if error.errno not in _NO_LINKS:
            raise
        # A file system without hard links (vfat, some FUSE ones): looked at, then renamed,
        # under the data dir's lock (no init writes there meanwhile).
        if target.exists() or target.is_symlink():
            raise refusal from None
        entry.rename(target)
        return
    entry.unlink()


_NO_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK})


def _read(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """A small file, never more than ``MAX_FILE_BYTES`` whatever its header says."""
    handle = archive.extractfile(member)
    if handle is None:
        raise InvalidInput(f"backup entry {_shown(member.name)} cannot be read")
    with handle:
        data = handle.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise InvalidInput(
            f"backup entry {_shown(member.name)} is larger than a Trellis backup holds"
            f" ({_size(MAX_FILE_BYTES)}): not restored"
        )
    return data
