"""The database URLs ``ca.config`` takes: a SQLite URL names a file and nothing else, so that
the file Trellis makes, locks, backs up and counts as its own is the one SQLite opens; a
PostgreSQL URL keeps libpq's query options. tests/cli/test_database_url.py runs the same
refusals through real processes."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from ca.config import SQLITE_SUFFIXES, load_data_paths
from ca.errors import InvalidInput
from ca.store.db import normalise_url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        # pysqlite opened '<path>?cache=private' while Trellis made and backed up '<path>'
        pytest.param(
            "sqlite:////srv/ca.db?uri=true&cache=private",
            "SQLite query options are not supported ('cache', 'uri')",
            id="fail/query/uri-and-cache",
        ),
        pytest.param(
            "sqlite:////srv/ca.db?uri=true&mode=ro",
            "SQLite query options are not supported ('mode', 'uri')",
            id="fail/query/uri-and-mode",
        ),
        pytest.param("sqlite:////srv/ca.db?uri=true", "('uri')", id="fail/query/uri"),
        # ValueError from sa.create_engine: a traceback, exit 1
        pytest.param("sqlite:////srv/ca.db?timeout=abc", "('timeout')", id="fail/query/timeout"),
        pytest.param("sqlite:///ca.db?detect_types=x", "('detect_types')", id="fail/query/types"),
        pytest.param(
            "sqlite:///ca.db?cached_statements=x", "('cached_statements')", id="fail/query/cached"
        ),
        pytest.param(
            "sqlite:///ca.db?check_same_thread=maybe",
            "('check_same_thread')",
            id="fail/query/same-thread",
        ),
        pytest.param("sqlite:///ca.db?uri=maybe", "('uri')", id="fail/query/uri-maybe"),
        pytest.param(
            "sqlite:///ca.db?isolation_level=SERIALIZABLE",
            "('isolation_level')",
            id="fail/query/isolation",
        ),
        # a warning, and ignored: mode=ro opened read-write
        pytest.param("sqlite:///ca.db?mode=ro", "('mode')", id="fail/query/mode-ro"),
        pytest.param("sqlite:///ca.db?foo=bar", "('foo')", id="fail/query/unknown"),
        pytest.param(
            "sqlite:///ca.db?journal_mode=delete", "('journal_mode')", id="fail/query/journal"
        ),
        pytest.param(
            "sqlite:///ca.db?a=1&b=2&c=3&d=4&e=5&f=6",
            "('a', 'b', 'c', 'd', 'e'):",
            id="fail/query/many",
        ),
        # ArgumentError from sa.create_engine once the file existed
        pytest.param(
            "sqlite://localhost//srv/ca.db", "a user, password or host", id="fail/sqlite/host"
        ),
        pytest.param("sqlite://u:pw@/ca.db", "a user, password or host", id="fail/sqlite/user"),
        # a URI to sqlite3.connect(path): the backup snapshot was of a new, empty 'ca.db'
        pytest.param("sqlite:///file:ca.db", "a SQLite URI filename", id="fail/sqlite/file-uri"),
        pytest.param(
            "sqlite:///file::memory:?uri=true", "an in-memory database", id="fail/memory/uri"
        ),
        pytest.param("sqlite:///ca.db?mode=memory", "an in-memory database", id="fail/memory/mode"),
        # Trellis ships psycopg 3 alone; the message said "use sqlite or postgresql"
        pytest.param(
            "postgresql+psycopg2://u@db/trellis",
            "unsupported database 'postgresql+psycopg2': give sqlite:///path or"
            " postgresql://user@host/db (also postgres:// and postgresql+psycopg://",
            id="fail/driver/psycopg2",
        ),
        pytest.param(
            "postgresql+asyncpg://u@db/trellis",
            "unsupported database 'postgresql+asyncpg': give sqlite:///path",
            id="fail/driver/asyncpg",
        ),
        pytest.param(
            "sqlite+pysqlite:///ca.db",
            "unsupported database 'sqlite+pysqlite': give sqlite:///path",
            id="fail/driver/pysqlite",
        ),
    ],
)
def test_a_database_url_trellis_cannot_honour_is_refused(url: str, message: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        load_data_paths(database_url=url)
    shown = url.replace(":pw@", ":***@")  # a password is never repeated (ca.redact)
    assert refused.value.detail.startswith(f"--database-url={shown!r}: "), refused.value.detail
    assert message in refused.value.detail
    assert "\n" not in refused.value.detail


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("sqlite:///ca.db", id="ok/sqlite/relative"),
        pytest.param("sqlite:////srv/trellis/ca.db", id="ok/sqlite/absolute"),
        pytest.param("sqlite:////srv/trellis/ca.db?", id="ok/sqlite/empty-query"),
        pytest.param("sqlite:////srv/file:ca.db", id="ok/sqlite/file-in-a-name"),
        # libpq's own options are the operator's to set (docs/configuration.md)
        pytest.param("postgresql://u:pw@db:5432/trellis?sslmode=verify-full", id="ok/pg/ssl"),
        pytest.param("postgres://u@/trellis?host=/run/postgresql", id="ok/pg/socket"),
        pytest.param("postgresql+psycopg://u@db/t?keepalives_idle=60", id="ok/pg/psycopg"),
    ],
)
def test_a_database_url_trellis_honours_is_taken(url: str) -> None:
    assert load_data_paths(database_url=url).database_url == url


def test_normalise_url_names_the_forms_it_takes() -> None:
    with pytest.raises(InvalidInput) as refused:
        normalise_url("postgresql+psycopg2://u@db/trellis")
    assert "give sqlite:///path or postgresql://user@host/db" in refused.value.detail


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("var?a=b", id="question-mark"),
        pytest.param("p%41q", id="percent-escape"),
        pytest.param("a#b c", id="hash-and-space"),
        pytest.param("x:y@z", id="colon-and-at"),
    ],
)
def test_the_default_database_is_in_the_data_dir_whatever_its_name(
    tmp_path: Path, name: str
) -> None:
    """``f"sqlite:///{path}"``: the data dir ``var?a=b`` kept its database in the file ``var``
    beside it (the rest a query, ignored with a warning), and ``p%41q`` in ``pAq/``."""
    paths = load_data_paths(data_dir=tmp_path / name, database_url=None)
    url = make_url(paths.effective_database_url)
    database = (tmp_path / name / "trellis.db").resolve()
    assert (url.drivername, url.database, dict(url.query)) == ("sqlite", str(database), {})
    assert paths.own_data().files == {Path(f"{database}{suffix}") for suffix in SQLITE_SUFFIXES}
