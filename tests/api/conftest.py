"""REST API fixtures: an in-process ``TestClient`` over ``create_app(ctx)``, an admin token and
the ``Rest`` driver. Every fixture depends on ``ctx``, so every test using one runs on SQLite and
on PostgreSQL. ``clock`` is the suite's ``FixedClock`` (wall time at the start of the test): tests
advance it past the wall clock on purpose, so nothing may read time from anywhere else.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from ca.clock import FixedClock
from ca.config import Context
from ca.tokens import create_admin_token
from tests.api.restkit import Rest, bearer


@pytest.fixture
def client(ctx: Context) -> Iterator[TestClient]:
    # Server errors must come back as responses (500 problems), never as exceptions in the test.
    with TestClient(create_app(ctx), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def admin_token(ctx: Context) -> str:
    _info, secret = create_admin_token(ctx, "tests/api")
    return secret


@pytest.fixture
def admin_headers(admin_token: str) -> dict[str, str]:
    return bearer(admin_token)


@pytest.fixture
def rest(client: TestClient, admin_headers: dict[str, str], clock: FixedClock) -> Rest:
    return Rest(client, admin_headers, clock)
