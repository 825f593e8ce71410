"""Engines and schema migrations for SQLite (embedded default) and PostgreSQL (production)."""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from ca.errors import InvalidInput, NotInitialised, Unavailable
from ca.files import make_directory, private_file
from ca.progress import Progress, report

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.ext.asyncio import AsyncEngine

# Alembic is imported by the functions that migrate, not here: workers never migrate, and the
# import costs each of them 7 MiB (docs/benchmarks.md).

__all__ = [
    "DRIVERS",
    "SCHEMA_HEADS",
    "URL_FORMS",
    "Checkpointer",
    "Migration",
    "SchemaPolicy",
    "autocommit_engine",
    "check_ready",
    "connect",
    "database_place",
    "loop_engine",
    "migrate",
    "newer_schema",
    "normalise_url",
    "opened_read_only",
    "read_as_is",
    "schema_status",
    "settle_schema",
    "sqlite_url",
    "upgrade",
]

log = logging.getLogger("trellis.store")

_MIGRATIONS = Path(__file__).parent / "migrations"
# Any constant works; it only has to be the same for every replica sharing one database.
_MIGRATION_LOCK = 0x7E11150001


# The database URLs Trellis takes, by drivername. psycopg 3 is the one PostgreSQL driver it
# ships: a URL naming another (postgresql+psycopg2://, +asyncpg://) is refused, not rewritten,
# as its query options are that driver's and would mean something else, or nothing, to psycopg.
DRIVERS = ("sqlite", "postgres", "postgresql", "postgresql+psycopg")
# How an error refusing another names them.
URL_FORMS = (
    "give sqlite:///path or postgresql://user@host/db (also postgres:// and"
    " postgresql+psycopg://: Trellis's driver is psycopg 3)"
)


def normalise_url(url: str) -> str:
    """Let operators write the URLs they know; Trellis picks the driver it ships (psycopg 3)."""
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError:
        raise InvalidInput("TRELLIS_DATABASE_URL is not a database URL") from None
    if parsed.drivername in ("postgres", "postgresql", "postgresql+psycopg"):
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    if parsed.drivername == "sqlite":
        return url
    raise InvalidInput(f"unsupported database {parsed.drivername[:40]!r}: {URL_FORMS}")


def sqlite_url(path: Path) -> str:
    """The URL of the SQLite file at ``path``, whatever characters its name holds: a ``?`` in
    ``f"sqlite:///{path}"`` began a query and a ``%41`` was read as ``A``, so that the data dir
    ``var?a=b`` kept its database in the file ``var``."""
    return sa.URL.create("sqlite", database=str(path)).render_as_string()


def database_place(url: str) -> str:
    """Where the data of ``url`` lives, in words for an operator: the SQLite file, or the
    PostgreSQL database and its server (never the user or password the URL may carry). Not the
    data dir: it holds keys and files, and the database only when that is SQLite's default."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return f"the SQLite database {parsed.database or ':memory:'}"
    host = parsed.host or str(parsed.query.get("host") or "localhost")
    server = f"{host}:{parsed.port}" if parsed.port else host
    return f"the PostgreSQL database {parsed.database or parsed.username or ''!r} on {server}"


# With a ``Checkpointer`` running, a connection checkpoints the WAL itself only past this many
# pages (64 MiB): a backstop, should the checkpointer fall behind.
BACKSTOP_PAGES = 16000

# How long a SQLite connection waits for another's write lock before "database is locked" (a
# rotation then answers that another one runs: ca.rotation.rotation_lock). Read by each new
# connection, so a test that waits it out may shorten it and dispose of the engine's pool.
BUSY_TIMEOUT_MS = 10000


def _sqlite_pragmas(dbapi_connection: Any, _record: Any, *, autocheckpoint: int) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers proceed during a write; foreign keys are off by default in SQLite.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_MS)}")
    cursor.execute(f"PRAGMA wal_autocheckpoint={int(autocheckpoint)}")
    cursor.close()


class Checkpointer:
    """Checkpoints a SQLite database's WAL from a thread of its own, every ``interval`` seconds.

    By default SQLite checkpoints in whichever commit takes the WAL past 1,000 pages: that
    commit copies the pages into the database and fsyncs it twice (``synchronous=NORMAL``),
    milliseconds during which it holds the write lock and, since issuance commits on the event
    loop (``ca.store.batch``), its worker serves nothing. Issuing 1,500 certificates a second
    wrote enough WAL for several such commits a second; the other worker waited for the lock
    meanwhile, and the two used 1.65 of 2 cores. A PASSIVE checkpoint in a thread waits for
    no lock and blocks no writer; run every 0.1 s it keeps the WAL short, which also keeps
    reads fast (a read looks its pages up in the WAL index first). docs/benchmarks.md has the
    measurements."""

    def __init__(self, database: str, interval: float = 0.1) -> None:
        self._database = database
        self._interval = interval
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self.checkpoints = 0  # completed, for tests

    def start(self) -> Checkpointer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        connection = sqlite3.connect(self._database, check_same_thread=False)
        opened_writable = _writable(self._database)
        try:
            while not self._stopping.wait(self._interval):
                try:
                    connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.checkpoints += 1
                except sqlite3.Error as error:  # another process checkpointing, say: next time
                    log.debug("checkpoint skipped: %s", error)
                    if not opened_writable and _writable(self._database):
                        # Opened read-only (the file was not writable then), it failed every
                        # checkpoint (a disk I/O error) until a restart, and the WAL grew to
                        # the connections' backstop: reopened, as the pool's are (ca.store.db).
                        connection.close()
                        connection = sqlite3.connect(self._database, check_same_thread=False)
                        opened_writable = True
        finally:
            connection.close()


# The files SQLite keeps beside a database while it is open. Its unix VFS creates them with
# the database file's own mode, so a database left 0666 has journals anyone may write too.
_SQLITE_JOURNALS = ("-wal", "-shm", "-journal")
_DATABASE_FILE = "it is the database: certificates, token hashes, the audit trail"


def connect(
    url: str, *, background_checkpoints: bool = False, data_dir: Path | None = None
) -> Engine:
    """``background_checkpoints``: the caller runs a ``Checkpointer`` (``trellis serve``
    does), so the connections leave checkpointing to it, up to ``BACKSTOP_PAGES``.
    ``data_dir``: the data dir, whose mode the caller has seen to (``ca.files.data_directory``):
    a SQLite database in it is not judged by its directory again (``_private_sqlite``)."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":
            _private_sqlite(Path(database), data_dir)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        autocheckpoint = BACKSTOP_PAGES if background_checkpoints else 1000  # SQLite's default
        sa.event.listen(
            engine, "connect", functools.partial(_sqlite_pragmas, autocheckpoint=autocheckpoint)
        )
        sa.event.listen(engine, "handle_error", _readonly_is_lost)
        if database and database != ":memory:":
            sa.event.listen(engine, "connect", functools.partial(_note_read_only, database))
            sa.event.listen(engine, "checkout", functools.partial(_replace_read_only, database))
        return engine
    return _postgresql(url, pool_size=10, max_overflow=10)


def _readonly_is_lost(context: sa.engine.ExceptionContext) -> None:
    """A SQLite connection refused a write as read-only: the file was not writable when it was
    opened (``chmod 400``, a volume mounted read-only), and SQLite never reopens it. Kept, it
    refused every write for good, after the file was writable again, while reads (and
    ``/readyz``'s ``SELECT 1``) went on: the pool kept it, and so did the group commit's
    connection (``ca.store.batch``). Taken as a lost connection, it is replaced, with the
    pool's others opened before it: the next write opens the file again, and succeeds once it
    may."""
    if _is_readonly(context.original_exception):
        context.is_disconnect = True


# A connection's pool record is marked so when its database could not be written as it opened.
_OPENED_READ_ONLY = "trellis.opened_read_only"


def _writable(database: str) -> bool:
    """Whether this process may write the database and the journals beside it (SQLite opens
    each read-only when it may not)."""
    files = [database, *(f"{database}{suffix}" for suffix in _SQLITE_JOURNALS)]
    return all(os.access(file, os.W_OK) or not os.path.exists(file) for file in files)


def _note_read_only(database: str, _dbapi_connection: Any, record: Any) -> None:
    if not _writable(database):
        record.info[_OPENED_READ_ONLY] = True


def _replace_read_only(database: str, _dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """A pooled connection opened read-only is replaced at its first checkout once the file
    may be written: one that only read while the file was read-only was never refused a
    write (``_readonly_is_lost``), and would have refused the first write after."""
    if record.info.get(_OPENED_READ_ONLY) and _writable(database):
        raise sa.exc.DisconnectionError("opened read-only; the database is writable now")


def opened_read_only(connection: sa.Connection) -> bool:
    """Whether ``connection`` (one kept out of the pool: ``ca.store.batch``) was opened
    read-only while its SQLite file may be written now: then it is to be replaced, as the
    pool replaces its own (``_replace_read_only``)."""
    database = connection.engine.url.database
    return (
        bool(connection.info.get(_OPENED_READ_ONLY))
        and database is not None
        and (_writable(database))
    )


def _is_readonly(error: BaseException | None) -> bool:
    return _sqlite_kind(error) == sqlite3.SQLITE_READONLY


def _sqlite_kind(error: BaseException | None) -> int | None:
    """The primary result code of a SQLite error: the low byte of its extended code
    (``SQLITE_READONLY_CANTINIT`` is a ``SQLITE_READONLY``)."""
    code = getattr(error, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


# How long ``/readyz``'s write probe waits for another writer's lock: it is polled, and a
# writer holding the lock shows the database can be written anyway.
_PROBE_BUSY_MS = 0


def check_ready(engine: Engine) -> None:
    """Raise SQLAlchemy's error unless the database answers and, on SQLite, this process's
    connections may write it: a file opened read-only answers every read and refuses every
    write, so ``SELECT 1`` passed while every issuance was a 503. The probe is a ``DELETE``
    that matches no row, rolled back: SQLite refuses it on a read-only connection before it
    takes any lock, and it writes nothing. ``BEGIN IMMEDIATE`` is no probe: in WAL mode a
    read-only connection takes the write lock without complaint. Another writer holding the
    lock ("database is locked") shows it is writable; the probe waits for no one, as it comes
    every few seconds, and a refused write replaces the pool's connections
    (``_readonly_is_lost``), so the next probe opens the file again."""
    with engine.connect() as connection:
        if connection.dialect.name != "sqlite":
            connection.execute(sa.text("SELECT 1"))
            return
        connection.exec_driver_sql(f"PRAGMA busy_timeout={_PROBE_BUSY_MS}")
        try:
            connection.exec_driver_sql("DELETE FROM alembic_version WHERE 0")
        except sa.exc.OperationalError as error:
            if _sqlite_kind(error.orig) != sqlite3.SQLITE_BUSY:
                raise
        finally:
            if not connection.invalidated:
                connection.rollback()
                connection.exec_driver_sql(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_MS)}")


def _private_sqlite(path: Path, data_dir: Path | None) -> None:
    """The database file and its journals readable and writable by Trellis alone, and a
    directory for them that no other user may write to: whoever can write the file, or put a
    ``-wal`` of their own beside it, can add an admin token row (only a hash is stored: they
    choose the secret) or rewrite the audit trail.

    A file is made 0600 with a warning (``ca.files.private_file``), as the key files are:
    Trellis writes it 0600, a looser one was made by hand (``touch`` under a loose umask), and
    one its owner may not write (``chmod 400``) would be opened read-only, every write refused.
    A missing directory is made 0700. An existing directory is not Trellis's to change (other
    programs' files may be there: ``/tmp``, a shared volume), so it is judged, not tightened:
    one anyone may write to is refused (the sticky bit does not help: it keeps others from
    renaming the database, not from creating its ``-wal`` or ``-shm`` first, which SQLite then
    opens as its own); one its group may write to is used with a warning, since a group is
    someone's choice of whom to trust with it. The data dir is left to ``data_directory``."""
    # 0700 if missing, parents at most 0755 whatever the umask: whoever could write
    # one could put a database of their own in its place.
    make_directory(path.parent, private=True)
    # SQLite puts the journals beside the file a symlink leads to, not beside the link.
    directory = path.resolve().parent
    if data_dir is None or directory != data_dir.resolve():
        _judge_directory(directory, path)
    path.touch(mode=0o600, exist_ok=True)
    for file in (path, *(Path(f"{path}{suffix}") for suffix in _SQLITE_JOURNALS)):
        private_file(file, why=_DATABASE_FILE, writable=True)


def _judge_directory(directory: Path, database: Path) -> None:
    mode = stat.S_IMODE(directory.stat().st_mode)
    if mode & stat.S_IWOTH:
        raise InvalidInput(
            f"the SQLite database {database} is in {directory}, which any user may write to"
            f" (mode {mode:04o}): another could put a -wal or -shm file of their own beside it,"
            " or the database itself, and with it an admin token; keep it in a directory only"
            " Trellis's user may write to"
        )
    if mode & stat.S_IWGRP:
        log.warning(
            "the SQLite database %s is in %s, which its group may write to (mode %04o): a member"
            " can put a -wal or -shm file of their own beside it, or a database of their own in"
            " its place; Trellis leaves the directory as it is: run 'chmod g-w %s' unless that"
            " group is trusted as Trellis itself is",
            database,
            directory,
            mode,
            directory,
        )


# libpq connection settings a URL may override. Without them a connection whose server or
# network went away silently (a failover, a partition: no FIN, no RST) is given up only after
# the kernel's retransmissions, ~15 minutes, and an idle one is first probed after 2 hours;
# meanwhile the issuances waiting on it wait too (a commit holds a worker's whole batch).
# With them: unacknowledged data for 30 s fails the connection, and an idle one is probed
# after 30 s and dropped after three unanswered probes. They apply to TCP connections only
# (not to a Unix socket), and cannot detect a server that is up but hung: its kernel still
# acknowledges.
CONNECTION_DEFAULTS: dict[str, int] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,  # milliseconds
}


def _connect_args(url: sa.URL) -> dict[str, int]:
    """``CONNECTION_DEFAULTS`` that the URL does not set itself."""
    return {k: v for k, v in CONNECTION_DEFAULTS.items() if k not in url.query}


def _postgresql(url: str | sa.URL, **options: Any) -> Engine:
    url = make_url(url)
    engine = sa.create_engine(url, pool_recycle=3600, connect_args=_connect_args(url), **options)
    sa.event.listen(engine, "checkin", _note_checkin)
    sa.event.listen(engine, "checkout", _ping_if_idle)
    return engine


def autocommit_engine(engine: Engine) -> Engine:
    """For single-statement reads on the hot paths. On PostgreSQL: connections of their own,
    opened in autocommit, so a read is one round trip instead of three (BEGIN, SELECT,
    ROLLBACK), and the pool does not switch them in and out of autocommit on every checkout
    (``execution_options(isolation_level=...)`` did: 33 µs of CPU per read). On SQLite the
    engine itself: pysqlite begins no transaction for a SELECT anyway."""
    if engine.dialect.name != "postgresql":
        return engine
    reads = _postgresql(engine.url, pool_size=4, max_overflow=8, isolation_level="AUTOCOMMIT")
    # A lost connection in one pool means the server went away for both: the pool that saw it
    # replaces its connections older than the failure (SQLAlchemy does that), the other is
    # replaced whole, so the next request does not meet a dead connection there.
    for seen, other in ((engine, reads), (reads, engine)):
        sa.event.listen(seen, "handle_error", _dispose_on_disconnect(other))
    # A connection lost on an event loop (``loop_engine``) disposes ``engine``: then this one too.
    sa.event.listen(engine, "engine_disposed", lambda _engine: reads.dispose())
    return reads


def loop_engine(engine: Engine) -> AsyncEngine:
    """``engine``'s database through psycopg's asynchronous driver, for what an event loop
    commits itself (``ca.store.batch``): the same settings, and no pool, since a pool's
    connections belong to one loop and tests run one loop after another; each loop keeps the
    one connection it commits on. A connection lost there disposes ``engine`` (and with it
    ``autocommit_engine``'s pool): the server went away for all of them."""
    from sqlalchemy.ext.asyncio import create_async_engine

    loop = create_async_engine(
        engine.url, poolclass=sa.pool.NullPool, connect_args=_connect_args(engine.url)
    )
    sa.event.listen(loop.sync_engine, "handle_error", _dispose_on_disconnect(engine))
    return loop


def _dispose_on_disconnect(other: Engine) -> Any:
    def handle_error(context: sa.engine.ExceptionContext) -> None:
        if context.is_disconnect:
            other.dispose()

    return handle_error


# SQLAlchemy's pool_pre_ping costs a round trip on every checkout: three per issuance, about a
# quarter of PostgreSQL's work per certificate in the benchmark. A connection that went back to
# the pool moments ago is as good as one that was pinged, so only connections idle for longer
# than this are pinged; a dead one is replaced before use (the pool retries the checkout).
# Under load no connection idles that long; a database restart during load fails only the
# statements in flight (503), and the pool then replaces every connection older than the failure.
IDLE_PING_SECONDS = 2.0


def _note_checkin(_dbapi_connection: Any, record: Any) -> None:
    record.info["checked_in"] = time.monotonic()


def _ping_if_idle(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    checked_in = record.info.get("checked_in")
    if checked_in is not None and time.monotonic() - checked_in < IDLE_PING_SECONDS:
        return
    try:
        cursor = dbapi_connection.cursor()
        cursor.execute("SELECT 1")
        cursor.close()
        dbapi_connection.rollback()
    except Exception as dead:
        raise sa.exc.DisconnectionError(str(dead)) from dead


def _config() -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    return config


@contextlib.contextmanager
def _migration_lock(connection: sa.Connection) -> Iterator[None]:
    """Serialise migrations when several replicas start against one PostgreSQL at once, or
    several processes against one SQLite file."""
    if connection.dialect.name == "sqlite":
        # pysqlite begins a transaction only before INSERT, UPDATE or DELETE: each CREATE,
        # DROP or ALTER before one was committed on its own, so a migration failing at its
        # second statement left its first applied under the old revision (and the next run
        # failed on it). SQLite's DDL is transactional: begun here, the whole upgrade is one
        # transaction, as on PostgreSQL; IMMEDIATE takes the write lock before the revision
        # is read, so a second process waits for it and then finds nothing left to do.
        connection.exec_driver_sql("BEGIN IMMEDIATE")
        yield
        return
    if connection.dialect.name != "postgresql":
        yield
        return
    unlock = sa.text("SELECT pg_advisory_unlock(:k)")
    connection.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATION_LOCK})
    try:
        yield
    except BaseException:
        # The migration's error is the one to report, not the unlock's. A failed statement
        # aborted the transaction (the unlock is refused until a rollback); a broken connection
        # took its session, and the lock with it, away (an unlock would open a new session).
        # An unlock that fails all the same discards the connection, which ends the session:
        # returned to the pool, it would keep the lock (session-level, kept across a rollback)
        # that every other replica's migration waits for.
        if connection.invalidated:
            raise
        try:
            connection.rollback()
            connection.execute(unlock, {"k": _MIGRATION_LOCK})
        except Exception as error:
            log.warning(
                "could not release the migration lock after the migration failed (%s):"
                " the connection is closed instead, which releases it",
                " ".join(str(getattr(error, "orig", None) or error).split()),
            )
            connection.invalidate()
        raise
    connection.execute(unlock, {"k": _MIGRATION_LOCK})


def _refuse_unknown_revisions(connection: sa.Connection) -> None:
    """A database migrated by a newer Trellis must not be touched by an older one."""
    from alembic.runtime.migration import MigrationContext

    unknown = set(MigrationContext.configure(connection).get_current_heads()) - known_revisions()
    if unknown:
        raise Unavailable(
            f"the database schema ({', '.join(sorted(unknown))}) is newer than this Trellis: "
            "upgrade Trellis before starting it against this database"
        )


@functools.cache
def known_revisions() -> frozenset[str]:
    """Every schema revision this code can migrate from (its own and all older ones)."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_config())
    return frozenset(revision.revision for revision in script.walk_revisions())


# The newest schema revision(s). Alembic learns them by importing every migration script, ~0.3 s
# of CPU that every CLI command paid before doing anything; ``settle_schema`` compares the
# database's revision with this first. tests/ca/test_migrations.py holds it to Alembic's own heads.
SCHEMA_HEADS = frozenset({"0019"})


class SchemaPolicy(enum.Enum):
    """What opening the store may do about the database's schema revision. Every policy but
    ``TRUSTED`` creates the schema in a database that has none (nothing there to roll back, no
    older Trellis using it) and refuses one made by a newer Trellis (``Unavailable``). They
    differ over an older revision, because migrating one is what makes a rollback impossible:
    an older Trellis refuses the newer schema, and on PostgreSQL the replicas still running the
    older version are left on a schema they do not know. So only a deliberate step migrates
    (docs/operations.md)."""

    MIGRATE = "migrate"
    """``trellis migrate``, ``trellis serve``, and ``init --exists-ok``, which deploy/ runs just
    before ``serve`` with the same version."""
    REQUIRE_CURRENT = "require-current"
    """Every other command: an older revision is refused untouched (``NotInitialised``), naming
    ``trellis migrate``."""
    AS_IS = "as-is"
    """``trellis backup``: an older revision is used as it is, so that the backup taken before
    an upgrade can be restored by the version that made it."""
    TRUSTED = "trusted"
    """No check, not even the query: a worker of ``trellis serve``, which settled the schema
    before starting it."""


@dataclass(frozen=True, slots=True)
class Migration:
    """The schema revision before and after ``settle_schema`` (comma-joined when branched);
    ``before`` is None for a database that had no schema."""

    before: str | None
    after: str

    @property
    def changed(self) -> bool:
        return self.before != self.after


def _joined(revisions: Iterable[str]) -> str:
    return ",".join(sorted(revisions))


def _read_revisions(engine: Engine) -> frozenset[str]:
    """The database's revision(s), with one query; SQLAlchemy's error if it cannot be read."""
    with engine.connect() as connection:
        rows = connection.exec_driver_sql("SELECT version_num FROM alembic_version").all()
    return frozenset(str(row[0]) for row in rows)


def _revisions(engine: Engine) -> frozenset[str] | None:
    """``_read_revisions``, or None without an ``alembic_version`` table."""
    try:
        return _read_revisions(engine)
    except sa.exc.SQLAlchemyError:
        return None  # no schema yet, or a database the slow path reports on


def newer_schema(engine: Engine) -> str | None:
    """The database's revision(s) if a newer Trellis has migrated it past every revision this
    code knows (the first new replica of a rolling upgrade did, and this process is one of the
    old ones still running), else None. One query while the schema is this code's own;
    Alembic's scripts are read (once per process) only when it is not. Raises SQLAlchemy's
    error when the database cannot be reached."""
    current = _read_revisions(engine)
    if current == SCHEMA_HEADS or not current - known_revisions():
        return None
    return _joined(current)


def _outdated(before: str) -> NotInitialised:
    return NotInitialised(
        f"the database schema ({before}) is older than this Trellis ({_joined(SCHEMA_HEADS)}):"
        " take a backup, then run 'trellis migrate' (or start 'trellis serve')"
    )


def settle_schema(engine: Engine, policy: SchemaPolicy) -> Migration | None:
    """Bring the schema where ``policy`` allows (idempotent); None for ``TRUSTED``. A database
    already at ``SCHEMA_HEADS`` costs one query, without loading Alembic."""
    if policy is SchemaPolicy.TRUSTED:
        return None
    return _settle(engine, policy)


def upgrade(engine: Engine, *, progress: Progress | None = None) -> Migration:
    """Bring the schema to the newest revision this code knows (idempotent). ``progress``
    counts the revisions applied."""
    return _settle(engine, SchemaPolicy.MIGRATE, progress)


def _settle(engine: Engine, policy: SchemaPolicy, progress: Progress | None = None) -> Migration:
    current = _revisions(engine)
    if current == SCHEMA_HEADS:
        return Migration(_joined(current), _joined(current))
    if current and policy is not SchemaPolicy.MIGRATE:
        # Decided before any lock or pragma: a refusal or a backup leaves everything as it was.
        with _reachable(), engine.connect() as connection:
            _refuse_unknown_revisions(connection)
        if policy is SchemaPolicy.REQUIRE_CURRENT:
            raise _outdated(_joined(current))
        return Migration(_joined(current), _joined(current))
    return _upgrade(engine, policy, progress)


def migrate(url: str, *, progress: Progress | None = None) -> Migration:
    """``trellis migrate``: the database at ``url`` brought to the newest revision, without
    opening anything else (the key store is not needed to change the schema)."""
    engine = connect(url)
    try:
        return upgrade(engine, progress=progress)
    finally:
        engine.dispose()


@contextlib.contextmanager
def read_as_is(url: str) -> Iterator[sa.Connection | None]:
    """A connection to the database at ``url`` with its schema as it is: nothing settled and
    nothing made, for a question to answer before deciding whether to migrate. None where
    there is no database yet: ``connect`` would create a SQLite file that does not exist."""
    parsed = make_url(normalise_url(url))
    database = parsed.database
    if parsed.get_backend_name() == "sqlite" and (
        database in (None, "", ":memory:") or not Path(str(database)).exists()
    ):
        yield None
        return
    engine = connect(url)
    try:
        with _reachable(), engine.connect() as connection:
            yield connection
    finally:
        engine.dispose()


@contextlib.contextmanager
def _reachable() -> Iterator[None]:
    try:
        yield
    except sa.exc.OperationalError as exc:
        # libpq's message spans lines, tab-indented ("connection to server ... failed:\n\t...").
        reason = " ".join(str(exc.orig).split())
        raise Unavailable(f"cannot reach the database: {reason}") from None


def _upgrade(engine: Engine, policy: SchemaPolicy, progress: Progress | None = None) -> Migration:
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    config = _config()
    with _reachable(), engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # SQLite alters a table by copying it; with foreign keys enforced, dropping the
            # old copy of a referenced table fails. Alembic's documented recipe: switch
            # enforcement off for the migration (outside any transaction), then back on.
            connection.commit()
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        try:
            with _migration_lock(connection):
                _refuse_unknown_revisions(connection)
                before = _joined(MigrationContext.configure(connection).get_current_heads())
                older = before and before != _joined(SCHEMA_HEADS)
                if older and policy is not SchemaPolicy.MIGRATE:
                    # An older Trellis gave the database its schema meanwhile: as above.
                    if policy is SchemaPolicy.REQUIRE_CURRENT:
                        raise _outdated(before)
                    return Migration(before, before)
                config.attributes["connection"] = connection
                if progress is not None:
                    config.attributes["on_version_apply"] = _counting(config, before, progress)
                # "heads": features developed in parallel add migrations as sibling branches
                # off a common revision until a merge revision joins them.
                try:
                    command.upgrade(config, "heads")
                except sa.exc.DBAPIError as exc:
                    if exc.connection_invalidated:
                        raise  # the database went away: ``_reachable`` says so
                    raise _refused(exc, before) from None
                connection.commit()
        finally:
            if sqlite:
                connection.rollback()
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()
    return Migration(before or None, _joined(SCHEMA_HEADS))


def _counting(config: Config, before: str, progress: Progress) -> Callable[..., None]:
    """Alembic's ``on_version_apply`` hook, telling ``progress`` each revision applied out of
    those between ``before`` and the heads (no total where Alembic cannot tell)."""
    from alembic.script import ScriptDirectory

    revisions = ScriptDirectory.from_config(config).revision_map
    try:
        lower = tuple(before.split(",")) if before else "base"
        total: int | None = len(list(revisions.iterate_revisions("heads", lower)))
    except Exception:  # a partial set of heads Alembic will not walk from: only counted
        total = None
    done = 0
    report(progress, done, total)

    def applied(**_: Any) -> None:
        nonlocal done, total
        done += 1
        total = max(total, done) if total is not None else None
        report(progress, done, total)

    return applied


def _refused(error: sa.exc.DBAPIError, before: str) -> Unavailable:
    """The database refused a migration's statement (an object made by hand in its way, a row
    a new constraint refuses; SQLite calls both an OperationalError): this server's data, not
    the command's input, so one line (exit 8) naming the revision whose script failed, where
    the rolled-back database stays, and the database's reason, not SQLAlchemy's traceback."""
    failed = _failing_revision(error)
    step = f"to revision {failed}" if failed else f"from revision {before or 'none'}"
    stays = f"at revision {before}" if before else "without a schema"
    lines = str(error.orig).strip().splitlines()
    reason = " ".join(lines[0].split()) if lines else type(error.orig).__name__
    return Unavailable(
        f"the schema migration {step} failed and was rolled back (the database stays"
        f" {stays}): {reason}"
    )


def _failing_revision(error: BaseException) -> str | None:
    """The revision whose script raised ``error``: the script's frame is on the traceback, and
    its module names its ``revision``. Alembic reports no step before it runs it, and the
    upgrade path is no single chain (0005 to 0008 are siblings). None for an error outside
    the scripts (the update of ``alembic_version``)."""
    scripts = str(_MIGRATIONS / "versions")
    failed = None
    trace = error.__traceback__
    while trace is not None:
        frame = trace.tb_frame
        if frame.f_code.co_filename.startswith(scripts):
            failed = frame.f_globals.get("revision")
        trace = trace.tb_next
    return failed if isinstance(failed, str) else None


def schema_status(engine: Engine) -> tuple[str | None, str]:
    """(current revision(s), newest revision(s) this code knows), comma-joined when branched."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(_config()).get_heads()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_heads()
    return (",".join(sorted(current)) or None), ",".join(sorted(heads))


def missing_from_models(engine: Engine) -> list[str]:
    """The tables (``table``) and columns (``table.column``) the models declare that the
    database lacks: Trellis's commands would fail on it ("no such table", exit 8) whatever its
    ``alembic_version`` says. Tables and columns it has beyond them are no matter."""
    from sqlmodel import SQLModel

    import ca.store.models  # noqa: F401  (registers the tables on SQLModel.metadata)

    inspector = sa.inspect(engine)
    present = set(inspector.get_table_names())
    missing: list[str] = []
    for name, table in sorted(SQLModel.metadata.tables.items()):
        if name not in present:
            missing.append(name)
            continue
        columns = {column["name"] for column in inspector.get_columns(name)}
        missing += [
            f"{name}.{column.name}" for column in table.columns if column.name not in columns
        ]
    return missing
