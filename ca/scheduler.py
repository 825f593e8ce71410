"""Running the maintenance jobs on APScheduler, with a shared record of every run.

- Once per interval across replicas: on PostgreSQL each scheduled run first takes a
  session-level advisory lock for its job (``pg_try_advisory_lock``; a replica that does not get
  it skips that run), then reads the job's record under it and skips the run if another replica
  ran the job less than its interval ago (``due``). Every replica schedules every job, so the
  lock alone only kept runs from overlapping: three replicas ran ``audit-seal`` 89 times a
  minute instead of 30. A job of a node's files (``Scope.NODE``) locks, and reads its record,
  only for its node: a run on another node writes none of its files, so skipping for it would
  leave them to age.
- Survives restarts: every job runs at start-up unless its record shows a run within its
  interval, so a process that was down past a transition performs it immediately.
- Failures: logged with context, recorded in ``job_run`` (a record per node for node and replica
  jobs, ``record_node``; shown by ``trellis jobs list``, in ``/readyz`` detail and the metrics),
  and retried with exponential backoff (10 s, 20 s, … while shorter than the job's interval;
  then the regular run is the retry). A run that cannot reach the database cannot record
  itself: it is one log line naming the job and the database's reason, and is retried the same
  way (``_unreachable``).
- A replica older than the schema stops its jobs: once a newer Trellis has migrated the
  database (a rolling upgrade's first new replica), this code's writes to ``job_run`` and the
  rest no longer fit it (``ca.readiness.check_schema``; ``/readyz`` says so too).
- One scheduler per ``trellis serve``: with several workers, the worker holding an exclusive lock
  on ``<data dir>/scheduler.lock`` runs it (``elect_scheduler``); the lock dies with its process
  and another worker takes over. The serve parent stays a small supervisor (memory: each process
  that imports the CA costs ~100 MiB, docs/benchmarks.md).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlmodel import Session, col, select

from ca.config import Context
from ca.errors import TrellisError, Unavailable
from ca.jobs import JOBS, Job, Scope
from ca.readiness import check_schema
from ca.store import outage
from ca.store.models import JobRunRow

if TYPE_CHECKING:
    from apscheduler.schedulers.background import BackgroundScheduler

# APScheduler is imported where the scheduler starts: every CLI command imports this module (for
# job statuses) and only ``trellis serve`` runs jobs on a schedule.

__all__ = [
    "JobStatus",
    "elect_scheduler",
    "job_statuses",
    "lock_key",
    "record_node",
    "run_job",
    "start_scheduler",
]

log = logging.getLogger("trellis.scheduler")
BACKOFF_START = 10
FAILING_AFTER = 3


def lock_key(job: Job, node: str) -> int:
    """The advisory lock a run of ``job`` on ``node`` takes (``Scope.REPLICA`` takes none)."""
    scoped = f"{job.name}@{node}" if job.scope is Scope.NODE else job.name
    return 0x7E12 << 32 | zlib.crc32(scoped.encode())


def record_node(job: Job, node: str) -> str:
    """The node whose record (``job_run``) a run of ``job`` on ``node`` updates: a cluster-wide
    job has one record for all nodes (``""``); a job of a node's or a replica's own files has one
    per node, as its failing on one node is not mended by its succeeding on another."""
    return "" if job.scope is Scope.CLUSTER else node


# A node's record of a node job that no run has updated for this long is forgotten by the next
# run of that job on another node: the node was removed or renamed (a Kubernetes node name
# comes and goes), or someone ran the job once by hand on their own machine; kept, a failure
# there would stay on every list, readiness detail and alert for ever.
FORGET_NODE_AFTER = dt.timedelta(days=1)


def _record(ctx: Context, job: Job, *, started: dt.datetime, ok: bool, result: str) -> JobRunRow:
    try:
        return _record_once(ctx, job, started=started, ok=ok, result=result)
    except sa.exc.IntegrityError:
        # Another process of the node made the node's first record meanwhile (replica jobs take
        # no lock): this run is added to it.
        return _record_once(ctx, job, started=started, ok=ok, result=result)


def _record_once(
    ctx: Context, job: Job, *, started: dt.datetime, ok: bool, result: str
) -> JobRunRow:
    node = ctx.settings.node_name[:128]
    recorded = record_node(job, node)
    with Session(ctx.engine) as session:
        key = {"name": job.name, "node": recorded}
        row = session.get(JobRunRow, key, with_for_update=True)
        row = row or JobRunRow(name=job.name, node=recorded)
        row.last_started, row.last_finished = started, ctx.clock.now()
        row.last_ok, row.last_result = ok, result[:512]
        row.runs += 1
        row.consecutive_failures = 0 if ok else row.consecutive_failures + 1
        row.next_run = started + dt.timedelta(seconds=_wait(job, row.consecutive_failures))
        row.ran_on = node
        session.add(row)
        if job.scope is not Scope.CLUSTER:
            session.execute(
                sa.delete(JobRunRow).where(
                    col(JobRunRow.name) == job.name,
                    col(JobRunRow.node) != recorded,
                    col(JobRunRow.last_started) < started - FORGET_NODE_AFTER,
                )
            )
        session.commit()
        session.refresh(row)
        return row


def run_job(ctx: Context, job: Job, *, when_due: bool = False) -> JobRunRow | None:
    """Run one job now, unless another replica holds its lock; returns the recorded run.
    ``when_due`` (the scheduler's runs): not if its record, read under the lock, shows a run
    (on any replica) less than its interval ago, or less than the back-off after a failure;
    without it the job runs now regardless. A database that cannot be reached raises
    (``sqlalchemy.exc.SQLAlchemyError``): nothing can record that run."""
    with ctx.engine.connect() as connection:
        locking = connection.dialect.name == "postgresql" and job.scope is not Scope.REPLICA
        key = lock_key(job, ctx.settings.node_name)
        if locking:
            got = connection.execute(
                sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}
            ).scalar()
            connection.commit()
            if not got:
                return None
        try:
            # Only where replicas share the record: on SQLite one process runs the jobs, and
            # its scheduler's own interval is the schedule.
            if when_due and locking and not _due(ctx, job, connection):
                return None
            return _run(ctx, job)
        finally:
            if locking:
                _unlock(connection, key)


# A run is due this much (at most a tenth of the job's interval) before its record's
# ``next_run``: the replica that ran it last ticks again one interval later, a few milliseconds
# either side of the time it recorded, and would otherwise skip its own next run half the time
# and leave it to a later replica's tick.
DUE_EARLY = dt.timedelta(seconds=1)


def _due(ctx: Context, job: Job, connection: sa.Connection) -> bool:
    """Whether the job's record (the cluster's, or this node's for a node job) shows no run
    within its interval: the advisory lock only keeps runs from overlapping, and every replica
    schedules every job, so without this each ran it once per interval (audit-seal, every 2 s:
    89 runs a minute on three replicas)."""
    recorded = record_node(job, ctx.settings.node_name[:128])
    next_run = connection.execute(
        sa.select(col(JobRunRow.next_run)).where(
            col(JobRunRow.name) == job.name, col(JobRunRow.node) == recorded
        )
    ).scalar()
    connection.commit()  # not idle in a transaction while the job runs
    if next_run is None:
        return True
    early = min(DUE_EARLY, dt.timedelta(seconds=job.every_seconds / 10))
    return ctx.clock.now() >= next_run - early


def _unlock(connection: sa.Connection, key: int) -> None:
    try:
        connection.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        connection.commit()
    except sa.exc.SQLAlchemyError:
        # The database went away during the run (its session, and the lock, with it), or the
        # unlock failed all the same: closing the connection ends the session, which releases
        # the lock; back in the pool it would keep it, and this job would never run again.
        connection.invalidate()


def _run(ctx: Context, job: Job) -> JobRunRow:
    started = ctx.clock.now()
    try:
        result, ok = job.run(ctx), True
    except TrellisError as exc:
        # Foreseen and recorded (a partner's bundle endpoint refusing, a CRL file that
        # cannot be written): the reason is the news, not a traceback, and only when it
        # changes; a job fails this way every run until the cause is gone. The record
        # is read over HTTP (``/readyz`` by anyone, ``GET /v1/jobs``): it keeps the
        # public reason, and the log where on this server to mend it.
        result, ok = f"{type(exc).__name__}: {exc.public}", False
        _log_result(job, f"{type(exc).__name__}: {exc.detail}", failed=True)
    except Exception as exc:
        if _unreachable_database(exc):
            raise  # not the job's fault, and there is nowhere to record it: ``_tick`` says so
        log.exception("job %s failed", job.name)  # nobody foresaw it: a bug
        # Its text is anybody's (an OSError names its file): the log has it.
        result, ok = f"{type(exc).__name__} (see the server's log)", False
        _LAST_LOGGED.pop(job.name, None)  # the next outcome is news
    return _record(ctx, job, started=started, ok=ok, result=result)


def _unreachable_database(error: BaseException) -> bool:
    """Whether ``error`` says the database could not be used at all (refused, gone, restarting,
    a lost connection), as opposed to a statement it refused: what the API answers 503
    (``ca.store.outage``), or a pool that could not hand out a live connection."""
    return outage.unreachable(error) or isinstance(error, sa.exc.DisconnectionError)


def _wait(job: Job, failures: int) -> int:
    """Seconds from a run to the next: the job's interval, or after ``failures`` failures in a
    row the back-off (10 s, 20 s, …) while that is shorter."""
    if failures == 0:
        return job.every_seconds
    return min(job.every_seconds, BACKOFF_START << (failures - 1))


# The last outcome logged, per job. Jobs run every 2 to 300 s and mostly find nothing to do:
# "job audit-seal: sealed 0 audit record(s)" every 2 s buried the lines that matter. A result is
# logged at info (a foreseen failure at warning) when it differs from the job's previous
# outcome, at debug when it repeats; an unforeseen failure is logged with its traceback every
# time (``run_job``), and every run is recorded (``trellis jobs list``).
_LAST_LOGGED: dict[str, str] = {}


def _log_result(job: Job, result: str, *, failed: bool = False) -> None:
    line = f"job {job.name} failed: {result}" if failed else f"job {job.name}: {result}"
    repeated = _LAST_LOGGED.get(job.name) == line
    _LAST_LOGGED[job.name] = line
    news = logging.WARNING if failed else logging.INFO
    log.log(logging.DEBUG if repeated else news, "%s", line)


def _tick(ctx: Context, scheduler: BackgroundScheduler, job: Job) -> None:
    try:
        if _outdated(ctx):
            return
        row = run_job(ctx, job, when_due=True)
    except sa.exc.SQLAlchemyError as exc:
        if not _unreachable_database(exc):
            raise  # a statement refused: a bug, with APScheduler's traceback
        _unreachable(ctx, scheduler, job, exc)
        return
    ctx.cache.pop((_UNREACHED, job.name), None)
    if row is None:
        return
    if row.last_ok:
        _log_result(job, row.last_result)
        return
    _retry(scheduler, ctx, job, row.consecutive_failures)


def _retry(scheduler: BackgroundScheduler, ctx: Context, job: Job, failures: int) -> None:
    delay = _wait(job, failures)
    if delay >= job.every_seconds:
        # The next regular run comes as soon or sooner: it is the retry. Scheduling one as well
        # ran the job twice within milliseconds, every interval, for as long as it failed.
        return
    scheduler.add_job(
        _tick,
        "date",
        run_date=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay),
        args=(ctx, scheduler, job),
        id=f"{job.name}-retry",
        replace_existing=True,
    )


_UNREACHED = "scheduler-unreached"  # ctx.cache: a job's runs in a row that found no database


def _unreachable(
    ctx: Context, scheduler: BackgroundScheduler, job: Job, error: sa.exc.SQLAlchemyError
) -> None:
    """A run that could not use the database (an outage, a failover): one line naming the job
    and the database's reason, once while it repeats (at debug then), its traceback at debug
    once; then the back-off of a failure. Left to APScheduler, it was a traceback every tick,
    under the name of ``_tick``. The record cannot be written, and is not written later:
    ``/readyz`` reports the database meanwhile, and the first run after records its outcome."""
    key = (_UNREACHED, job.name)
    before = ctx.cache.get(key)
    failures = (before if isinstance(before, int) else 0) + 1
    ctx.cache[key] = failures
    reason = " ".join(str(getattr(error, "orig", None) or error).split())  # libpq's spans lines
    line = f"cannot reach the database: {type(error).__name__}: {reason}"
    if _LAST_LOGGED.get(job.name) != f"job {job.name} failed: {line}":
        log.debug("job %s: the database error", job.name, exc_info=error)
    _log_result(job, line, failed=True)
    _retry(scheduler, ctx, job, failures)


_OUTDATED = "scheduler-outdated"  # ctx.cache: the reason logged when the jobs stopped


def _outdated(ctx: Context) -> bool:
    """Whether the database's schema is newer than this code's (``check_schema``): then no job
    runs, as their writes no longer fit the tables (old replicas of a rolling upgrade failed
    on ``job_run`` every 2 s and rewrote the new replicas' records). One line when it starts."""
    try:
        check_schema(ctx)
    except Unavailable as outdated:
        if ctx.cache.get(_OUTDATED) != outdated.detail:
            ctx.cache[_OUTDATED] = outdated.detail
            log.warning("%s: its scheduled jobs stop", outdated.detail)
        return True
    ctx.cache.pop(_OUTDATED, None)
    return False


def start_scheduler(ctx: Context) -> BackgroundScheduler:
    from apscheduler.schedulers.background import BackgroundScheduler

    scheduler = BackgroundScheduler(timezone=dt.UTC)
    for job in JOBS:
        scheduler.add_job(
            _tick,
            "interval",
            seconds=job.every_seconds,
            args=(ctx, scheduler, job),
            id=job.name,
            next_run_time=dt.datetime.now(dt.UTC),
            max_instances=1,
            coalesce=True,
        )
    scheduler.start()
    return scheduler


ELECTION_RETRY_SECONDS = 5.0


def elect_scheduler(
    ctx: Context,
    lock_path: Path,
    *,
    retry_seconds: float = ELECTION_RETRY_SECONDS,
    start: Callable[[Context], BackgroundScheduler] = start_scheduler,
) -> Callable[[], None]:
    """Run the scheduler in this process while it holds ``lock_path`` (``flock``, so the kernel
    releases it when the process dies, however it dies); until then, try again every
    ``retry_seconds``. Returns the function that stops it (and gives the lock up)."""
    # APScheduler is imported here, not when the campaign's thread wins: an API worker freezes
    # its start-up heap once this returns (api.asgi), and modules imported later in that thread
    # would leave their objects to the cyclic collector while requests are served.
    import apscheduler.schedulers.background  # noqa: F401

    stopping = threading.Event()

    def campaign() -> None:
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while not stopping.is_set():
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    stopping.wait(retry_seconds)
                    continue
                log.info("this worker (pid %d) runs the scheduled jobs", os.getpid())
                scheduler = start(ctx)
                stopping.wait()
                scheduler.shutdown(wait=False)
        finally:
            os.close(descriptor)  # releases the lock

    thread = threading.Thread(target=campaign, name="scheduler-election", daemon=True)
    thread.start()

    def stop() -> None:
        stopping.set()
        thread.join(timeout=10)

    return stop


@dataclass(frozen=True, slots=True)
class JobStatus:
    """The record of a job: of a cluster-wide job, its last run on any node (``node``); of a
    node or replica job, its last run on ``node``. ``node`` is empty for a job never run."""

    name: str
    description: str
    every_seconds: int
    scope: Scope
    last_started: dt.datetime | None
    last_finished: dt.datetime | None
    last_ok: bool | None
    last_result: str
    consecutive_failures: int
    runs: int
    next_run: dt.datetime | None
    node: str

    @property
    def failing(self) -> bool:
        return self.consecutive_failures >= FAILING_AFTER

    @property
    def label(self) -> str:
        """The job's name, and the node for the record of one node."""
        return (
            self.name
            if self.scope is Scope.CLUSTER or not self.node
            else f"{self.name} on {self.node}"
        )


def job_statuses(ctx: Context, *, node: str | None = None) -> list[JobStatus]:
    """Every job's record, in ``JOBS`` order: one for a cluster-wide job, one per node that ran
    it for a node or replica job (one empty record while none has). With ``node``, only the
    records that concern that node: the cluster-wide jobs and its own runs."""
    with Session(ctx.engine) as session:
        rows = session.exec(select(JobRunRow).order_by(col(JobRunRow.node))).all()
    statuses = []
    for job in JOBS:
        records = [
            row
            for row in rows
            if row.name == job.name
            and (row.node == "") is (job.scope is Scope.CLUSTER)
            and (node is None or row.node in ("", node))
        ]
        statuses += [_status(job, row) for row in records] or [_status(job, None)]
    return statuses


def _status(job: Job, row: JobRunRow | None) -> JobStatus:
    return JobStatus(
        name=job.name,
        description=job.description,
        every_seconds=job.every_seconds,
        scope=job.scope,
        last_started=row.last_started if row else None,
        last_finished=row.last_finished if row else None,
        last_ok=row.last_ok if row else None,
        last_result=row.last_result if row else "",
        consecutive_failures=row.consecutive_failures if row else 0,
        runs=row.runs if row else 0,
        next_run=row.next_run if row else None,
        node=row.ran_on if row else "",
    )
