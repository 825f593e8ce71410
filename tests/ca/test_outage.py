"""``ca.store.outage.reason``: the driver's reason for a database error, on one line, with no
password in it."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from ca.store.outage import reason, unreachable
from tests.conftest import free_port


def test_a_refused_connection_says_so_on_one_line() -> None:
    engine = sa.create_engine(
        f"postgresql+psycopg://trellis:s3cret@127.0.0.1:{free_port()}/trellis",
        poolclass=sa.pool.NullPool,
    )
    with pytest.raises(sa.exc.OperationalError) as raised:
        engine.connect()
    said = reason(raised.value)
    assert unreachable(raised.value)
    assert said.startswith("OperationalError: ") and "Connection refused" in said, said
    assert "\n" not in said and "\t" not in said and "s3cret" not in said
    assert "[SQL" not in said and "sqlalche.me" not in said  # the driver's words only


@pytest.mark.parametrize(
    "message",
    [
        "could not use postgresql://trellis:s3cret@db:5432/ca: refused",
        "invalid connection option host=db password=s3cret user=trellis",
    ],
    ids=["url", "conninfo"],
)
def test_a_password_a_driver_repeats_is_masked(message: str) -> None:
    error = sa.exc.OperationalError("SELECT 1", {}, ValueError(message))
    said = reason(error)
    assert "s3cret" not in said and "***" in said, said
    assert said.startswith("ValueError: ")


def test_a_long_reason_is_cut() -> None:
    said = reason(sa.exc.OperationalError("SELECT 1", {}, ValueError("x " * 500)))
    assert len(said) == 300 and said.endswith("…")
