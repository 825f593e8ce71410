"""The Core ``Table`` behind each model, for statements that run once per issuance.

Statements built per call from ORM classes (``insert(Model).values(...)``) spend most of their
time in SQLAlchemy's coercion and cache-key machinery, about 100 µs each here, several times the
database work. The hot paths build their statements once, at import, on these tables and pass
only parameters per call (about 14 µs): same SQL, same types, same transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.sql.compiler import SQLCompiler
from sqlmodel import Session, SQLModel

__all__ = ["Insert", "Prepared", "PreparedLookup", "insert_now", "prepared", "table"]

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


class Prepared:
    """One of those statements compiled once per dialect and run on the DBAPI cursor of the
    caller's connection, in its transaction.

    ``connection.execute`` still spends ~30 µs of Python per statement on a statement it has
    cached (parameter processing, an execution context, a result), which on the group commit's
    path (a batch's token spends, its inserts, the active-CA check) added 8 % to an issuance
    in batches of two and 4 % in batches of sixteen (docs/benchmarks.md, change 36). Here the
    values go through the same type processors SQLAlchemy applies (``bind_processor`` of each
    parameter's type for the dialect), and driver errors are handled as ``execute`` handles
    them (its exceptions, its events, the pool invalidated on a disconnect): callers and the
    HTTP problem mapping see no difference. Only for statements whose results need no
    processing (counts, integers). A connection whose engine has cursor-execute listeners
    (instrumentation) runs them through ``execute``, so that those still see every statement."""

    __slots__ = ("_compiled", "statement")

    def __init__(self, statement: sa.sql.expression.ClauseElement) -> None:
        self.statement = statement
        self._compiled: dict[tuple[str, tuple[str, ...]], tuple[str, list[Any], bool]] = {}

    def _for(self, dialect: sa.Dialect, keys: tuple[str, ...]) -> tuple[str, list[Any], bool]:
        found = self._compiled.get((dialect.name, keys))
        if found is None:
            compiled = cast(
                SQLCompiler, self.statement.compile(dialect=dialect, column_keys=list(keys))
            )
            binds = compiled.binds
            names = list(compiled.positiontup or ()) if compiled.positional else list(binds)
            # Values the statement carries (``role == "intermediate"``, ``LIMIT 1``) are bound
            # as given; a column default SQLAlchemy would compute is refused.
            given = set(keys)
            if (
                compiled.insert_prefetch
                or compiled.update_prefetch
                or any(binds[name].required for name in names if name not in given)
            ):
                raise ValueError(f"{self.statement} needs parameters that were not given")
            processors = [
                (
                    name,
                    binds[name].type.dialect_impl(dialect).bind_processor(dialect),
                    name in given,
                    binds[name].effective_value,
                )
                for name in names
            ]
            found = self._compiled[(dialect.name, keys)] = (
                compiled.string,
                processors,
                compiled.positional,
            )
        return found

    def executemany(self, connection: sa.Connection, rows: list[dict[str, Any]]) -> int:
        """Every row (all with the same keys); the number of rows changed, summed."""
        if _observed(connection):
            return int(connection.execute(cast(Any, self.statement), rows).rowcount)
        sql, processors, positional = self._for(connection.dialect, tuple(rows[0]))
        params = [_bound(processors, positional, row) for row in rows]

        def call(cursor: Any) -> int:
            cursor.executemany(sql, params)
            return int(cursor.rowcount)

        return cast(int, _run(connection, sql, params, call))

    def first(self, connection: sa.Connection, params: dict[str, Any]) -> tuple[Any, ...] | None:
        if _observed(connection):
            row = connection.execute(cast(Any, self.statement), params).first()
            return None if row is None else tuple(row)
        sql, processors, positional = self._for(connection.dialect, tuple(params))
        bound = _bound(processors, positional, params)

        def call(cursor: Any) -> tuple[Any, ...] | None:
            cursor.execute(sql, bound)
            row = cursor.fetchone()
            return None if row is None else tuple(row)

        return cast("tuple[Any, ...] | None", _run(connection, sql, bound, call))


# One compiled form per number of keys is kept up to this many keys (GroupRead asks for at most
# 256 at once): a few hundred kilobytes of SQL per statement at most.
CACHED_KEYS = 256


class PreparedLookup:
    """A SELECT with one expanding parameter (``IN :keys``) run on the DBAPI cursor: compiled
    once per dialect and number of keys, its rows read back through the result processors
    SQLAlchemy would apply (SQLite's datetimes are text until then). The per-statement cost of
    ``execute`` is the same as for ``Prepared``, and a worker runs one such lookup per batch
    (``ca.store.batch.GroupRead``)."""

    __slots__ = ("_compiled", "_name", "_readers", "statement")

    def __init__(self, statement: sa.Select[Any], name: str) -> None:
        self.statement = statement
        self._name = name
        self._compiled: dict[tuple[str, int], tuple[str, list[Any], bool]] = {}
        self._readers: dict[tuple[str, tuple[Any, ...]], list[tuple[str, Any]]] = {}

    def _for(self, dialect: sa.Dialect, count: int) -> tuple[str, list[Any], bool]:
        found = self._compiled.get((dialect.name, count))
        if found is None:
            compiled = self.statement.params({self._name: [None] * count}).compile(
                dialect=dialect, compile_kwargs={"render_postcompile": True}
            )
            expanded = {f"{self._name}_{i + 1}": i for i in range(count)}
            names = list(compiled.positiontup or ()) if compiled.positional else list(expanded)
            others = set(compiled.binds) - set(expanded) - {self._name}
            if set(names) - set(expanded) or others:
                raise ValueError(f"{self.statement} has parameters other than {self._name}")
            process = compiled.binds[self._name].type.dialect_impl(dialect).bind_processor(dialect)
            found = (
                compiled.string,
                [(name, expanded[name], process) for name in names],
                compiled.positional,
            )
            if count <= CACHED_KEYS:
                self._compiled[(dialect.name, count)] = found
        return found

    def _reader(self, dialect: sa.Dialect, description: Any) -> list[tuple[str, Any]]:
        type_codes = tuple(column[1] for column in description)
        found = self._readers.get((dialect.name, type_codes))
        if found is None:
            found = self._readers[(dialect.name, type_codes)] = [
                (key, column.type.dialect_impl(dialect).result_processor(dialect, type_code))
                for (key, column), type_code in zip(
                    self.statement.selected_columns.items(), type_codes, strict=True
                )
            ]
        return found

    def mappings(self, connection: sa.Connection, values: list[Any]) -> list[dict[str, Any]]:
        """The rows whose parameter is among ``values``, each as a dict by column key."""
        if _observed(connection):
            found = connection.execute(self.statement, {self._name: values}).mappings()
            return [dict(row) for row in found]
        sql, processors, positional = self._for(connection.dialect, len(values))
        bound_values = [
            (name, process(values[i]) if process else values[i]) for name, i, process in processors
        ]
        bound = tuple(v for _, v in bound_values) if positional else dict(bound_values)
        dialect = connection.dialect

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
        cursor.close()


def _bound(processors: list[Any], positional: bool, row: dict[str, Any]) -> Any:
    values = [
        (name, row[name] if from_row else fixed, process)
        for name, process, from_row, fixed in processors
    ]
    if positional:
        return tuple(process(v) if process else v for _, v, process in values)
    return {name: process(v) if process else v for name, v, process in values}


_PREPARED: dict[sa.sql.expression.ClauseElement, Prepared] = {}


def prepared(statement: sa.sql.expression.ClauseElement) -> Prepared:
    """The ``Prepared`` form of a statement built once (at import) by a hot path."""
    found = _PREPARED.get(statement)
    if found is None:
        found = _PREPARED.setdefault(statement, Prepared(statement))
    return found
