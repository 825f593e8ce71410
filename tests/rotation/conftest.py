"""Fixtures for the rotation suites: the drill authority (3-minute intermediate, 20-second SVIDs)
on the suite's ``FixedClock``."""

from __future__ import annotations

import pytest

from ca.authority import init_authority
from ca.config import Context
from tests.rotation.rotkit import DRILL


@pytest.fixture
def drill_ctx(bare_ctx: Context) -> Context:
    init_authority(bare_ctx, DRILL)
    return bare_ctx
