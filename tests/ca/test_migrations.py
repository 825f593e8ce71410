"""The Alembic migrations create exactly the schema ``ca.store.models`` describes, on SQLite and
PostgreSQL, and upgrading is idempotent."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlmodel import SQLModel

import ca.store.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from ca.config import Context
from ca.errors import NotInitialised, Unavailable
from ca.store import db
from tests.pgserver import make_postgres_database

LOCK = 0x7E11150001  # ca.store.db's migration lock

# The tables every later revision builds on; the full set is whatever the models declare.
CORE_TABLES = {"authority", "ca", "entry", "token", "certificate", "renewal_nonce"}
TABLES = set(SQLModel.metadata.tables)
ONLY_ON = {
    index.name: index._ddl_if.dialect
    for table in SQLModel.metadata.tables.values()
    for index in table.indexes
    if index._ddl_if is not None
}


def schema_diff(engine: sa.Engine, metadata: sa.MetaData = SQLModel.metadata) -> list[Any]:
    def created_here(_obj: Any, name: Any, type_: str, _reflected: Any, _other: Any) -> bool:
        """An index the models create on one database only (``.ddl_if``) is not missing on
        the others."""
        only_on = ONLY_ON.get(name) if type_ == "index" else None
        return only_on is None or only_on == engine.dialect.name

    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={
                "compare_type": True,
                "compare_server_default": True,
                "include_object": created_here,
            },
        )
        return list(compare_metadata(context, metadata))


def test_models_declare_the_core_tables() -> None:
    assert CORE_TABLES <= TABLES


def test_migrated_schema_matches_the_models(bare_ctx: Context) -> None:
    assert set(sa.inspect(bare_ctx.engine).get_table_names()) == TABLES | {"alembic_version"}
    assert schema_diff(bare_ctx.engine) == []


def test_the_comparison_notices_drift(bare_ctx: Context) -> None:
    """Guards the guard: a model change without a migration must show up as a diff."""
    drifted = sa.MetaData()
    for table in SQLModel.metadata.tables.values():
        table.to_metadata(drifted)
    drifted.tables["entry"].append_column(sa.Column("surprise", sa.Integer(), nullable=True))
    sa.Index("ix_token_kind", drifted.tables["token"].c.kind)
    diff = schema_diff(bare_ctx.engine, drifted)
    assert sorted(change[0] for change in diff) == ["add_column", "add_index"], diff


def test_schema_status_reports_head(bare_ctx: Context) -> None:
    current, head = db.schema_status(bare_ctx.engine)
    assert head
    assert current == head


def test_the_heads_upgrade_compares_with_first_are_alembic_s() -> None:
    """``db.SCHEMA_HEADS`` spares every command the import of each migration script; a new
    migration must move it, or databases would stop at the revision before."""
    heads = ScriptDirectory.from_config(db._config()).get_heads()
    assert frozenset(heads) == db.SCHEMA_HEADS


def test_an_up_to_date_database_is_not_handed_to_alembic(ctx: Context) -> None:
    """The check every command runs first reads the revision with one query; loading Alembic
    and its scripts (~0.3 s of CPU) is for a database that needs a migration."""
    url = ctx.engine.url.render_as_string(hide_password=False)
    probe = (
        "import sys; from ca.store import db; "
        f"db.upgrade(db.connect({url!r})); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert loaded.stdout.strip() == "[]", loaded


def test_upgrade_is_idempotent_and_keeps_data(ctx: Context) -> None:
    """``ctx`` has an authority: upgrading again must neither fail nor touch its rows."""

    def rows() -> dict[str, list[tuple[Any, ...]]]:
        with ctx.engine.connect() as connection:
            return {
                table: sorted(
                    tuple(row) for row in connection.execute(sa.text(f"SELECT * FROM {table}"))
                )
                for table in sorted(TABLES)
            }

    before, status = rows(), db.schema_status(ctx.engine)
    assert before["ca"], "the fixture authority is there to be preserved"
    db.upgrade(ctx.engine)
    db.upgrade(ctx.engine)
    assert rows() == before
    assert db.schema_status(ctx.engine) == status
    assert schema_diff(ctx.engine) == []
    with ctx.engine.connect() as connection:
        versions = connection.execute(sa.text("SELECT version_num FROM alembic_version")).all()
    assert [v for (v,) in versions] == [status[1]]


def test_fresh_database_reports_no_revision(tmp_path: Any) -> None:
    engine = db.connect(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        current, head = db.schema_status(engine)
        assert (current, bool(head)) == (None, True)
        db.upgrade(engine)
        assert db.schema_status(engine) == (head, head)
    finally:
        engine.dispose()


def test_only_migrate_changes_an_older_schema(database_url: str) -> None:
    """``trellis migrate`` and ``serve`` migrate; other commands refuse an older schema
    untouched (``NotInitialised``, naming the command), and ``backup`` takes it as it is."""
    from alembic import command

    engine = db.connect(database_url)
    config = db._config()
    try:
        with engine.connect() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "0012")
            connection.commit()
        with pytest.raises(NotInitialised, match=r"\(0012\) is older .* 'trellis migrate'"):
            db.settle_schema(engine, db.SchemaPolicy.REQUIRE_CURRENT)
        assert db.settle_schema(engine, db.SchemaPolicy.AS_IS) == db.Migration("0012", "0012")
        assert db.settle_schema(engine, db.SchemaPolicy.TRUSTED) is None
        assert db.schema_status(engine)[0] == "0012"
        head = ",".join(sorted(db.SCHEMA_HEADS))
        assert db.upgrade(engine) == db.Migration("0012", head)
        assert db.settle_schema(engine, db.SchemaPolicy.REQUIRE_CURRENT) == db.Migration(head, head)
    finally:
        engine.dispose()


# (revision the database is at, what an administrator did to it by hand, the revision whose
# migration then fails, what the database says)
REFUSED = {
    # 0012's first index is made, then its second is in the way: on SQLite the first stayed
    # (pysqlite commits each CREATE INDEX on its own) under revision 0011.
    "index-in-the-way": (
        "0011",
        ["CREATE INDEX ix_certificate_expiry_serial ON certificate (serial)"],
        "0012",
        "already exists",
    ),
    # 0012 to 0014 succeed (0014 rebuilds the certificate table on SQLite), 0015 fails.
    "column-in-the-way": (
        "0011",
        ["ALTER TABLE ocsp_responder ADD COLUMN generation INTEGER"],
        "0015",
        "generation",
    ),
    # 0017 gives every cluster-wide job the node '': a unique index made by hand refuses it.
    "rows-a-constraint-refuses": (
        "0016",
        [
            "INSERT INTO job_run (name, last_result, last_ok, consecutive_failures, runs, node)"
            " VALUES ('crl', 'ok', true, 0, 1, 'a'), ('ocsp', 'ok', true, 0, 1, 'b')",
            "CREATE UNIQUE INDEX ix_job_run_node ON job_run (node)",
        ],
        "0017",
        "unique",
    ),
}


@pytest.mark.parametrize(("at", "by_hand", "failing", "says"), REFUSED.values(), ids=REFUSED)
def test_a_migration_the_database_refuses_is_one_line_and_changes_nothing(
    database_url: str, at: str, by_hand: list[str], failing: str, says: str
) -> None:
    """A statement the database refuses was SQLAlchemy's error (SQLite's "cannot reach the
    database: index ... already exists", PostgreSQL's ProgrammingError with a traceback), and
    on SQLite what the migrations had done before it stayed. Now: ``Unavailable`` (exit 8),
    one line naming the revision that failed, where the database stays and the database's
    reason; the schema and rows are as they were, on both databases."""
    engine = db.connect(database_url)
    try:
        _at_revision_on(engine, at)
        with engine.begin() as connection:
            for statement in by_hand:
                connection.exec_driver_sql(statement)
        before = _snapshot(engine)
        with pytest.raises(Unavailable) as refused:
            db.upgrade(engine)
        message = str(refused.value)
        assert message.startswith(
            f"the schema migration to revision {failing} failed and was rolled back"
            f" (the database stays at revision {at}): "
        ), message
        assert says in message.lower() and "\n" not in message
        assert _snapshot(engine) == before
    finally:
        engine.dispose()


def _snapshot(engine: sa.Engine) -> dict[str, Any]:
    """The revision, every table's columns, indexes and constraints, and ``job_run``'s rows."""
    inspector = sa.inspect(engine)
    tables = {
        name: (
            [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(name)],
            inspector.get_pk_constraint(name)["constrained_columns"],
            sorted((i["name"] or "", i["column_names"]) for i in inspector.get_indexes(name)),
            sorted(
                (u["name"] or "", u["column_names"]) for u in inspector.get_unique_constraints(name)
            ),
        )
        for name in sorted(inspector.get_table_names())
    }
    with engine.connect() as connection:
        revision = connection.exec_driver_sql("SELECT version_num FROM alembic_version").all()
        jobs = connection.exec_driver_sql("SELECT * FROM job_run ORDER BY name").all()
    return {"revision": revision, "tables": tables, "job_run": jobs}


@pytest.mark.postgres
def test_a_failed_postgresql_migration_reports_its_own_error_and_frees_the_lock(
    postgres_server: str,
) -> None:
    """The advisory lock was released in a ``finally``: after a migration's statement failed,
    PostgreSQL refused the unlock ("current transaction is aborted"), and that error replaced
    the migration's own. Now the migration's error is raised, one line naming it (exit 8, not
    SQLAlchemy's traceback), and the lock is free for the next replica (checked from another
    session)."""
    engine = db.connect(make_postgres_database(postgres_server))
    try:
        _at_revision_on(engine, "0011")
        with engine.connect() as connection:
            # What 0012 creates, already there: its CREATE INDEX fails.
            connection.execute(
                sa.text("CREATE INDEX ix_certificate_status_serial ON certificate (serial)")
            )
            connection.commit()
        with pytest.raises(
            Unavailable, match=r"migration to revision 0012 failed .* 0011\): .*already exists"
        ):
            db.upgrade(engine)
        with engine.connect() as other:
            free = other.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": LOCK})
            assert free.scalar() is True
            other.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK})
        assert db.schema_status(engine)[0] == "0011"  # rolled back as a whole
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_postgresql_migration_whose_connection_breaks_reports_that(
    postgres_server: str,
) -> None:
    """The connection ended under the migration (here terminated by an administrator while
    0012 waits for a table lock): the unlock on it failed ("Can't reconnect until invalid
    transaction is rolled back", exit 1 with a traceback) and replaced the migration's error,
    which is reported now (exit 8). The lock ended with the session."""
    engine = db.connect(make_postgres_database(postgres_server))
    try:
        _at_revision_on(engine, "0011")
        with engine.connect() as blocker:
            blocker.execute(sa.text("LOCK TABLE certificate IN ACCESS EXCLUSIVE MODE"))
            holder = blocker.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()

            def terminate_the_waiting_migration() -> None:
                """The backend waiting for the table lock; if none comes (a loaded machine),
                the blocker's after two minutes, so that the test fails instead of hanging."""
                deadline = time.monotonic() + 120
                with engine.connect() as admin:
                    while True:
                        waiting = admin.execute(
                            sa.text(
                                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                " AND datname = current_database() AND pid <> pg_backend_pid()"
                            )
                        ).scalars().all()  # fmt: skip
                        admin.rollback()  # pg_stat_activity is a snapshot per transaction
                        if waiting or time.monotonic() > deadline:
                            pid = waiting[0] if waiting else holder
                            admin.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
                            return
                        time.sleep(0.05)

            killer = threading.Thread(target=terminate_the_waiting_migration)
            killer.start()
            try:
                with pytest.raises(Unavailable) as failed:
                    db.upgrade(engine)
            finally:
                killer.join()
                blocker.rollback()
        assert "terminating connection due to administrator command" in str(failed.value)
        with engine.connect() as other:
            free = other.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": LOCK})
            assert free.scalar() is True
            other.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK})
        assert db.schema_status(engine)[0] == "0011"
    finally:
        engine.dispose()


def _at_revision_on(engine: sa.Engine, revision: str) -> None:
    from alembic import command

    config = db._config()
    with engine.connect() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
        connection.commit()
