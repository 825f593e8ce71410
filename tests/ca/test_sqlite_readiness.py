"""``/readyz``'s database check on SQLite (``db.check_ready``): a write that changes nothing,
which a connection opened read-only refuses; it is polled every few seconds, so it waits for no
other writer. Real SQLite files. The read-only case needs a file Trellis may not write, which
root always may: tests/cli/test_readonly_database.py runs it in real processes without that
privilege."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from ca.store import db


def test_a_writer_holding_the_lock_does_not_hold_readiness_up(tmp_path: Path) -> None:
    """A writer holding the lock shows the database can be written: ready at once, not after
    the 10 s busy timeout every connection waits for a lock, which it gets back after."""
    database = tmp_path / "trellis.db"
    engine = db.connect(db.sqlite_url(database))
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32))")
    writer = sqlite3.connect(database)
    writer.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        db.check_ready(engine)
        assert time.monotonic() - started < 1
    finally:
        writer.rollback()
        writer.close()
    with engine.connect() as connection:  # the pool's one connection: the probe's
        timeout = connection.exec_driver_sql("PRAGMA busy_timeout").scalar()
        assert timeout == db.BUSY_TIMEOUT_MS
    engine.dispose()


def test_ready_when_writable(tmp_path: Path) -> None:
    database = tmp_path / "trellis.db"
    engine = db.connect(db.sqlite_url(database))
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32))")
        connection.exec_driver_sql("INSERT INTO alembic_version VALUES ('x')")
    db.check_ready(engine)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT version_num FROM alembic_version").all() == [
            ("x",)
        ]
    engine.dispose()
