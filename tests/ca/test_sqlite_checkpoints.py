"""A serving context checkpoints SQLite's WAL from a thread (``ca.store.db.Checkpointer``), and
its connections leave checkpointing to that thread, so that no issuance commit on the event
loop copies pages and fsyncs the database (docs/benchmarks.md)."""

from __future__ import annotations

import time
from pathlib import Path

import sqlalchemy as sa

from ca.authority import AuthorityParams, init_authority
from ca.clock import FixedClock
from ca.config import Settings, build_context
from ca.store.db import BACKSTOP_PAGES, Checkpointer
from tests.ca.svidkit import enrol
from tests.conftest import PASSPHRASE, TRUST_DOMAIN


def _settings(data_dir: Path) -> Settings:
    return Settings(
        data_dir=data_dir,
        database_url=f"sqlite:///{data_dir / 'trellis.db'}",
        key_passphrase=PASSPHRASE,  # type: ignore[arg-type]
    )


def _autocheckpoint(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        return int(connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one())


def test_a_serving_context_checkpoints_in_its_own_thread(tmp_path: Path, clock: FixedClock) -> None:
    database = tmp_path / "var" / "trellis.db"
    ctx = build_context(_settings(tmp_path / "var"), clock=clock, serving=True)
    try:
        assert ctx.checkpointer is not None
        assert _autocheckpoint(ctx.engine) == BACKSTOP_PAGES
        init_authority(ctx, AuthorityParams(TRUST_DOMAIN))
        ctx.checkpointer.stop()  # from here on, only what this test starts checkpoints

        size = database.stat().st_size
        for i in range(20):
            enrol(ctx, f"spiffe://example.org/w/{i}")
        assert Path(f"{database}-wal").stat().st_size > 0
        assert database.stat().st_size == size, "a commit checkpointed by itself"

        checkpointer = Checkpointer(str(database), interval=0.05).start()
        try:
            deadline = time.monotonic() + 10
            while database.stat().st_size == size and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            checkpointer.stop()
        assert database.stat().st_size > size, "the checkpointer copied no page"
        assert checkpointer.checkpoints > 0
    finally:
        ctx.close()


def test_other_contexts_keep_sqlites_own_checkpoints(tmp_path: Path, clock: FixedClock) -> None:
    ctx = build_context(_settings(tmp_path / "var"), clock=clock)
    try:
        assert ctx.checkpointer is None
        assert _autocheckpoint(ctx.engine) == 1000
    finally:
        ctx.close()


def test_closing_the_context_stops_the_checkpointer(tmp_path: Path, clock: FixedClock) -> None:
    ctx = build_context(_settings(tmp_path / "var"), clock=clock, serving=True)
    checkpointer = ctx.checkpointer
    assert checkpointer is not None
    ctx.close()
    assert not checkpointer._thread.is_alive()
