"""Fixtures for the federation tests: ``ctx`` (tests/conftest.py, SQLite and PostgreSQL) is our
own trust domain ``example.org``; ``partner`` is a separate Trellis for ``b.test``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ca.clock import FixedClock
from tests.federation.fedkit import Partner, make_partner


@pytest.fixture
def partner(tmp_path: Path, clock: FixedClock) -> Iterator[Partner]:
    partner = make_partner(tmp_path / "partner", clock)
    yield partner
    partner.ctx.close()
