"""Fixtures for end-to-end CLI tests: an initialised CA and a real ``trellis serve``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.test_walkthrough import Trellis


@pytest.fixture
def trellis(tmp_path: Path, database_url: str) -> Trellis:
    """Initialised in-process (``Trellis.set_up``): the tests start from the CA, they do not
    test its ``init`` (the README walkthrough's, tests/cli/test_walkthrough.py, runs it)."""
    cli = Trellis(tmp_path / "var", database_url)
    cli.set_up("init", "--trust-domain", "example.org")
    return cli


@pytest.fixture
def server(trellis: Trellis, tmp_path: Path) -> Iterator[str]:
    with trellis.serving(tmp_path / "serve.log") as serving:
        yield serving.url
