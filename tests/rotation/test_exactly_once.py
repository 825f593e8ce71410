"""Exactly once across replicas on PostgreSQL: the per-job advisory lock of ``run_job`` and the
per-authority transition lock of ``rotate``, first in-process, then with two real
``trellis serve`` processes sharing one database and one key directory."""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

import httpx
import pytest
import sqlalchemy as sa
from pydantic import SecretStr

from ca.authority import init_authority
from ca.clock import FixedClock, SystemClock
from ca.config import Context, Settings, build_context
from ca.jobs import Job
from ca.rotation import RotationInProgress, Transition, rotate
from ca.scheduler import run_job
from ca.store.db import SchemaPolicy
from ca.store.models import JobRunRow
from tests.cli.test_walkthrough import TRELLIS, Trellis
from tests.conftest import PASSPHRASE, free_port, make_postgres_database
from tests.processes import terminate
from tests.rotation.rotkit import DRILL, activate_moment, ca_rows, only

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_url(postgres_server: str) -> str:
    return make_postgres_database(postgres_server)


@pytest.fixture
def replicas(pg_url: str, tmp_path: Path, clock: FixedClock) -> Iterator[tuple[Context, Context]]:
    """Two contexts (two engines, two connection pools) on one database and one data dir."""
    settings = Settings(
        data_dir=tmp_path / "var", database_url=pg_url, key_passphrase=SecretStr(PASSPHRASE)
    )
    first = build_context(settings, clock=clock)
    second = build_context(settings, clock=clock)
    yield first, second
    first.close()
    second.close()


def test_run_job_runs_once_while_another_replica_holds_its_lock(
    replicas: tuple[Context, Context],
) -> None:
    entered, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def hold(ctx: Context) -> str:
        ran.append(threading.current_thread().name)
        entered.set()
        assert release.wait(30), "never released"
        return "held the lock"

    job = Job("lock-probe", 10, hold, "holds its advisory lock until released")
    start = threading.Barrier(2)

    def replica(ctx: Context) -> JobRunRow | None:
        start.wait(10)
        return run_job(ctx, job)

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(replica, ctx) for ctx in replicas]
        assert entered.wait(30), "neither replica ran the job"
        # the replica that did not get the lock returns at once, while the lock is still held
        deadline = time.monotonic() + 30
        while not any(f.done() for f in futures) and time.monotonic() < deadline:
            time.sleep(0.05)
        skipped = [f for f in futures if f.done()]
        assert len(skipped) == 1, "the second replica waited for the lock instead of skipping"
        assert skipped[0].result() is None
        assert not release.is_set() and len(ran) == 1
        release.set()
        results = [f.result(timeout=30) for f in futures]
    rows = [r for r in results if r is not None]
    assert len(rows) == 1 and len(ran) == 1
    assert (rows[0].runs, rows[0].last_ok, rows[0].last_result) == (1, True, "held the lock")
    # the lock is released with the run: the other replica gets it next time
    again = run_job(replicas[1], job)
    assert again is not None and again.runs == 2


def test_concurrent_rotations_transition_once(
    replicas: tuple[Context, Context], clock: FixedClock
) -> None:
    first, _ = replicas
    init_authority(first, DRILL)
    old = only(first, "intermediate", "active")

    def race(moment: dt.datetime) -> list[Transition]:
        clock.current = moment
        barrier = threading.Barrier(4)

        def call(ctx: Context) -> list[Transition]:
            barrier.wait(10)
            try:
                return rotate(ctx)
            except RotationInProgress:
                return []  # another call held the authority's lock: it does the transition

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(call, [*replicas, *replicas]))
        return [t for done in results for t in done]

    prepared = race(activate_moment(old) - dt.timedelta(seconds=20))
    assert [t.event for t in prepared] == ["prepared"]
    activated = race(activate_moment(old))
    assert sorted(t.event for t in activated) == ["activated", "retired"]
    assert only(first, "intermediate", "active").serial == prepared[0].serial
    assert Counter(e for _, e in _events(first)) == {
        "created": 2,
        "prepared": 1,
        "retired": 1,
        "activated": 1,
    }


def _events(ctx: Context) -> list[tuple[int, str]]:
    with ctx.engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT ca_id, event FROM ca_event ORDER BY id")).all()
    return [(int(r[0]), str(r[1])) for r in rows]


def _job(ctx: Context, name: str) -> tuple[bool | None, str, int]:
    with ctx.engine.connect() as connection:
        row = connection.execute(
            sa.text("SELECT last_ok, last_result, runs FROM job_run WHERE name = :n"), {"n": name}
        ).first()
    return (None, "", 0) if row is None else (row[0], row[1], int(row[2]))


class Replica:
    def __init__(self, cli: Trellis, log: Path) -> None:
        self.port = free_port()
        self.log_path = log
        self._log: IO[str] = log.open("w")
        self.process = subprocess.Popen(
            [TRELLIS, "serve", "--port", str(self.port)],
            env=cli.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.tls = ssl.create_default_context(cafile=str(cli.data_dir / "bundle.pem"))

    def ready(self) -> bool:
        try:
            url = f"https://127.0.0.1:{self.port}/readyz"
            return httpx.get(url, verify=self.tls, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> str:
        terminate(self.process, grace=15)
        self._log.close()
        return self.log_path.read_text()


# "job ca-rotation: mesh: prepared 1a2b...; mesh: activated ..." in text or JSON log lines
TRANSITION_LOG = re.compile(r'job ca-rotation: ([^"\n]*)')


@pytest.mark.slow
def test_two_serve_replicas_rotate_each_intermediate_exactly_once(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = Trellis(tmp_path / "a", pg_url)
    # A 40-second intermediate (L = 70 s, notBefore backdated 30 s) made 20 s ago: its
    # successor is due at once, so the replicas' start-up runs race to prepare it; its
    # activation is due 8.3 s from now and it expires in 20 s, a window longer than the job's
    # 10 s interval, so a scheduled run activates it. Made now, the first 20 s were waited out.
    past = SystemClock().now() - dt.timedelta(seconds=20)
    with monkeypatch.context() as then:
        then.setattr(SystemClock, "now", lambda _self: past)
        first.set_up("init", "--trust-domain", "example.org", "--ca-ttl", "40s", "--svid-ttl", "6s")
    # the second replica: a copy of the data dir, with the key directory shared (one volume)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "keys")
    os.symlink(tmp_path / "a" / "keys", tmp_path / "b" / "keys")
    second = Trellis(tmp_path / "b", pg_url)
    assert second.env["TRELLIS_KEY_PASSPHRASE"] == first.env["TRELLIS_KEY_PASSPHRASE"]

    settings = Settings(
        data_dir=tmp_path / "observer", database_url=pg_url, key_passphrase=SecretStr(PASSPHRASE)
    )
    observer = build_context(settings, schema=SchemaPolicy.TRUSTED)
    try:
        _run_and_count(observer, first, second, tmp_path)
    finally:
        observer.close()


def _run_and_count(observer: Context, first: Trellis, second: Trellis, tmp_path: Path) -> None:
    replicas = [Replica(first, tmp_path / "a.log"), Replica(second, tmp_path / "b.log")]
    logs: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while not all(r.ready() for r in replicas):
            assert all(r.alive() for r in replicas), "a replica died while starting"
            assert time.monotonic() < deadline, "the replicas did not become ready"
            time.sleep(0.3)

        activated_at: float | None = None
        deadline = time.monotonic() + 100
        while time.monotonic() < deadline:
            assert all(r.alive() for r in replicas), "a replica died"
            ok, result, _runs = _job(observer, "ca-rotation")
            if ok is False:
                pytest.fail(f"the ca-rotation job failed on a replica: {result}")
            if activated_at is None and any(e == "activated" for _, e in _events(observer)):
                activated_at = time.monotonic()
            # after the activation, give both replicas more runs in which to duplicate anything
            if activated_at is not None and time.monotonic() > activated_at + 12:
                break
            time.sleep(0.2)
        assert activated_at is not None, "no intermediate was activated within 100 s"
    finally:
        logs = [r.stop() for r in replicas]

    events = _events(observer)
    prepared = [ca for ca, e in events if e == "prepared"]
    activated = [ca for ca, e in events if e == "activated"]
    retired = [ca for ca, e in events if e == "retired"]
    assert prepared and activated
    assert len(prepared) == len(set(prepared)), f"a CA was prepared twice: {prepared}"
    assert len(activated) == len(set(activated)), f"a CA was activated twice: {activated}"
    assert len(retired) == len(set(retired)) == len(activated)
    assert set(activated) <= set(prepared), "a CA was activated without being prepared"
    intermediates = ca_rows(observer)
    assert len(intermediates) == 1 + len(prepared), "a CA row exists without its 'prepared' event"
    assert len(ca_rows(observer, state="active")) == 1, "not exactly one active intermediate"
    # both replicas ran the job, and each transition appears in exactly one replica's log
    per_replica = [TRANSITION_LOG.findall(log) for log in logs]
    assert all(per_replica), "a replica never ran ca-rotation"
    logged = Counter(
        t.strip()
        for lines in per_replica
        for line in lines
        for t in line.split(";")
        if "nothing due" not in t
    )
    assert sum(1 for t in logged if ": prepared " in t) == len(prepared), logged
    assert all(count == 1 for count in logged.values()), f"logged twice: {logged}"
    print(
        "transitions per replica:",
        [[t for t in lines if "nothing due" not in t] for lines in per_replica],
    )
