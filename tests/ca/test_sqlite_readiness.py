"""``/readyz``'s database check on SQLite (``db.check_ready``): a write that changes nothing,
which a connection opened read-only refuses; it is polled every few seconds, so it waits for no
other writer. Real SQLite files. The read-only case needs a file Trellis may not write, which
root always may: tests/cli/test_readonly_database.py runs it in real processes without that
privilege."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
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


_CHECKPOINTER = """
import os, sqlite3, sys, time
from ca.store.db import Checkpointer
database = sys.argv[1]
writer = sqlite3.connect(database)
writer.execute("PRAGMA journal_mode=WAL")
writer.execute("CREATE TABLE t (x)")
writer.commit()
os.chmod(database, 0o400)
checkpointer = Checkpointer(database, interval=0.02).start()
time.sleep(0.3)
while_read_only = checkpointer.checkpoints
os.chmod(database, 0o600)
deadline = time.monotonic() + 10
while checkpointer.checkpoints == 0 and time.monotonic() < deadline:
    writer.execute("INSERT INTO t VALUES (1)")
    writer.commit()
    time.sleep(0.02)
checkpointer.stop()
print(while_read_only, checkpointer.checkpoints)
"""


def test_the_checkpointer_reopens_a_database_it_opened_read_only(tmp_path: Path) -> None:
    """``trellis serve``'s checkpoint thread keeps its own connection for the life of the
    process: opened while the file could not be written, it failed every checkpoint until a
    restart, after the file was writable again, and the WAL grew to the backstop. Run without
    root's power to write any file (``setpriv``), as tests/cli/test_readonly_database.py."""
    without_dac = (
        ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    )
    done = subprocess.run(
        [*without_dac, sys.executable, "-c", _CHECKPOINTER, str(tmp_path / "trellis.db")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    while_read_only, after = (int(n) for n in done.stdout.split())
    assert while_read_only == 0 and after > 0, done.stdout
