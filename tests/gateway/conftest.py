"""Gateway fixtures: a context with the gateway authority initialised and one consumer, ``acme``.

``gw`` runs on SQLite and PostgreSQL (tests/conftest.py's ``ctx``, mesh authority included): for
what depends on the database (uniqueness, counting live certificates, races, revocation).
``gw_lite`` is SQLite only, for rendering and cryptography, to keep the suite fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ca import gateway
from ca.clock import FixedClock
from ca.config import Context, Settings, build_context
from tests.conftest import PASSPHRASE, migrated_sqlite

ACME = gateway.ConsumerName("acme")


def _prepare(ctx: Context) -> Context:
    gateway.init_gateway(ctx, gateway.GatewayParams())
    gateway.add_consumer(ctx, ACME, "api@acme.example")
    return ctx


@pytest.fixture
def gw(ctx: Context) -> Context:
    return _prepare(ctx)


@pytest.fixture
def lite_ctx(tmp_path: Path, clock: FixedClock) -> Iterator[Context]:
    """A migrated SQLite store with no authority at all."""
    settings = Settings(
        data_dir=tmp_path / "var",
        database_url=migrated_sqlite(tmp_path / "gateway.db"),
        key_passphrase=PASSPHRASE,  # type: ignore[arg-type]
    )
    ctx = build_context(settings, clock=clock)
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture
def gw_lite(lite_ctx: Context) -> Context:
    return _prepare(lite_ctx)
