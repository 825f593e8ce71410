"""The workload ``tests.bench.instructions`` counts: it must keep issuing through this checkout's
code, or the comparison it makes would count a failure's instructions."""

from __future__ import annotations

import runpy
from typing import Any

import pytest

from tests.bench.instructions import LOAD


def _load() -> dict[str, Any]:
    return runpy.run_path(str(LOAD), run_name="instructions_load")


@pytest.mark.parametrize("mode", ["ca", "asgi", "renew"])
def test_the_workload_issues(mode: str) -> None:
    _load()["main"](mode, 1, most=1)


def test_a_refused_issuance_fails_the_workload() -> None:
    """A run whose requests were refused (here: join tokens that do not exist) is an error, not
    a count."""
    load = _load()
    load["main"].__globals__["create_join_token"] = lambda *_, **__: (None, "no-such-token")
    with pytest.raises(SystemExit, match=r"not every issuance succeeded: \[401\]"):
        load["main"]("asgi", 1)
