"""The Alembic migrations create exactly the schema ``ca.store.models`` describes, on SQLite and
PostgreSQL, and upgrading is idempotent."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlmodel import SQLModel

import ca.store.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from ca.config import Context
from ca.errors import NotInitialised
from ca.store import db

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
