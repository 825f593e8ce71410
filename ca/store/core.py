"""The Core ``Table`` behind each model, for statements that run once per issuance.

Statements built per call from ORM classes (``insert(Model).values(...)``) spend most of their
time in SQLAlchemy's coercion and cache-key machinery, about 100 µs each here, several times the
database work. The hot paths build their statements once, at import, on these tables and pass
only parameters per call (about 14 µs): same SQL, same types, same transaction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.sql.compiler import SQLCompiler
from sqlmodel import Session, SQLModel

__all__ = ["Insert", "Prepared", "insert_now", "prepared", "table"]

# A row to add with one of those statements: executed at once (``insert_now``) or with the rest
# of a group-commit batch (``ca.store.batch.Rows``).
Insert = tuple[sa.Insert, dict[str, Any]]


def table(model: type[SQLModel]) -> sa.Table:
    return cast(sa.Table, model.__table__)  # type: ignore[attr-defined]


def insert_now(session: Session | sa.Connection, *inserts: Insert) -> None:
    """In the caller's transaction; in a Session without autoflush, so the caller's pending
    changes keep their own flush (and error handling)."""
    if isinstance(session, Session):
        with session.no_autoflush:
            for statement, row in inserts:
                session.execute(statement, row)
    else:
        for statement, row in inserts:
            session.execute(statement, row)


# One compiled form per number of keys of an expanding parameter is kept up to this many keys
# (GroupRead asks for at most 256 at once): a few hundred kilobytes of SQL per statement at most.
CACHED_KEYS = 256

# (rendered parameter, parameter given, index in its list or None, fixed value, processor)
_Slot = tuple[str, str | None, int | None, Any, Any]


class Prepared:
    """One of those statements compiled once per dialect and run on the DBAPI cursor of the
    caller's connection, in its transaction.

    ``connection.execute`` still spends ~30 µs of Python per statement on a statement it has
    cached (parameter processing, an execution context, a result), which on the group commit's
    path (a batch's token lookups and spends, its inserts, the active-CA check) added 8 % to an
    issuance in batches of two and 4 % in batches of sixteen (docs/benchmarks.md, changes 36
    and 37). Values go through the type processors SQLAlchemy applies (``bind_processor`` of
    each parameter's type for the dialect, ``result_processor`` of each selected column: SQLite's
    datetimes are text until then), and driver errors are handled as ``execute`` handles them
    (its exceptions, its events, the pool invalidated on a disconnect): callers and the HTTP
    problem mapping see no difference. A parameter given as a list is an expanding one
    (``IN :keys``), compiled once per length. A connection whose engine has cursor-execute
    listeners (instrumentation) runs the statement through ``execute``, so that those still
    see every statement."""

    __slots__ = ("_compiled", "_readers", "statement")

    def __init__(self, statement: sa.sql.expression.ClauseElement) -> None:
        self.statement = statement
        self._compiled: dict[Any, tuple[str, list[_Slot], bool]] = {}
        self._readers: dict[tuple[str, tuple[Any, ...]], list[tuple[str, Any]]] = {}

    def _for(self, dialect: sa.Dialect, params: dict[str, Any]) -> tuple[str, list[_Slot], bool]:
        lengths = tuple((name, len(v)) for name, v in params.items() if isinstance(v, list))
        key = (dialect.name, tuple(params), lengths)
        found = self._compiled.get(key)
        if found is not None:
            return found
        statement = self.statement
        if lengths:
            statement = statement.params({name: [None] * n for name, n in lengths})
        compiled = cast(
            SQLCompiler,
            statement.compile(
                dialect=dialect,
                column_keys=list(params),
                compile_kwargs={"render_postcompile": True},
            ),
        )
        binds = compiled.binds
        expanded = {f"{name}_{i + 1}": (name, i) for name, n in lengths for i in range(n)}
        names = (
            list(compiled.positiontup or ())
            if compiled.positional
            else [*(b for b in binds if b not in dict(lengths) and b not in expanded), *expanded]
        )
        # Values the statement carries (``role == "intermediate"``, ``LIMIT 1``) are bound as
        # given; a column default SQLAlchemy would compute is refused.
        if compiled.insert_prefetch or compiled.update_prefetch:
            raise ValueError(f"{self.statement} needs parameters that were not given")
        slots: list[_Slot] = []
        for name in names:
            source, index = expanded.get(name, (name, None))
            bind = binds[source]
            if source not in params and bind.required:
                raise ValueError(f"{self.statement} needs parameters that were not given")
            slots.append(
                (
                    name,
                    source if source in params else None,
                    index,
                    bind.effective_value,
                    bind.type.dialect_impl(dialect).bind_processor(dialect),
                )
            )
        found = (compiled.string, slots, compiled.positional)
        if sum(n for _, n in lengths) <= CACHED_KEYS:
            self._compiled[key] = found
        return found

    def executemany(self, connection: sa.Connection, rows: list[dict[str, Any]]) -> int:
        """Every row; the number of rows changed, summed."""
        if _observed(connection):
            return int(connection.execute(cast(Any, self.statement), rows).rowcount)
        by_keys: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for row in rows:
            by_keys.setdefault(tuple(row), []).append(row)
        changed = 0
        for same in by_keys.values():
            sql, slots, positional = self._for(connection.dialect, same[0])
            params = [_bound(slots, positional, row) for row in same]

            def call(cursor: Any, sql: str = sql, params: list[Any] = params) -> int:
                cursor.executemany(sql, params)
                return int(cursor.rowcount)

            changed += cast(int, _run(connection, sql, params, call))
        return changed

    def rows(self, connection: sa.Connection, params: dict[str, Any]) -> list[dict[str, Any]]:
        """The rows of a SELECT, each as a dict by column key."""
        if _observed(connection):
            found = connection.execute(cast(Any, self.statement), params).mappings()
            return [dict(row) for row in found]
        dialect = connection.dialect
        sql, slots, positional = self._for(dialect, params)
        bound = _bound(slots, positional, params)

        def call(cursor: Any) -> list[dict[str, Any]]:
            cursor.execute(sql, bound)
            rows = cursor.fetchall()
            reader = self._reader(dialect, cursor.description)
            return [
                {key: convert(value) if convert else value
                 for (key, convert), value in zip(reader, row, strict=True)}
                for row in rows
            ]  # fmt: skip

        return cast("list[dict[str, Any]]", _run(connection, sql, bound, call))

    def first(self, connection: sa.Connection, params: dict[str, Any]) -> tuple[Any, ...] | None:
        found = self.rows(connection, params)
        return tuple(found[0].values()) if found else None

    def _reader(self, dialect: sa.Dialect, description: Any) -> list[tuple[str, Any]]:
        type_codes = tuple(column[1] for column in description)
        found = self._readers.get((dialect.name, type_codes))
        if found is None:
            columns = cast("sa.Select[Any]", self.statement).selected_columns.items()
            found = self._readers[(dialect.name, type_codes)] = [
                (key, column.type.dialect_impl(dialect).result_processor(dialect, type_code))
                for (key, column), type_code in zip(columns, type_codes, strict=True)
            ]
        return found


def _bound(slots: list[_Slot], positional: bool, params: dict[str, Any]) -> Any:
    values = []
    for name, source, index, fixed, process in slots:
        value = fixed if source is None else params[source]
        if index is not None:
            value = value[index]
        values.append((name, process(value) if process else value))
    if positional:
        return tuple(value for _, value in values)
    return dict(values)


def _observed(connection: sa.Connection) -> bool:
    """Whether something listens to the statements this connection runs (SQL instrumentation,
    a test counting them): then they go through ``execute`` and its events, as before."""
    dispatch = connection.dispatch
    return bool(dispatch.before_cursor_execute or dispatch.after_cursor_execute)


def _run(connection: sa.Connection, sql: str, params: Any, call: Callable[[Any], Any]) -> Any:
    dbapi_connection = connection.connection.dbapi_connection
    assert dbapi_connection is not None
    cursor = dbapi_connection.cursor()
    try:
        return call(cursor)
    except connection.dialect.loaded_dbapi.Error as error:
        # What execute does with a driver error: SQLAlchemy's exception, the handle_error
        # events (ca.store.db resets the other pool on a disconnect), and on a disconnect the
        # connection and every pooled one older than it invalidated. SQLAlchemy has no public
        # entry point for this; tests/api/test_database_outage.py covers it.
        connection._handle_dbapi_exception(error, sql, params, cursor, None)
    finally:
        # A connection invalidated there (a disconnect, or SQLite's read-only refusal:
        # ca.store.db) is closed already, and pysqlite's cursor then refuses to close: its
        # ProgrammingError replaced the error being raised.
        with contextlib.suppress(connection.dialect.loaded_dbapi.Error):
            cursor.close()


_PREPARED: dict[sa.sql.expression.ClauseElement, Prepared] = {}


def prepared(statement: sa.sql.expression.ClauseElement) -> Prepared:
    """The ``Prepared`` form of a statement built once (at import) by a hot path."""
    found = _PREPARED.get(statement)
    if found is None:
        found = _PREPARED.setdefault(statement, Prepared(statement))
    return found
