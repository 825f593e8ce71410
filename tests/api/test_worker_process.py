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

from api.app import YOUNG_THRESHOLD, create_app
from ca.config import Context
from ca.entries import EntryParams, create_entry
from ca.identity import SpiffeId
from ca.tokens import create_join_token
from tests.bench.loadgen import make_csrs

# alembic: only the parent migrates. httpx: with click installed it imports its own command line,
# and rich and pygments with it.
NOT_IN_A_WORKER = ("alembic", "httpx", "click", "rich", "pygments", "typer", "hvac")


def _worker_env(ctx: Context) -> dict[str, str]:
    """What ``trellis serve`` exports to its workers, for a worker started by hand."""
    passphrase = ctx.settings.key_passphrase
    assert passphrase is not None
    return {
        **os.environ,
        "TRELLIS_DATA_DIR": str(ctx.settings.data_dir),
        "TRELLIS_DATABASE_URL": ctx.settings.effective_database_url,
        "TRELLIS_KEY_PASSPHRASE": passphrase.get_secret_value(),
    }


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
    env = _worker_env(ctx)
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


# A worker's app (``api.asgi``), its lifespan started as uvicorn starts it, then ``rounds`` of 16
# SVID requests at once straight through ASGI; prints the collections of the youngest
# generation during them, and the responses' statuses.
_BURST = """
import asyncio, gc, json, sys
from api.asgi import app_from_environment
token, csrs, rounds = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
app = app_from_environment()

async def post(body):
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/svid", "raw_path": b"/v1/svid",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 2), "headers": [
                 (b"authorization", b"Bearer " + token.encode()),
                 (b"content-type", b"application/json"),
                 (b"content-length", str(len(body)).encode())]}
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    statuses = []
    async def receive():
        if messages:
            return messages.pop()
        await asyncio.Event().wait()
    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])
    await app(scope, receive, send)
    return statuses[0]

async def main():
    to_app, from_app = asyncio.Queue(), asyncio.Queue()
    lifespan = asyncio.ensure_future(app({"type": "lifespan", "asgi": {"version": "3.0"}},
                                         to_app.get, from_app.put))
    await to_app.put({"type": "lifespan.startup"})
    assert (await from_app.get())["type"] == "lifespan.startup.complete"
    young = []
    gc.callbacks.append(lambda phase, info: phase == "start" and young.append(info["generation"]))
    statuses = []
    for r in range(rounds):
        bodies = [json.dumps({"csr": csr}).encode() for csr in csrs]
        statuses += await asyncio.gather(*(post(b) for b in bodies))
    gc.callbacks.clear()
    print(json.dumps({"collections": len(young), "threshold": gc.get_threshold()[0],
                      "statuses": sorted(set(statuses)), "count": len(statuses)}))
    await to_app.put({"type": "lifespan.shutdown"})
    await lifespan

asyncio.run(main())
"""


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_requests_in_flight_do_not_set_off_the_cyclic_collector(ctx: Context) -> None:
    """With Python's threshold (700 objects) the objects of 16 issuances in flight set off a
    young collection every 5 to 10 certificates, and through the promotions a full one every
    second or so: 21 to 29 µs of CPU a certificate in the benchmark. A worker raises it once started
    (``freeze_startup_heap``); 320 certificates, 16 at a time, then set off at most one."""
    entry = create_entry(ctx, EntryParams(spiffe_id=SpiffeId.parse("spiffe://example.org/gc")))
    _, token = create_join_token(ctx, entry.id, uses=1000)
    csrs = [c.pem for c in make_csrs(16, ["spiffe://example.org/gc"])]
    env = _worker_env(ctx)
    burst = subprocess.run(
        [sys.executable, "-c", _BURST, token, json.dumps(csrs), "20"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert burst.returncode == 0, burst.stderr[-2000:]
    found = json.loads(burst.stdout.splitlines()[-1])
    assert found["statuses"] == [200] and found["count"] == 320
    assert found["threshold"] == YOUNG_THRESHOLD
    assert found["collections"] <= 1, found
