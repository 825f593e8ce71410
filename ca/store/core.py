"""The Core ``Table`` behind each model, for statements that run once per issuance.

Statements built per call from ORM classes (``insert(Model).values(...)``) spend most of their
time in SQLAlchemy's coercion and cache-key machinery, about 100 µs each here, several times the
database work. The hot paths build their statements once, at import, on these tables and pass
only parameters per call (about 14 µs): same SQL, same types, same transaction.
"""

from __future__ import annotations

from typing import Any, cast

import sqlalchemy as sa
from sqlmodel import Session, SQLModel

__all__ = ["Insert", "insert_now", "table"]

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
