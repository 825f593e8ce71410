"""Group commit: concurrent issuances in one process share one transaction and one commit.

Every issuance ends with a small write transaction. On PostgreSQL each commit waits for a WAL
flush (an fsync, milliseconds on ordinary disks); on SQLite each takes the database's single
write lock, and writers that find it taken sleep in SQLite's busy handler (1 ms, then 2, 5, ...),
which is where the long tail latencies came from. Here writers that arrive while a batch is
committing queue up, and the first of them to get the lock commits everything that queued, in
one transaction: one fsync or one lock acquisition for many certificates, and no busy sleeps
between threads of one process. Nothing is returned before its batch has committed.

Requests served in place on an event loop (``run_async``) are batched by loop turn: SQLite's
commit is made on the loop (no network, no fsync with ``synchronous=NORMAL``), PostgreSQL's by
a task of the loop through the asynchronous driver, the loop going on meanwhile; what is ready
when it is done is the next batch. Threads' batches (``run``) commit through the engine's pool,
one at a time per process; on PostgreSQL beside the loops' batches.
A PostgreSQL batch first waits briefly for the issuances its loop has under way
(``expecting``): fewer, larger commits.
A SQLite batch whose write lock is taken (another worker, or this one's audit sealer, is
committing) waits for it without blocking its loop, for a while (``LOCK_WAIT_TURNS``): the
requests that come meanwhile are read, signed and join the batch.

The contract for a unit of work: it either raises a ``TrellisError`` *before writing anything*
(a spent token, a revoked certificate, a reused renewal proof: checked by conditional statements
that change no row when they refuse), which rejects that unit alone, or it succeeds. Any other
failure (a database error) fails the batch's transaction; the batch is then retried one unit per
transaction, so one unit's fault is never another's.

A unit may name a ``Guard``: a precondition it shares with other units (that the CA it was
signed with is still the active one), checked once per batch inside the transaction, before
the units that name it; when it fails, those units are refused with its error.

A unit may also name ``Need``s: rows it relies on still standing (the certificate a renewal
renews still active, the registration entry still there and enabled), which a revocation or an
entry's deletion may be withdrawing at that moment. The batch claims them all
(``ca.store.locks``: it waits for such a write under way to commit, and such a write waits for
it), then reads which still stand, one query per kind for all its units; a unit whose need
does not is refused with the need's error before it runs. A SQLite batch begins with the write
lock taken (``locks.begin_write``), so nothing commits between its reads and its writes.

A unit runs its conditional statements itself and hands the rows it adds (the certificate, its
audit records) to ``Rows``: those of every unit that succeeded are inserted after the last unit
ran, one statement per table for the whole batch, in the units' order. On PostgreSQL every
statement is a round trip and a parse/execute on the server: three fewer per certificate. The
uses of join tokens the units spend (``Spend``) are spent together too, before the inserts, one
UPDATE per token in one executemany; should a token have fewer uses left than the batch wants,
the transaction is rolled back and made again with each unit's uses spent in its turn, which
refuses exactly the units that came too late.

A batch is committed by whichever request got there first: in its thread (``run``), or by a
loop callback and committing task its ``run_async`` scheduled, which would run in its context
(``contextvars``), under its request id (``ca.logs.REQUEST_ID``). A unit's audit records are
made before it is handed over (``ca.records.issued_rows`` in ``ca.issue._writer``), in its own
request's context, so each names its own request. What a batch does for all its units runs in
an empty context (``_batch_context``): its log lines (a failed commit) name no request, rather
than the one that happened to start it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ca.errors import TrellisError, Unavailable
from ca.store import db, locks
from ca.store.core import Insert, Prepared, prepared

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = ["GroupCommit", "GroupRead", "Guard", "Lookup", "Need", "Rows", "Spend", "Work"]

log = logging.getLogger("trellis.store")

# How a SQLite batch on an event loop waits for a write lock another writer holds: it tries
# again every LOCK_WAIT_SECONDS, up to LOCK_WAIT_TURNS times (~2 ms, a few commits of the
# other worker), then blocks on it as a thread would, so that it is never starved. Blocking at
# once stopped the whole worker during the other's commit, with requests waiting to be read;
# waiting on the loop, they join the batch. Two workers at c=16, seven alternated pairs:
# 2,355 -> 2,511 certs/s on average, p99 17.3 -> 15.9 ms (docs/benchmarks.md, change 41).
LOCK_WAIT_SECONDS, LOCK_WAIT_TURNS = 0.0002, 10

# How a PostgreSQL batch waits for the units its loop expects (``GroupCommit.expecting``):
# while any is still on its way (its lookup or its signature under way), the batch waits
# COMING_WAIT_SECONDS at a time, up to COMING_WAIT_TURNS times, or until the last of them
# arrives. See ``GroupCommit._commit_ready``.
COMING_WAIT_SECONDS, COMING_WAIT_TURNS = 0.0003, 4

# How long a loop's committing task waits for its connection to close when the loop ends.
CLOSE_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Spend:
    """One use of a counted credential (a join token), spent together with the other uses of
    the batch. ``statement`` is an UPDATE of the credential's row, bind parameters ``key``,
    ``uses`` and ``now``, that takes ``uses`` uses if the row still has them and otherwise
    changes nothing; ``refusal`` is the unit's error when its use cannot be spent."""

    statement: sa.Update
    key: str
    now: dt.datetime
    refusal: TrellisError


@dataclass(frozen=True, slots=True)
class Need:
    """A row a unit relies on still standing when it commits (see the module docstring):
    ``standing`` finds, of the keys asked, those whose rows still stand; ``refusal`` is the
    unit's error when ``key`` is not among them; ``claims`` are the names a write withdrawing
    the row locks (``ca.store.locks``)."""

    standing: Lookup
    key: Any
    refusal: TrellisError
    claims: tuple[str, ...]


class _SpendsShort(Exception):
    """A credential had fewer uses left than the batch wanted (see ``GroupCommit``)."""


class Rows:
    """What a unit writes once the batch's units have run (see the module docstring): rows to
    insert, and uses of credentials to spend."""

    __slots__ = ("_by_statement", "_spends")

    def __init__(self) -> None:
        self._by_statement: dict[sa.Insert, list[dict[str, Any]]] = {}
        self._spends: list[Spend] = []

    def add(self, insert: Insert) -> None:
        statement, row = insert
        self._by_statement.setdefault(statement, []).append(row)

    def spend(self, spend: Spend) -> None:
        self._spends.append(spend)

    def extend(self, other: Rows) -> None:
        for statement, rows in other._by_statement.items():
            self._by_statement.setdefault(statement, []).extend(rows)
        self._spends.extend(other._spends)

    def spend_all(self, connection: sa.Connection) -> None:
        """Every use at once: one UPDATE per credential, in key order (two processes' batches
        then lock shared rows in the same order), all of them one executemany (one round trip
        on PostgreSQL, where each unit's own UPDATE had been one each)."""
        wanted: dict[tuple[sa.Update, str], tuple[int, dt.datetime]] = {}
        for spend in self._spends:
            uses, now = wanted.get((spend.statement, spend.key), (0, spend.now))
            wanted[(spend.statement, spend.key)] = (uses + 1, max(now, spend.now))
        by_statement: dict[sa.Update, list[dict[str, Any]]] = {}
        for (statement, key), (uses, now) in sorted(wanted.items(), key=lambda w: w[0][1]):
            by_statement.setdefault(statement, []).append({"key": key, "uses": uses, "now": now})
        for statement, params in by_statement.items():
            if prepared(statement).executemany(connection, params) != len(params):
                raise _SpendsShort

    def spend_each(self, connection: sa.Connection) -> None:
        """One use at a time, for a unit alone: its refusal when one cannot be spent."""
        for spend in self._spends:
            params = {"key": spend.key, "uses": 1, "now": spend.now}
            if prepared(spend.statement).executemany(connection, [params]) != 1:
                raise spend.refusal

    def insert(self, connection: sa.Connection) -> None:
        for statement, rows in self._by_statement.items():
            prepared(statement).executemany(connection, rows)


Work = Callable[[sa.Connection, Rows], None]
# Raises a TrellisError when the precondition does not hold. Hashable: units whose guards are
# equal share one check per batch.
Guard = Callable[[sa.Connection], None]


class _Expected:
    """A unit of work a loop will have ready soon (``GroupCommit.expecting``), until it
    arrives in ``run_async`` or its issuance ends without one."""

    __slots__ = ("group", "loop", "pending")

    def __init__(self, group: GroupCommit, loop: asyncio.AbstractEventLoop) -> None:
        self.group, self.loop, self.pending = group, loop, True

    def arrive(self) -> None:
        if self.pending:
            self.pending = False
            self.group._arrived(self.loop)


def _batch_context() -> contextvars.Context:
    """The context a batch runs in for all its units: none of its requests' (see the module
    docstring). Empty: a request's context vars are all the request's."""
    return contextvars.Context()


# The expectation of the request (the asyncio task) under way, if it declared one.
_EXPECTED: contextvars.ContextVar[_Expected | None] = contextvars.ContextVar(
    "trellis_expected_unit", default=None
)


@dataclass(slots=True)
class _Unit:
    work: Work
    lock_key: str = ""  # the shared row it updates, if any (see GroupCommit.run)
    guard: Guard | None = None
    needs: tuple[Need, ...] = ()
    error: BaseException | None = None
    committed: bool = False
    done: bool = False


# The units an event loop has ready, each with the future its request awaits.
_Ready = list[tuple[_Unit, "asyncio.Future[None]"]]


class GroupCommit:
    def __init__(self, engine: Engine, max_batch: int = 64) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._queue_lock = threading.Lock()
        self._pending: list[_Unit] = []
        self._commit_lock = threading.Lock()  # one batch at a time per process
        self._between_processes = _sqlite_writer_lock(engine)
        # run_async: the units each event loop has ready, committed at its next turn
        self._ready: dict[asyncio.AbstractEventLoop, _Ready] = {}
        # A commit that waits on the network (PostgreSQL's WAL flush) does not stop the loop: a
        # task of the loop commits what it had ready through the asynchronous driver while the
        # loop goes on serving; whatever is ready by the time it is done is the next batch.
        self._in_place = engine.dialect.name == "sqlite"
        self._committing: set[asyncio.AbstractEventLoop] = set()
        # PostgreSQL: per loop, the task committing its batches and the queue it takes them
        # from (``_commit_on_loop``); when a connection to the database was last seen lost
        # (the tasks' connections older than that are replaced)
        self._committers: dict[
            asyncio.AbstractEventLoop, tuple[asyncio.Queue[_Ready], asyncio.Task[None]]
        ] = {}
        self._lost_at = -1.0
        if not self._in_place:
            sa.event.listen(engine, "engine_disposed", self._lost)
            sa.event.listen(engine, "handle_error", self._maybe_lost)
        # SQLite: the loops whose ready batch is waiting for the write lock, and how many turns
        self._lock_waits: dict[asyncio.AbstractEventLoop, int] = {}
        self.batches = 0  # for tests and the benchmark: how many transactions were committed
        # SQLite: the one connection every transaction of this group commit runs on (_begin)
        self._connection: sa.Connection | None = None
        # PostgreSQL: per loop, the units expected and not arrived yet (``expecting``), and
        # the ready batch waiting for them: how many turns it has waited, and its timer
        self._coming: dict[asyncio.AbstractEventLoop, int] = {}
        self._coming_waits: dict[asyncio.AbstractEventLoop, tuple[int, asyncio.Handle]] = {}
        self.waits = 0  # for tests: how often a ready batch waited for expected units

    def run(
        self,
        work: Work,
        lock_key: str = "",
        guard: Guard | None = None,
        needs: tuple[Need, ...] = (),
    ) -> None:
        """Run ``work`` in a transaction shared with whatever else is waiting; return once it
        has committed, or raise its own error.

        ``lock_key`` names the shared row the unit updates (a join token): a batch runs its
        units in key order, so two processes' batches lock rows in the same order and never
        wait on each other in a cycle (PostgreSQL ends such a deadlock only after
        ``deadlock_timeout``, a second, by failing one of the batches). ``guard`` is checked
        in the transaction before ``work`` runs, once for all the units that share it; so are
        ``needs``, together with every other unit's (see the module docstring)."""
        unit = _Unit(work, lock_key, guard, needs)
        with self._queue_lock:
            self._pending.append(unit)
        while True:
            with self._commit_lock:
                if unit.done:
                    break
                with self._queue_lock:
                    batch = self._pending[: self._max_batch]
                    del self._pending[: self._max_batch]
                _batch_context().run(self._commit_or_fail, batch)
        if unit.error is not None:
            raise unit.error

    def run_apart(self, work: Work) -> None:
        """Run ``work`` in a transaction of its own, for a write that shares no rows with
        issuances and need not wait for their batches (the audit sealer's chunks). On SQLite,
        with its one write lock, that is ``run``. On PostgreSQL it is made beside the batches:
        through ``run`` a chunk of the sealer (250 UPDATEs and a commit) held this process's
        commit lock, and the batches of requests waited behind it: c=16 p99 27.9 -> 26.0 ms on
        average over seven alternated pairs (docs/benchmarks.md, change 42)."""
        if self._in_place:
            self.run(work)
            return
        unit = _Unit(work)
        self._alone(unit)
        if unit.error is not None:
            raise unit.error

    def expecting(self) -> contextlib.AbstractContextManager[None]:
        """Declares, on the running loop, a unit of work that this request will hand to
        ``run_async`` (an issuance, from its credential lookup on), so that a PostgreSQL batch
        ready meanwhile waits for it a little (``_commit_ready``). Ends when the unit arrives
        or, if it never does (a refused credential, a bad CSR), when the block does. On SQLite,
        whose batches commit on the loop, nothing waits for it: the same wait made no
        difference there (docs/benchmarks.md, change 46), so nothing is counted either."""
        if self._in_place:
            return contextlib.nullcontext()
        return self._expecting()

    @contextlib.contextmanager
    def _expecting(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        expected = _Expected(self, loop)
        self._coming[loop] = self._coming.get(loop, 0) + 1
        token = _EXPECTED.set(expected)
        try:
            yield
        finally:
            _EXPECTED.reset(token)
            expected.arrive()

    def _arrived(self, loop: asyncio.AbstractEventLoop) -> None:
        left = self._coming[loop] - 1
        if left:
            self._coming[loop] = left
            return
        del self._coming[loop]
        waiting = self._coming_waits.get(loop)
        if waiting is not None:  # the ready batch waits for this one: no need to wait longer
            turns, timer = waiting
            timer.cancel()
            call = loop.call_soon(self._commit_ready, loop, context=_batch_context())
            self._coming_waits[loop] = (turns, call)

    async def run_async(
        self,
        work: Work,
        lock_key: str = "",
        guard: Guard | None = None,
        needs: tuple[Need, ...] = (),
    ) -> None:
        """``run`` for an event loop. The commit is scheduled behind the callbacks the loop
        already has ready, so the requests that arrived together are recorded in one
        transaction: on SQLite in place, on the loop; elsewhere by the loop's committing task
        (``_commit_on_loop``)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if loop not in self._ready:
            self._ready[loop] = []
            if loop not in self._committing:  # the loop's committing task is in no request
                loop.call_soon(self._commit_ready, loop, context=_batch_context())
        self._ready[loop].append((_Unit(work, lock_key, guard, needs), future))
        expected = _EXPECTED.get()
        if expected is not None and expected.group is self:
            expected.arrive()
        await future

    def _commit_ready(self, loop: asyncio.AbstractEventLoop) -> None:
        """On PostgreSQL, a ready batch whose loop still expects units (``expecting``) waits
        for them, a few tenths of a millisecond at a time (``COMING_WAIT_TURNS``), before it
        goes to the loop's committing task. A commit costs the worker and PostgreSQL about the
        same whatever its size (the round trips, the transaction and its WAL flush; then also
        a handoff to a committing thread), and taking whatever was ready the moment the
        committer was free made batches of one to eight at c=16, four on average; the requests
        still being looked up or signed were ready a fraction of a millisecond later, and
        waited a whole commit for the next batch. Waiting for them, two workers at c=16, eight
        alternated pairs (``tests.bench.pairs``): 1,345 -> 1,556 certs/s on average, faster in
        all eight, p99 29.1 -> 24.3 ms; c=64, three pairs: 1,937 -> 2,215 (docs/benchmarks.md,
        change 46). A loop with nothing else under way (c=1) commits at once."""
        ready = self._ready.pop(loop)
        if self._in_place:
            self._commit_in_place(loop, ready)
            return
        turns, _ = self._coming_waits.pop(loop, (0, None))
        if loop in self._coming and turns < COMING_WAIT_TURNS and len(ready) < self._max_batch:
            self._ready[loop] = ready
            timer = loop.call_later(COMING_WAIT_SECONDS, self._commit_ready, loop)
            self._coming_waits[loop] = (turns + 1, timer)
            self.waits += 1
            return
        self._committing.add(loop)
        self._committer(loop).put_nowait(ready)

    def _committer(self, loop: asyncio.AbstractEventLoop) -> asyncio.Queue[_Ready]:
        found = self._committers.get(loop)
        if found is None or found[1].done():
            queue: asyncio.Queue[_Ready] = asyncio.Queue()
            task = loop.create_task(self._commit_on_loop(loop, queue), name="trellis-commit")
            found = self._committers[loop] = (queue, task)
        return found[0]

    async def _commit_on_loop(
        self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[_Ready]
    ) -> None:
        """Commits the loop's batches one after the other, each through ``_commit_chunks`` as
        a thread would, on a connection of the asynchronous driver (SQLAlchemy runs the
        synchronous code in a greenlet and awaits the driver's I/O on the loop). It replaced a
        committing thread: the loop handed every batch over and took the results back, and
        the two took turns at the GIL. Two workers at c=16, five runs of alternated pairs
        (``tests.bench.pairs``): +3.9 % on average (docs/benchmarks.md, change 48).

        The task keeps its engine and connection while the loop lives: ``asyncio.run``
        cancels it when its main coroutine ends, and it closes them then, on its loop (a
        connection of the asynchronous driver cannot be closed from another loop or none;
        SQLAlchemy's asynchronous engines belong to one loop too, their first connection
        takes a lock of that loop). A batch in flight at that moment is cancelled: psycopg
        cancels its statement in the server, the transaction is rolled back, and its units end
        with a 503 (their requests are being cancelled anyway). uvicorn cancels only after its
        graceful shutdown, once no request is left or after ``timeout_graceful_shutdown``."""
        engine = db.loop_engine(self._engine)
        connection: AsyncConnection | None = None
        opened = used = 0.0
        task = asyncio.current_task()
        try:
            while True:
                ready = await queue.get()
                try:
                    connection, opened = await self._usable(engine, connection, opened, used)
                    await connection.run_sync(self._commit_on, [unit for unit, _ in ready])
                except Exception:  # no connection: the units were not committed (a 503 each)
                    log.exception("a group commit failed before its transaction")
                finally:
                    used = time.monotonic()
                    self._committed(loop, ready)
                if task is not None and task.cancelling():  # an error took the cancellation's place
                    raise asyncio.CancelledError
        finally:
            if self._committers.get(loop, (None, None))[1] is task:
                del self._committers[loop]
            self._committing.discard(loop)
            while not queue.empty():  # ready when the task was cancelled: never left waiting
                self._settle(queue.get_nowait())
            if connection is not None:
                with contextlib.suppress(Exception):  # a timeout too: a server that hangs
                    await asyncio.wait_for(connection.close(), CLOSE_SECONDS)
            await engine.dispose()

    async def _usable(
        self, engine: AsyncEngine, connection: AsyncConnection | None, opened: float, used: float
    ) -> tuple[AsyncConnection, float]:
        """The loop's connection, checked as ``ca.store.db`` checks its pools' connections:
        replaced if it or any other connection to the database was lost since it was opened,
        pinged if it idled longer than ``IDLE_PING_SECONDS``. (connection, when opened)"""
        if connection is not None:
            stale = connection.invalidated or opened <= self._lost_at
            if not stale and time.monotonic() - used > db.IDLE_PING_SECONDS:
                try:
                    await connection.exec_driver_sql("SELECT 1")
                    await connection.rollback()
                except Exception:
                    stale = True
            if not stale:
                return connection, opened
            with contextlib.suppress(Exception):
                await connection.close()
        return await engine.connect(), time.monotonic()

    def _lost(self, _engine: Engine | None = None) -> None:
        self._lost_at = time.monotonic()

    def _maybe_lost(self, context: sa.engine.ExceptionContext) -> None:
        if context.is_disconnect:
            self._lost()

    def _committed(self, loop: asyncio.AbstractEventLoop, ready: _Ready) -> None:
        self._committing.discard(loop)
        self._settle(ready)
        if loop in self._ready:  # arrived while that batch was committing
            self._commit_ready(loop)

    def _commit_in_place(self, loop: asyncio.AbstractEventLoop, ready: _Ready) -> None:
        """Commit on the loop once the write lock is free (see ``LOCK_WAIT_TURNS``); until
        then the batch stays ready, and what ``run_async`` adds to it meanwhile commits with
        it."""
        turns = self._lock_waits.pop(loop, 0)
        waited_enough = turns >= LOCK_WAIT_TURNS
        if not waited_enough and not self._try_lock():
            self._lock_waits[loop] = turns + 1
            self._ready[loop] = ready
            loop.call_later(LOCK_WAIT_SECONDS, self._commit_ready, loop)
            return
        units = [unit for unit, _ in ready]
        try:
            if waited_enough:  # block on the locks, as a thread would
                self._commit_units(units)
            else:
                try:
                    self._commit_chunks(units)
                finally:
                    self._unlock()
        finally:  # whatever happened, no request is left waiting
            self._settle(ready)

    def _try_lock(self) -> bool:
        """Both locks ``_commit_units`` takes, without waiting: this process's and the one
        between processes (which ``_commit`` then finds already held)."""
        if not self._commit_lock.acquire(blocking=False):
            return False
        if not self._between_processes.try_acquire():
            self._commit_lock.release()
            return False
        return True

    def _unlock(self) -> None:
        try:
            self._between_processes.release()
        finally:
            self._commit_lock.release()

    def _commit_units(self, units: list[_Unit]) -> None:
        with self._commit_lock:  # shared with thread callers (the scheduler's audit sealer)
            self._commit_chunks(units)

    def _commit_chunks(self, units: list[_Unit], on: sa.Connection | None = None) -> None:
        for start in range(0, len(units), self._max_batch):
            self._commit_or_fail(units[start : start + self._max_batch], on)

    def _commit_on(self, on: sa.Connection, units: list[_Unit]) -> None:
        """``_commit_chunks`` in the argument order ``AsyncConnection.run_sync`` calls with."""
        self._commit_chunks(units, on)

    @staticmethod
    def _settle(ready: _Ready) -> None:
        for unit, future in ready:
            if future.cancelled():
                continue
            if unit.error is not None:
                future.set_exception(unit.error)
            elif not unit.committed:  # the batch failed before it ran (no database, no lock)
                future.set_exception(Unavailable("the issuing transaction did not complete"))
            else:
                future.set_result(None)

    def _commit_or_fail(self, batch: list[_Unit], on: sa.Connection | None = None) -> None:
        """Whatever stops a batch before its transaction (the writer lock, say), each of its
        units ends, refused with a 503: never reported as recorded, never left waiting."""
        try:
            self._commit(batch, on)
        except Exception:
            log.exception("a group commit failed before its transaction")
        finally:
            for unit in batch:
                if not unit.done:
                    unit.error = Unavailable("the issuing transaction did not complete")
                    unit.done = True

    def _commit(self, batch: list[_Unit], on: sa.Connection | None = None) -> None:
        """``on``: the connection of the transactions (an event loop's, ``_commit_on_loop``);
        by default one of the engine's (``_begin``)."""
        with self._between_processes:
            self._commit_batch(batch, on)

    def _commit_batch(self, batch: list[_Unit], on: sa.Connection | None) -> None:
        try:
            if len(batch) == 1:
                self._alone(batch[0], on)
                return
            try:
                try:
                    self._transaction(batch, on, spend_together=True)
                except _SpendsShort:  # rolled back: again, each unit's uses spent in its turn
                    for unit in batch:
                        unit.error = None
                    self._transaction(batch, on, spend_together=False)
                self.batches += 1
                for unit in batch:
                    unit.committed = unit.error is None
            except Exception:
                for unit in batch:
                    unit.error = None
                    self._alone(unit, on)
        finally:
            for unit in batch:
                if not unit.committed and unit.error is None:  # interrupted before it ended
                    unit.error = Unavailable("the issuing transaction did not complete")
                unit.done = True

    def _transaction(
        self, batch: list[_Unit], on: sa.Connection | None, *, spend_together: bool
    ) -> None:
        with self._begin(on) as connection:
            added = Rows()
            checked: dict[Guard, TrellisError | None] = {}
            standing = _standing(connection, batch)
            for unit in sorted(batch, key=lambda u: u.lock_key):  # stable: ties in order
                rows = Rows()
                try:
                    _check_needs(unit, standing)
                    if unit.guard is not None:
                        _check_once(unit.guard, connection, checked)
                    unit.work(connection, rows)
                    if not spend_together:
                        rows.spend_each(connection)
                except TrellisError as refused:  # wrote nothing, by contract
                    unit.error = refused
                    continue
                added.extend(rows)
            if spend_together:
                added.spend_all(connection)
            added.insert(connection)

    @contextlib.contextmanager
    def _begin(self, on: sa.Connection | None = None) -> Iterator[sa.Connection]:
        """A transaction. On SQLite every one runs on the same connection, kept open: they are
        made one at a time anyway (under ``_commit_lock``), and checking a connection out of
        the pool and back for each was work done while holding the write lock the other
        workers wait for (1.4 % of a worker's samples). Two workers at c=16, ten alternated
        pairs: 2,599 -> 2,717 certs/s on average, p99 14.4 -> 13.1 ms (docs/benchmarks.md,
        change 45). A connection the pool has invalidated (a failure, or a write refused as
        read-only), one left inside a transaction (its rollback failed), or one opened
        read-only whose file may be written now (``db.opened_read_only``), is replaced.
        ``on``: an event loop's connection (``_commit_on_loop``); one lost there is replaced
        by SQLAlchemy when the transaction begins (the retries of a failed batch's units
        alone reconnect)."""
        if on is not None:
            with on.begin():
                yield on
            return
        if not self._in_place:
            with self._engine.begin() as connection:
                yield connection
            return
        kept = self._connection
        if (
            kept is None
            or kept.closed
            or kept.invalidated
            or kept.in_transaction()
            or db.opened_read_only(kept)
        ):
            if kept is not None and not kept.closed:
                kept.invalidate()  # never reuse what an earlier transaction may have left behind
            kept = self._connection = self._engine.connect()
        with kept.begin():
            locks.begin_write(kept)
            yield kept

    def close(self) -> None:
        """Closes the kept SQLite connection (``Context.close``), after any commit under way;
        on PostgreSQL, ends the loops' committing tasks, which close their connections."""
        for loop, (_, task) in list(self._committers.items()):
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: so did the task
                loop.call_soon_threadsafe(task.cancel)
        with self._commit_lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def _alone(self, unit: _Unit, on: sa.Connection | None = None) -> None:
        try:
            with self._begin(on) as connection:
                rows = Rows()
                _check_needs(unit, _standing(connection, [unit]))
                if unit.guard is not None:
                    unit.guard(connection)
                unit.work(connection, rows)
                rows.spend_each(connection)
                rows.insert(connection)
            self.batches += 1
            unit.committed = True
        except Exception as error:
            unit.error = error


def _standing(connection: sa.Connection, units: list[_Unit]) -> dict[Lookup, set[Any]]:
    """Of the rows the units need, the keys of those that still stand, per kind: one claim of
    all their names, then one query per kind (see the module docstring)."""
    needs = [need for unit in units for need in unit.needs]
    if not needs:
        return {}
    locks.claim(connection, (name for need in needs for name in need.claims), shared=True)
    keys: dict[Lookup, set[Any]] = {}
    for need in needs:
        keys.setdefault(need.standing, set()).add(need.key)
    return {lookup: set(lookup.many(connection, sorted(k))) for lookup, k in keys.items()}


def _check_needs(unit: _Unit, standing: dict[Lookup, set[Any]]) -> None:
    for need in unit.needs:
        if need.key not in standing[need.standing]:
            raise need.refusal


def _check_once(
    guard: Guard, connection: sa.Connection, checked: dict[Guard, TrellisError | None]
) -> None:
    if guard not in checked:
        try:
            guard(connection)
            checked[guard] = None
        except TrellisError as refused:
            checked[guard] = refused
    failed = checked[guard]
    if failed is not None:
        raise failed


@dataclass(frozen=True, eq=False)
class Lookup:
    """A SELECT of rows by one key column, for one key or many at once. Built once, at module
    level, with ``by``."""

    query: Prepared

    @classmethod
    def by(cls, rows: sa.Select[Any], key: sa.ColumnElement[Any]) -> Lookup:
        """``rows`` whose ``key`` is among the keys asked for, each carrying it as
        ``lookup_key``."""
        keys: sa.BindParameter[Any] = sa.bindparam("keys", expanding=True)
        return cls(Prepared(rows.add_columns(key.label("lookup_key")).where(key.in_(keys))))

    def many(self, connection: sa.Connection, keys: list[Any]) -> dict[Any, Mapping[str, Any]]:
        found = self.query.rows(connection, {"keys": list(keys)})
        return {row["lookup_key"]: row for row in found}

    def one(self, connection: sa.Connection, key: Any) -> Mapping[str, Any] | None:
        """One key, now, on the caller's connection (outside an event loop)."""
        return self.many(connection, [key]).get(key)


class GroupRead:
    """The reads that requests ready on one event loop make with one ``Lookup``, made as one
    query: on SQLite in place, at the loop's next turn; elsewhere on a reader thread while
    the loop goes on (an issuance's credential lookup was a PostgreSQL round trip during which
    the worker's loop waited, a fifth of its time; docs/benchmarks.md)."""

    CHUNK = 256  # keys per query

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._in_place = engine.dialect.name == "sqlite"
        self._waiting: dict[
            tuple[asyncio.AbstractEventLoop, Lookup], list[tuple[Any, asyncio.Future[Any]]]
        ] = {}
        self._reader: ThreadPoolExecutor | None = None
        self.queries = 0  # for tests

    async def get(self, lookup: Lookup, key: Any) -> Mapping[str, Any] | None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Mapping[str, Any] | None] = loop.create_future()
        slot = (loop, lookup)
        waiting = self._waiting.get(slot)
        if waiting is None:
            waiting = self._waiting[slot] = []
            loop.call_soon(self._flush, slot)
        waiting.append((key, future))
        return await future

    def _flush(self, slot: tuple[asyncio.AbstractEventLoop, Lookup]) -> None:
        waiting = self._waiting.pop(slot)
        loop, lookup = slot
        keys = list(dict.fromkeys(key for key, _ in waiting))
        if self._in_place:
            try:
                found = self._fetch(lookup, keys)
            except Exception as error:
                self._settle(waiting, {}, error)
            else:
                self._settle(waiting, found, None)
            return
        if self._reader is None:
            self._reader = ThreadPoolExecutor(2, thread_name_prefix="read")
        done = loop.run_in_executor(self._reader, self._fetch, lookup, keys)
        done.add_done_callback(
            lambda f: self._settle(waiting, {} if f.exception() else f.result(), f.exception())
        )

    def _fetch(self, lookup: Lookup, keys: list[Any]) -> dict[Any, Mapping[str, Any]]:
        found: dict[Any, Mapping[str, Any]] = {}
        with self._engine.connect() as connection:
            for start in range(0, len(keys), self.CHUNK):
                found.update(lookup.many(connection, keys[start : start + self.CHUNK]))
                self.queries += 1
        return found

    @staticmethod
    def _settle(
        waiting: list[tuple[Any, asyncio.Future[Any]]],
        found: dict[Any, Mapping[str, Any]],
        error: BaseException | None,
    ) -> None:
        for key, future in waiting:
            if future.cancelled():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(found.get(key))


class _FileLock:
    """An exclusive ``flock`` held around each batch. SQLite lets one process write at a time;
    a writer that finds the database locked sleeps in SQLite's busy handler (1 ms, 2 ms, 5 ms,
    ...) however soon the lock frees, and with issuance running on the event loop, the whole
    worker sleeps with it. Waiting on a ``flock`` instead wakes the moment the holder is done."""

    def __init__(self, path: Path) -> None:
        self._descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        # Taken only under the group commit's own lock, so one holder in this process at a
        # time: entering it again (a loop's batch that took it with ``try_acquire``) is free.
        self._depth = 0

    def __enter__(self) -> None:
        if self._depth == 0:
            fcntl.flock(self._descriptor, fcntl.LOCK_EX)
        self._depth += 1

    def __exit__(self, *_: object) -> None:
        self.release()

    def try_acquire(self) -> bool:
        try:
            fcntl.flock(self._descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held elsewhere; any other failure recurs, and is reported, on __enter__
            return False
        self._depth = 1
        return True

    def release(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)


class _NoLock:
    """No other process writes (PostgreSQL locks rows itself; an in-memory SQLite is private)."""

    def __enter__(self) -> None:
        pass

    def __exit__(self, *_: object) -> None:
        pass

    def try_acquire(self) -> bool:
        return True

    def release(self) -> None:
        pass


def _sqlite_writer_lock(engine: Engine) -> _FileLock | _NoLock:
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        return _NoLock()
    return _FileLock(Path(f"{database}.write-lock"))
