"""What an API worker process (``api.asgi``, what ``trellis serve --workers N`` runs) loads and
keeps: every worker pays for each module in memory (the benchmark's goal is all workers together
under 300 MB), so what only the CLI, migrations or a federation fetch need is imported where it
is used; and what it built at start-up is exempt from the cyclic collector's full scans."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from ca.config import Context

# alembic: only the parent migrates. httpx: with click installed it imports its own command line,
# and rich and pygments with it.
NOT_IN_A_WORKER = ("alembic", "httpx", "click", "rich", "pygments", "typer", "hvac")


def test_a_worker_imports_no_cli_migration_or_http_client_modules() -> None:
    probe = (
        "import json, sys; import api.asgi; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert set(json.loads(loaded.stdout)) & set(NOT_IN_A_WORKER) == set()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_started_worker_has_frozen_its_start_up_heap(ctx: Context) -> None:
    """A full collection scanning the ~130,000 start-up objects took ~70 ms, which every request
    in flight waited out: the p99 at c=16 went from 74-103 ms to 29 ms once they were frozen."""
    probe = (
        "import gc; from fastapi.testclient import TestClient; "
        "from api.asgi import app_from_environment; "
        "before = gc.get_freeze_count(); app = app_from_environment(); "
        "client = TestClient(app).__enter__(); "
        "print(before, gc.get_freeze_count(), client.get('/healthz').status_code); "
        "client.__exit__(None, None, None)"
    )
    passphrase = ctx.settings.key_passphrase
    assert passphrase is not None
    env = {
        **os.environ,
        "TRELLIS_DATA_DIR": str(ctx.settings.data_dir),
        "TRELLIS_DATABASE_URL": ctx.settings.effective_database_url,
        "TRELLIS_KEY_PASSPHRASE": passphrase.get_secret_value(),
    }
    started = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=env
    )
    assert started.returncode == 0, started.stderr[-2000:]
    before, frozen, health = started.stdout.split()
    assert (int(before), health) == (0, "200")
    assert int(frozen) > 50_000


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_serving_app_names_its_loop_for_the_audit_sealer(ctx: Context) -> None:
    """The audit-seal job has the loop that serves requests seal (``ca.jobs.seal_audit``):
    the app's lifespan names it while it serves, and no longer once it has stopped."""
    assert ctx.serving_loop is None
    with TestClient(create_app(ctx)) as client:
        loop = ctx.serving_loop
        assert isinstance(loop, asyncio.AbstractEventLoop) and loop.is_running()
        assert client.get("/healthz").status_code == 200
    assert ctx.serving_loop is None
