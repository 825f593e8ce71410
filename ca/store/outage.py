"""Database errors that mean the database cannot be used right now, and why, in one line.

``api.problems`` answers these 503 (the caller may retry), ``ca.issue`` counts an issuance they
fail as ``unavailable`` (the code of that 503), and the request log and the metrics scrape say
why (``/readyz``, which anyone may read, names only the kind: libpq's words name the host).
SQLAlchemy's own text of an error spans lines and repeats the statement; its type alone
(``OperationalError``) said the same for a refused connection, a wrong password, "too many
clients" and a read-only file, so the driver's message is what is shown.
"""

from __future__ import annotations

import sqlalchemy as sa

from ca.redact import masked_url

__all__ = ["reason", "unreachable"]

# A reason longer than this is cut: one log line.
REASON_LIMIT = 300


def unreachable(error: BaseException) -> bool:
    """A lost or refused connection, or the database refusing work for its own state (down,
    read-only, locked, out of connections): not the statement's fault."""
    if isinstance(error, sa.exc.OperationalError | sa.exc.InterfaceError):
        return True
    return isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated


def reason(error: BaseException) -> str:
    """``error`` as one line: the driver's exception type and message (libpq's spans lines),
    with any password in it masked (``ca.redact``): a driver may repeat its connection string."""
    cause = error.orig if isinstance(error, sa.exc.DBAPIError) and error.orig else error
    if isinstance(cause, sa.exc.StatementError):  # no driver message: not the SQL either
        return type(cause).__name__
    words = [_masked(word) for word in str(cause).split()]
    line = f"{type(cause).__name__}: {' '.join(words)}" if words else type(cause).__name__
    return line if len(line) <= REASON_LIMIT else line[: REASON_LIMIT - 1] + "…"


def _masked(word: str) -> str:
    if "://" not in word and "=" in word:  # a conninfo pair: password=...
        return masked_url("?" + word)[0][1:]
    return masked_url(word)[0]
