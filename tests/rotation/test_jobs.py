"""Scheduled jobs (docs/rotation.md "Scheduled jobs"): every job runs once at start-up, each run
is recorded and shown by ``trellis jobs list``, failures back off and show up in ``/readyz``
after three in a row without making the replica unready."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from cryptography import x509
from fastapi.testclient import TestClient

from api.app import create_app
from ca import scheduler
from ca.clock import FixedClock, SystemClock
from ca.config import Context, build_context
from ca.errors import Unavailable
from ca.jobs import JOBS, Job, job_named
from ca.scheduler import FAILING_AFTER, job_statuses, run_job, start_scheduler
from tests.api.test_metrics import _samples, _value
from tests.cli.test_walkthrough import Trellis
from tests.conftest import PASSPHRASE
from tests.rotation.rotkit import SQLITE_ONLY, cert_of, only

# The jobs docs/rotation.md describes (other features add their own to ca.jobs.JOBS).
ROTATION_JOBS = ("ca-rotation", "crl-resign", "server-certificate", "prune-renewal-nonces")


def cli_for(ctx: Context) -> Trellis:
    cli = Trellis(ctx.settings.data_dir, ctx.settings.effective_database_url)
    cli.env["TRELLIS_KEY_PASSPHRASE"] = PASSPHRASE
    return cli


def jobs_json(ctx: Context) -> dict[str, dict[str, Any]]:
    listed = cli_for(ctx).json("jobs", "list")
    assert isinstance(listed, list)
    return {job["name"]: job for job in listed}


def parse_time(value: str) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


@SQLITE_ONLY
@pytest.mark.slow
def test_every_job_runs_once_at_start_up_and_jobs_list_shows_it(
    drill_ctx: Context, clock: FixedClock
) -> None:
    before = jobs_json(drill_ctx)
    assert set(before) == {job.name for job in JOBS} >= set(ROTATION_JOBS)
    assert all(j["runs"] == 0 and j["last_ok"] is None for j in before.values())

    # down past the intermediate's activation moment: the start-up run performs it at once
    first = only(drill_ctx, "intermediate", "active")
    clock.current = cert_of(first).not_valid_after_utc - dt.timedelta(seconds=5)
    started = start_scheduler(drill_ctx)
    try:
        deadline = time.monotonic() + 20
        while not all(s.runs >= 1 for s in job_statuses(drill_ctx)):
            assert time.monotonic() < deadline, job_statuses(drill_ctx)
            time.sleep(0.1)
    finally:
        started.shutdown(wait=True)
    assert only(drill_ctx, "intermediate", "active").serial != first.serial

    listed = jobs_json(drill_ctx)
    for job in JOBS:  # every job, including those other features add, ran at start-up
        shown = listed[job.name]
        assert shown["runs"] >= 1, shown
        assert shown["every_seconds"] == job.every_seconds
        assert parse_time(shown["last_started"]) == clock.now()
        assert parse_time(shown["next_run"]) == clock.now() + dt.timedelta(
            seconds=job.every_seconds
        )
        assert shown["node"]
    for name in ROTATION_JOBS:
        shown = listed[name]
        assert (shown["last_ok"], shown["consecutive_failures"]) == (True, 0), shown
    assert listed["prune-renewal-nonces"]["runs"] == 1  # hourly: only its start-up run
    assert "activated" in listed["ca-rotation"]["last_result"]


def test_each_run_is_recorded(ctx: Context, clock: FixedClock) -> None:
    job = job_named("prune-renewal-nonces")
    first = run_job(ctx, job)
    assert first is not None
    assert (first.runs, first.last_ok, first.consecutive_failures) == (1, True, 0)
    assert first.last_result == "pruned 0 spent renewal proof(s)"
    assert first.next_run is not None and first.last_started is not None
    clock.advance(dt.timedelta(seconds=7))
    second = run_job(ctx, job)
    assert second is not None and second.runs == 2
    (status,) = [s for s in job_statuses(ctx) if s.name == job.name]
    assert status.runs == 2 and status.last_ok is True
    assert status.last_started == clock.now()
    assert status.next_run == clock.now() + dt.timedelta(hours=1)


def test_a_serving_certificate_run_records_no_path(
    ctx: Context, clock: FixedClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The record is read over HTTP (``GET /v1/jobs``); it said 'serving certificate in
    /srv/.../server/tls.crt'. Where the files are is for the log, when they change."""
    job = job_named("server-certificate")
    with caplog.at_level(logging.INFO, logger="trellis.jobs"):
        renewed = run_job(ctx, job)
    assert renewed is not None and renewed.last_ok
    issued = cert_of_file(ctx.settings.server_tls_dir / "tls.crt")
    assert renewed.last_result == f"renewed the serving certificate: serial {issued[:12]}"
    assert str(ctx.settings.server_tls_dir / "tls.crt") in caplog.text
    clock.advance(dt.timedelta(seconds=10))
    current = run_job(ctx, job)
    assert current is not None and current.last_result == "serving certificate current"
    shown = jobs_json(ctx)["server-certificate"]
    assert shown["last_result"] == "serving certificate current"
    assert str(ctx.settings.data_dir) not in str(shown)


def cert_of_file(path: Path) -> str:
    """The serial (hex) of the first certificate in a PEM file."""
    return format(x509.load_pem_x509_certificate(path.read_bytes()).serial_number, "x")


@dataclasses.dataclass
class Breakable:
    """``crl-resign`` replaced by a job that raises while ``broken``: an error nobody foresaw,
    whose text names a file on the server, as an ``OSError``'s does."""

    broken: bool = True

    def run(self, _ctx: Context) -> str:
        if self.broken:
            raise PermissionError(13, "Permission denied", "/srv/trellis/on-fire")
        return "fine again"

    @property
    def job(self) -> Job:
        return dataclasses.replace(job_named("crl-resign"), run=self.run)


@pytest.fixture
def failing(monkeypatch: pytest.MonkeyPatch) -> Breakable:
    breakable = Breakable()
    job = breakable.job
    monkeypatch.setattr(scheduler, "JOBS", tuple(job if j.name == job.name else j for j in JOBS))
    return breakable


def test_a_failing_job_is_recorded_and_shown_in_readyz(
    ctx: Context, failing: Breakable, caplog: pytest.LogCaptureFixture
) -> None:
    with TestClient(create_app(ctx), raise_server_exceptions=False) as client:
        for n in range(1, FAILING_AFTER + 2):
            row = run_job(ctx, failing.job)
            assert row is not None
            assert (row.last_ok, row.consecutive_failures, row.runs) == (False, n, n)
            # read over HTTP (/readyz, GET /v1/jobs): the text is in the log only
            assert row.last_result == "PermissionError (see the server's log)"
            ready = client.get("/readyz")
            assert ready.status_code == 200, "a failing job made the replica unready"
            body = ready.json()
            assert body["status"] == "ok"
            if n < FAILING_AFTER:
                assert body["detail"]["jobs"] == "ok"
            else:
                assert body["detail"]["jobs"] == (
                    f"failing: crl-resign ({n}x: PermissionError (see the server's log))"
                )
        assert "job crl-resign failed" in caplog.text and "/srv/trellis/on-fire" in caplog.text

        shown = jobs_json(ctx)["crl-resign"]
        assert (shown["last_ok"], shown["consecutive_failures"]) == (False, FAILING_AFTER + 1)

        failing.broken = False
        row = run_job(ctx, failing.job)
        assert row is not None and (row.last_ok, row.consecutive_failures) == (True, 0)
        assert client.get("/readyz").json()["detail"]["jobs"] == "ok"


def test_readyz_shortens_a_long_failure_at_a_word_with_an_ellipsis(ctx: Context) -> None:
    """Regression: the reason was cut at 80 characters mid-word and unmarked ("... is not )")."""
    reason = (
        "CA key mesh-intermediate-ae4ec158f959 in the file key store is not the key of its CA "
        "certificate (replaced, or restored from another instance): nothing is signed with it"
    )

    def broken(_ctx: Context) -> str:
        raise Unavailable(reason)

    job = dataclasses.replace(job_named("crl-resign"), run=broken)
    for _ in range(FAILING_AFTER):
        run_job(ctx, job)
    with TestClient(create_app(ctx)) as client:
        jobs = client.get("/readyz").json()["detail"]["jobs"]
    assert jobs == (
        f"failing: crl-resign ({FAILING_AFTER}x: Unavailable: CA key mesh-intermediate-ae4ec158f959"
        " in the file key store is not…)"
    )
    assert jobs_json(ctx)["crl-resign"]["last_result"] == f"Unavailable: {reason}"  # whole


class RecordingScheduler:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def add_job(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append({"positional": args, **kwargs})


@SQLITE_ONLY
def test_failures_are_retried_with_exponential_backoff(ctx: Context, failing: Breakable) -> None:
    recorder = RecordingScheduler()
    delays = []
    for _ in range(5):
        before = dt.datetime.now(dt.UTC)
        scheduler._tick(ctx, recorder, failing.job)  # type: ignore[arg-type]
        if len(recorder.calls) > len(delays):
            call = recorder.calls[-1]
            assert call["positional"][1] == "date" and call["id"] == "crl-resign-retry"
            assert call["replace_existing"] is True
            delays.append(round((call["run_date"] - before).total_seconds()))
    # while shorter than the job's interval (60 s): then the regular run is the retry, and one
    # scheduled as well would run next to it
    assert delays == [10, 20, 40]
    failing.broken = False
    scheduler._tick(ctx, recorder, failing.job)  # type: ignore[arg-type]
    assert len(recorder.calls) == 3, "a successful run scheduled a retry"


@pytest.mark.slow
def test_serve_starts_after_downtime_past_the_intermediate_expiry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = Trellis(tmp_path / "var", f"sqlite:///{tmp_path / 'trellis.db'}")
    # Initialised 10 s ago, and nothing ran since: its 6-second intermediate expired meanwhile
    # (rather than waiting that out here).
    past = SystemClock().now() - dt.timedelta(seconds=10)
    with monkeypatch.context() as then:
        then.setattr(SystemClock, "now", lambda _self: past)
        created = json.loads(
            cli.set_up(
                "init", "--trust-domain", "example.org", "--ca-ttl", "6s", "--svid-ttl", "1s",
                "--json",
            )
        )  # fmt: skip
    assert isinstance(created, dict)
    assert parse_time(created["intermediate_not_after"]) < SystemClock().now()

    with cli.serving(tmp_path / "serve.log"):
        status = json.loads(cli.set_up("authority", "status", "--json"))
        assert isinstance(status, dict)
        active = [
            c for c in status["cas"] if c["role"] == "intermediate" and c["state"] == "active"
        ]
        assert len(active) == 1 and parse_time(active[0]["not_after"]) > dt.datetime.now(dt.UTC)


def test_a_job_result_is_logged_at_info_only_when_it_changes(
    ctx: Context,
    clock: FixedClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every run is recorded; the log says what changed. A job that finds the same nothing to do
    every few seconds repeats itself at debug, not info."""
    monkeypatch.setattr(scheduler, "_LAST_LOGGED", {})  # as in a process that just started
    job = job_named("prune-renewal-nonces")
    idle = BackgroundScheduler()
    caplog.set_level(logging.DEBUG, logger="trellis.scheduler")
    every = dt.timedelta(seconds=job.every_seconds)  # each tick finds the job due again
    for _ in range(3):
        scheduler._tick(ctx, idle, job)
        clock.advance(every)
    levels = [r.levelno for r in caplog.records if r.getMessage().startswith("job prune")]
    assert levels == [logging.INFO, logging.DEBUG, logging.DEBUG]
    (status,) = [s for s in job_statuses(ctx) if s.name == job.name]
    assert status.runs == 3

    caplog.clear()  # a different result is news again, and so is the same one after it changed
    noisy = dataclasses.replace(job, run=lambda _ctx: "pruned 2 spent renewal proof(s)")
    scheduler._tick(ctx, idle, noisy)
    clock.advance(every)
    scheduler._tick(ctx, idle, job)
    levels = [r.levelno for r in caplog.records if r.getMessage().startswith("job prune")]
    assert levels == [logging.INFO, logging.INFO]


@pytest.fixture
def node_b(ctx: Context, clock: FixedClock) -> Iterator[Context]:
    """A second node on ``ctx``'s database (``TRELLIS_NODE_NAME=node-b``)."""
    other = build_context(ctx.settings.model_copy(update={"node_name": "node-b"}), clock=clock)
    yield other
    other.close()


def failing_on(node: str, job: Job) -> Job:
    def run(ctx: Context) -> str:
        if ctx.settings.node_name == node:
            raise Unavailable(f"cannot write the CRL file on {node}")
        return "1 OpenVPN CRL file(s) current"

    return dataclasses.replace(job, run=run)


def test_a_node_job_failing_on_one_node_stays_failing_while_another_node_succeeds(
    ctx: Context, node_b: Context, clock: FixedClock
) -> None:
    """Node and replica jobs are recorded per node: node B failing is not reset by node A's
    successes between B's runs (one record per job showed it only until A's next run). The
    cluster-wide jobs keep one record, the last run on any node."""
    node_a = ctx.settings.node_name
    job = failing_on("node-b", job_named("openvpn-crl"))
    for _ in range(FAILING_AFTER + 1):
        for node in (ctx, node_b):
            clock.advance(dt.timedelta(seconds=30))
            assert run_job(node, job) is not None
    for node in (node_b, ctx):
        assert run_job(node, job_named("prune-renewal-nonces")) is not None

    records = {(s.name, s.node): s for s in job_statuses(ctx)}
    assert records[("openvpn-crl", node_a)].consecutive_failures == 0
    on_b = records[("openvpn-crl", "node-b")]
    assert (on_b.last_ok, on_b.consecutive_failures, on_b.runs) == (False, FAILING_AFTER + 1, 4)
    assert [s.node for s in job_statuses(ctx) if s.name == "prune-renewal-nonces"] == [node_a]

    listed = cli_for(ctx).json("jobs", "list")
    assert isinstance(listed, list)
    shown = {(j["name"], j["node"]): j for j in listed if j["name"] == "openvpn-crl"}
    assert set(shown) == {("openvpn-crl", node_a), ("openvpn-crl", "node-b")}
    assert shown[("openvpn-crl", "node-b")]["consecutive_failures"] == FAILING_AFTER + 1
    assert {j["scope"] for j in shown.values()} == {"node"}
    table = cli_for(ctx).run("jobs", "list").stdout
    rows = {tuple(line.split()[:2]): line for line in table.splitlines()}
    assert f"NO ({FAILING_AFTER + 1})" in rows[("openvpn-crl", "node-b")]
    assert " yes " in rows[("openvpn-crl", node_a)]

    reason = "Unavailable: cannot write the CRL file on node-b"
    with TestClient(create_app(node_b)) as on_node_b, TestClient(create_app(ctx)) as on_node_a:
        # each replica's readiness names the failing jobs that concern it: not node B's on A
        assert on_node_b.get("/readyz").json()["detail"]["jobs"] == (
            f"failing: openvpn-crl on node-b ({FAILING_AFTER + 1}x: {reason})"
        )
        assert on_node_a.get("/readyz").json()["detail"]["jobs"] == "ok"
        samples = _samples(on_node_a)  # every replica reports every node's records
    failures = "trellis_job_consecutive_failures"
    assert _value(samples, failures, job="openvpn-crl", node="node-b") == FAILING_AFTER + 1
    assert _value(samples, failures, job="openvpn-crl", node=node_a) == 0
    assert ((failures, frozenset({("job", "prune-renewal-nonces"), ("node", "")}))) in samples

    # node B's record clears when node B succeeds, not before
    assert run_job(node_b, job_named("prune-renewal-nonces")) is not None
    fixed = run_job(node_b, dataclasses.replace(job, run=lambda _: "1 OpenVPN CRL file(s) current"))
    assert fixed is not None and (fixed.last_ok, fixed.consecutive_failures) == (True, 0)
    with TestClient(create_app(node_b)) as on_node_b:
        assert on_node_b.get("/readyz").json()["detail"]["jobs"] == "ok"


def test_a_node_that_stopped_running_a_node_job_is_forgotten_after_a_day(
    ctx: Context, node_b: Context, clock: FixedClock
) -> None:
    """Node B was removed (or its name changed, or someone ran the job once by hand on their
    machine): its last, failing record would stay on every list and alert for ever."""
    job = failing_on("node-b", job_named("openvpn-crl"))
    for _ in range(FAILING_AFTER):
        assert run_job(node_b, job) is not None
    clock.advance(scheduler.FORGET_NODE_AFTER)
    assert run_job(ctx, job) is not None
    assert {s.node for s in job_statuses(ctx) if s.name == job.name} == {
        "node-b",
        ctx.settings.node_name,
    }
    clock.advance(dt.timedelta(seconds=1))
    assert run_job(ctx, job) is not None
    assert [s.node for s in job_statuses(ctx) if s.name == job.name] == [ctx.settings.node_name]
