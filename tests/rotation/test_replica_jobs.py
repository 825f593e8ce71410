"""The scheduler with several replicas on one PostgreSQL database, as ``deploy/k8s/ha`` runs it:
a cluster-wide job runs about once per interval across them (not once per replica), a node job
once per interval per node; a run that cannot reach the database is one log line; a replica
left behind by a newer one's migration stops its jobs and leaves the rotation."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from pydantic import SecretStr

from api.app import create_app
from ca import readiness, scheduler
from ca.config import Context, Settings, build_context
from ca.jobs import Job, Scope, job_named
from ca.scheduler import job_statuses, start_scheduler
from ca.store import db
from ca.store.db import SCHEMA_HEADS
from tests.conftest import PASSPHRASE, drop_postgres_database, make_postgres_database
from tests.rotation.rotkit import BOTH_DATABASES
from tests.rotation.test_jobs import RecordingScheduler

HEAD = ",".join(sorted(SCHEMA_HEADS))


@pytest.fixture
def pg_url(postgres_server: str, postgres_template: str) -> Iterator[str]:
    url = make_postgres_database(postgres_server, template=postgres_template)
    yield url
    drop_postgres_database(postgres_server, url)


def replica(tmp_path: Path, url: str, name: str, node: str) -> Context:
    """One ``trellis serve``'s context: its own engines and data dir, the real clock."""
    settings = Settings(
        data_dir=tmp_path / name,
        database_url=url,
        key_passphrase=SecretStr(PASSPHRASE),
        node_name=node,
    )
    return build_context(settings)


@pytest.mark.postgres
@pytest.mark.slow
def test_three_schedulers_run_a_cluster_job_once_per_interval_and_a_node_job_per_node(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: with three replicas audit-seal ran 89 times a minute (30 expected): each
    replica ran every job once per interval, the advisory lock only kept two runs from
    overlapping. Two replicas share node A, one is on node B."""
    ran: Counter[tuple[str, str]] = Counter()
    lock = threading.Lock()

    def count(ctx: Context, name: str) -> str:
        with lock:
            ran[(name, ctx.settings.node_name)] += 1
        return "counted"

    cluster = Job("count-cluster", 1, lambda ctx: count(ctx, "cluster"), "counts its runs")
    node = Job("count-node", 1, lambda ctx: count(ctx, "node"), "counts its runs", Scope.NODE)
    monkeypatch.setattr(scheduler, "JOBS", (cluster, node))
    replicas = [
        replica(tmp_path, pg_url, "a1", "node-a"),
        replica(tmp_path, pg_url, "a2", "node-a"),
        replica(tmp_path, pg_url, "b1", "node-b"),
    ]
    seconds = 5  # a bug's ~3 x 5 runs is clear of the bounds below, as its ~3 x 8 was
    try:
        schedulers = []
        for ctx in replicas:  # a third of the interval apart: replicas never start together
            schedulers.append(start_scheduler(ctx))
            time.sleep(0.33)
        time.sleep(seconds - 1)
        for started in schedulers:
            started.shutdown(wait=True)
        runs = dict(ran)
        cluster_runs = sum(n for (name, _), n in runs.items() if name == "cluster")
        # about one a second: not one a second per replica (about 3 x 5 = 15)
        assert seconds - 2 <= cluster_runs <= seconds + 2, runs
        # per node: node A's two replicas share its runs, node B's replica has its own
        assert seconds - 2 <= runs[("node", "node-a")] <= seconds + 2, runs
        assert seconds - 2 <= runs[("node", "node-b")] <= seconds + 2, runs
        records = {(s.name, s.node): s.runs for s in job_statuses(replicas[0])}
        (cluster_record,) = [r for (name, _), r in records.items() if name == "count-cluster"]
        assert cluster_record == cluster_runs
        assert records[("count-node", "node-a")] == runs[("node", "node-a")]
    finally:
        for ctx in replicas:
            ctx.close()


@pytest.mark.postgres
def test_a_run_that_cannot_reach_the_database_is_one_line_and_backs_off(
    pg_url: str,
    postgres_server: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: during an outage APScheduler logged 'Job "_tick (trigger: interval...)"
    raised an exception' with an OperationalError's whole traceback, every tick of every job,
    and nothing named the job. Now: one warning naming the job and the database's reason, its
    repeats at debug, the traceback once at debug, the back-off of a failure; the first run
    after the outage records its outcome."""
    monkeypatch.setattr(scheduler, "_LAST_LOGGED", {})
    # Ticks come seconds apart: a pooled connection is checked before it is used again, and a
    # dead one replaced (the test's ticks come within milliseconds).
    monkeypatch.setattr(db, "IDLE_PING_SECONDS", 0.0)
    ctx = replica(tmp_path, pg_url, "a1", "node-a")
    job = job_named("prune-renewal-nonces")
    recorder = RecordingScheduler()
    database = sa.make_url(pg_url).database
    admin = sa.create_engine(
        postgres_server.replace("postgresql://", "postgresql+psycopg://", 1),
        isolation_level="AUTOCOMMIT",
    )

    def outage(on: bool) -> None:  # the database refuses connections, and drops those it has
        with admin.connect() as connection:
            connection.execute(
                sa.text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {str(not on).lower()}')
            )
            if on:
                connection.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"
                    ),
                    {"d": database},
                )

    caplog.set_level(logging.DEBUG, logger="trellis.scheduler")
    try:
        outage(True)
        for _ in range(3):
            scheduler._tick(ctx, recorder, job)  # type: ignore[arg-type]
        mine = [r for r in caplog.records if r.name == "trellis.scheduler"]
        lines = [r for r in mine if r.getMessage().startswith("job prune-renewal-nonces failed")]
        assert [r.levelno for r in lines] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
        assert "cannot reach the database: OperationalError: " in lines[0].getMessage()
        assert "\n" not in lines[0].getMessage() and lines[0].exc_info is None
        tracebacks = [r for r in mine if r.exc_info]
        assert [r.levelno for r in tracebacks] == [logging.DEBUG]
        delays = [
            round((c["run_date"] - c["run_date"].now(c["run_date"].tzinfo)).total_seconds())
            for c in recorder.calls
        ]
        assert delays == [10, 20, 40]
        assert all(c["id"] == "prune-renewal-nonces-retry" for c in recorder.calls)
    finally:
        outage(False)
        admin.dispose()
    try:
        caplog.clear()
        scheduler._tick(ctx, recorder, job)  # type: ignore[arg-type]
        (status,) = [s for s in job_statuses(ctx) if s.name == job.name]
        assert (status.runs, status.last_ok) == (1, True)
        back = [r for r in caplog.records if r.getMessage().startswith("job prune-renewal")]
        assert [(r.levelno, r.getMessage()) for r in back] == [
            (logging.INFO, "job prune-renewal-nonces: pruned 0 spent renewal proof(s)")
        ]
    finally:
        ctx.close()


def _set_revision(ctx: Context, revision: str) -> None:
    with ctx.engine.begin() as connection:
        connection.execute(sa.text("UPDATE alembic_version SET version_num = :r"), {"r": revision})


@BOTH_DATABASES
def test_a_replica_older_than_the_schema_stops_its_jobs_and_is_unready(
    ctx: Context, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: during a rolling upgrade the old replicas ran on after the first new one had
    migrated the schema: their jobs failed on ``job_run`` every 2 s (IntegrityError,
    StaleDataError) and rewrote the new replicas' records, and ``/readyz`` said 200."""
    ran: list[str] = []
    job = dataclasses.replace(job_named("crl-resign"), run=lambda _ctx: ran.append("x") or "ran")
    recorder = RecordingScheduler()
    caplog.set_level(logging.INFO, logger="trellis.scheduler")
    monkeypatch.setattr(readiness, "READY_FOR", 0.0)  # no passing verdict reused for 5 s
    with TestClient(create_app(ctx)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["detail"]["schema"] == "ok"
        scheduler._tick(ctx, recorder, job)  # type: ignore[arg-type]
        assert ran == ["x"]

        _set_revision(ctx, "9999")  # a newer Trellis migrated the database meanwhile
        try:
            deadline = time.monotonic() + 10
            while (ready := client.get("/readyz")).status_code == 200:
                assert time.monotonic() < deadline, ready.json()
                time.sleep(0.2)
            assert ready.status_code == 503
            assert ready.json()["status"] == "unavailable"
            assert ready.json()["detail"]["schema"] == (
                f"the database schema 9999 is newer than this version's {HEAD}:"
                " this replica is outdated"
            )
            for _ in range(3):
                scheduler._tick(ctx, recorder, job)  # type: ignore[arg-type]
            assert ran == ["x"], "an outdated replica ran a job"
            stopped = [r for r in caplog.records if "scheduled jobs stop" in r.getMessage()]
            assert [(r.levelno, r.getMessage()) for r in stopped] == [
                (
                    logging.WARNING,
                    f"the database schema 9999 is newer than this version's {HEAD}:"
                    " this replica is outdated: its scheduled jobs stop",
                )
            ]
        finally:
            _set_revision(ctx, HEAD)
