"""Group commit (``ca.store.batch``): concurrent issuances of one process share a transaction.

The batches are made deterministic by holding the commit lock while the threads queue up, so
every queued unit lands in one batch; the assertions are about what a batch must never do:
lose a unit, let one unit's refusal or database error undo another's, or report success for a
unit that did not commit. Both databases.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import pytest
import sqlalchemy as sa

from ca import audit
from ca.config import Context
from ca.errors import AuthenticationFailed, Unavailable
from ca.grants import join_grant, join_grant_async, renewal_grant, renewal_grant_async
from ca.issue import Grant, IssuedSvid, issue_svid, issue_svid_async, under_way
from ca.keys import KeyType
from ca.logs import REQUEST_ID
from ca.renewal import make_proof
from ca.store import batch
from ca.store.batch import GroupCommit, Rows
from tests.ca.svidkit import (
    add_entry,
    count_rows,
    csr_sha256,
    enrol,
    join_secret,
    make_csr,
    new_key,
    uses_remaining,
)

WEB = "spiffe://example.org/web"


def issue_on_one_loop(ctx: Context, grants: list[Grant], csrs: list[bytes]) -> list[object]:
    """Every issuance started on one event loop before any of them commits, as the API runs the
    requests a loop has ready; outcomes in order, errors as values, within 20 s."""

    async def all_at_once() -> list[object]:
        issuing = (issue_svid_async(ctx, g, c) for g, c in zip(grants, csrs, strict=True))
        return await asyncio.wait_for(asyncio.gather(*issuing, return_exceptions=True), 20)

    return asyncio.run(all_at_once())


@contextmanager
def one_batch(writes: GroupCommit, expected: int) -> Iterator[None]:
    """Hold the commit lock until ``expected`` units are queued: they then commit together."""
    with writes._commit_lock:
        yield
        deadline = time.monotonic() + 20
        while len(writes._pending) < expected:
            assert time.monotonic() < deadline, f"only {len(writes._pending)} units queued"
            time.sleep(0.005)


@contextmanager
def statements_seen(listener: Callable[..., None]) -> Iterator[None]:
    """``listener`` on ``before_cursor_execute`` of every engine: on PostgreSQL an event loop
    commits through an engine of its own (``GroupCommit._commit_on_loop``)."""
    sa.event.listen(sa.Engine, "before_cursor_execute", listener)
    try:
        yield
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", listener)


def start(calls: list[Callable[[], object]]) -> Callable[[], list[object]]:
    """Run each call in its own thread; the returned function waits and gives the outcomes
    (a result or the exception raised), in the order of ``calls``."""
    outcomes: list[object] = [None] * len(calls)

    def run(index: int) -> None:
        try:
            outcomes[index] = calls[index]()
        except Exception as error:
            outcomes[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()

    def join() -> list[object]:
        for thread in threads:
            thread.join(timeout=30)
        assert not any(thread.is_alive() for thread in threads)
        return outcomes

    return join


@contextmanager
def write_lock_held(ctx: Context, by: str) -> Iterator[Callable[[], None]]:
    """The group commit's write lock, taken by another worker process (``by="process"``: the
    SQLite flock, on a descriptor of its own) or by a thread of this process such as the audit
    sealer (``"sealer"``: the commit lock). Yields the release; it is released after 5 s in
    any case."""
    released = threading.Event()
    if by == "process":
        descriptor = os.open(f"{ctx.engine.url.database}.write-lock", os.O_RDWR)
        fcntl.flock(descriptor, fcntl.LOCK_EX)

        def release() -> None:
            if not released.is_set():
                released.set()
                fcntl.flock(descriptor, fcntl.LOCK_UN)

        backstop = threading.Timer(5, release)
        backstop.start()
        try:
            yield release
        finally:
            backstop.cancel()
            release()
            os.close(descriptor)
        return
    held = threading.Event()

    def sealer() -> None:
        with ctx.writes._commit_lock:
            held.set()
            released.wait(5)

    holder = threading.Thread(target=sealer)
    holder.start()
    assert held.wait(5)
    try:
        yield released.set
    finally:
        released.set()
        holder.join(10)


def test_concurrent_issuances_commit_in_one_batch_and_refusals_touch_nothing_else(
    ctx: Context,
) -> None:
    """Twelve issuances with a 12-use token and four racing one single-use token, one batch:
    13 certificates recorded, three refused, every success readable afterwards."""
    entry = add_entry(ctx, WEB)
    many_id, many = join_secret(ctx, entry, uses=12)
    single_id, single = join_secret(ctx, entry, uses=1)
    grants = [join_grant(ctx, many) for _ in range(12)] + [join_grant(ctx, single)] * 4
    csrs = [make_csr(new_key(KeyType.EC_P256)) for _ in grants]

    certificates, batches = count_rows(ctx, "certificate"), ctx.writes.batches
    with one_batch(ctx.writes, len(grants)):
        join = start(
            [lambda g=g, c=c: issue_svid(ctx, g, c) for g, c in zip(grants, csrs, strict=True)]
        )
    outcomes = join()

    issued = [o for o in outcomes if isinstance(o, IssuedSvid)]
    refused = [o for o in outcomes if isinstance(o, Exception)]
    assert len(issued) == 13
    assert [type(o) for o in refused] == [AuthenticationFailed] * 3
    assert ctx.writes.batches == batches + 1
    assert count_rows(ctx, "certificate") == certificates + 13
    assert uses_remaining(ctx, many_id) == 0
    assert uses_remaining(ctx, single_id) == 0
    with ctx.engine.connect() as connection:
        stored = set(connection.execute(sa.text("SELECT serial FROM certificate")).scalars())
        issued_events = connection.execute(
            sa.text("SELECT count(*) FROM audit_log WHERE event = 'certificate.issued'")
        ).scalar_one()
    assert {svid.serial.hex for svid in issued} <= stored
    assert issued_events == 13


def test_replayed_renewal_proof_in_one_batch_is_refused_without_failing_the_batch(
    ctx: Context,
) -> None:
    """Two renewals presenting one proof and a join-token issuance, one batch: one renewal and
    the issuance commit; the replay is refused by a statement that changed nothing (on
    PostgreSQL a failed INSERT would have aborted the shared transaction)."""
    old = enrol(ctx, WEB)
    csr = make_csr(new_key(KeyType.EC_P256), uris=[WEB])
    proof = make_proof(old.cert, old.key, csr_sha256(csr), ctx.clock.now())
    renewals = [renewal_grant(ctx, proof, csr) for _ in range(2)]
    _, secret = join_secret(ctx, old.entry)
    joining = join_grant(ctx, secret)
    certificates, batches = count_rows(ctx, "certificate"), ctx.writes.batches

    with one_batch(ctx.writes, 3):
        join = start(
            [
                lambda: issue_svid(ctx, renewals[0], csr),
                lambda: issue_svid(ctx, renewals[1], csr),
                lambda: issue_svid(ctx, joining, make_csr(new_key(KeyType.EC_P256))),
            ]
        )
    outcomes = join()

    assert sorted(type(o).__name__ for o in outcomes) == [
        "AuthenticationFailed",
        "IssuedSvid",
        "IssuedSvid",
    ]
    assert ctx.writes.batches == batches + 1  # no fallback: the refusal wrote nothing
    assert count_rows(ctx, "certificate") == certificates + 2
    assert count_rows(ctx, "renewal_nonce") == 1


def test_a_database_error_in_one_unit_is_that_unit_alone(ctx: Context) -> None:
    """A unit whose statement fails (a duplicate primary key) fails the shared transaction; the
    batch is retried one unit per transaction, so the other units still commit and only the
    faulty one sees the error."""
    nonce = sa.table("renewal_nonce", sa.column("jti"), sa.column("expires_at"))
    now = ctx.clock.now()

    def insert(jti: str) -> Callable[[], None]:
        return lambda: ctx.writes.run(
            lambda c, _rows: c.execute(sa.insert(nonce).values(jti=jti, expires_at=now))
        )

    ctx.writes.run(lambda c, _rows: c.execute(sa.insert(nonce).values(jti="taken", expires_at=now)))
    with one_batch(ctx.writes, 3):
        join = start([insert("first"), insert("taken"), insert("second")])
    outcomes = join()

    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], sa.exc.IntegrityError)
    with ctx.engine.connect() as connection:
        stored = set(connection.execute(sa.text("SELECT jti FROM renewal_nonce")).scalars())
    assert stored == {"taken", "first", "second"}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sqlite_batches_hold_a_lock_other_processes_wait_on(ctx: Context) -> None:
    """Across worker processes, SQLite writers queue on ``<db>.write-lock`` (a flock, which
    wakes the next writer at once) instead of sleeping in SQLite's busy handler."""
    lock = Path(f"{ctx.engine.url.database}.write-lock")
    probe = [
        sys.executable,
        "-c",
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "except BlockingIOError:\n    print('held')\nelse:\n    print('free')",
        str(lock),
    ]
    inside = threading.Event()
    release = threading.Event()

    def slow(connection: sa.Connection, _rows: Rows) -> None:
        inside.set()
        assert release.wait(20)

    writer = threading.Thread(target=ctx.writes.run, args=(slow,))
    writer.start()
    try:
        assert inside.wait(20)
        seen = subprocess.run(probe, capture_output=True, text=True, timeout=30, check=True)
        assert seen.stdout.strip() == "held"
    finally:
        release.set()
        writer.join(20)
    assert lock.stat().st_mode & 0o777 == 0o600
    after = subprocess.run(probe, capture_output=True, text=True, timeout=30, check=True)
    assert after.stdout.strip() == "free"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sqlite_transactions_run_on_one_kept_connection(ctx: Context) -> None:
    """SQLite commits one transaction at a time: they share one connection, so no batch checks
    one out of the pool (and back) while it holds the write lock."""
    entry = add_entry(ctx, WEB)
    token, secret = join_secret(ctx, entry, uses=12)
    committed_on: list[sa.Connection] = []  # kept alive, so no two are the same by accident
    sa.event.listen(ctx.engine, "commit", committed_on.append)
    batches = ctx.writes.batches

    for _ in range(3):  # three batches on a loop, three single units from threads
        grants = [join_grant(ctx, secret) for _ in range(3)]
        outcomes = issue_on_one_loop(ctx, grants, [make_csr(new_key(KeyType.EC_P256))] * 3)
        assert [type(o).__name__ for o in outcomes] == ["IssuedSvid"] * 3
        issue_svid(ctx, join_grant(ctx, secret), make_csr(new_key(KeyType.EC_P256)))

    assert ctx.writes.batches == batches + 6
    assert len(committed_on) == 6
    assert all(connection is committed_on[0] for connection in committed_on)
    assert uses_remaining(ctx, token) == 0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_kept_sqlite_connection_that_failed_is_replaced(ctx: Context) -> None:
    """A connection the pool invalidated (a driver error that means it is broken), or one left
    inside a transaction, is not used again: the next transaction opens another and commits."""
    entry = add_entry(ctx, WEB)
    _, secret = join_secret(ctx, entry, uses=3)
    issue_svid(ctx, join_grant(ctx, secret), make_csr(new_key(KeyType.EC_P256)))
    broken = ctx.writes._connection
    assert broken is not None
    broken.invalidate()
    certificates = count_rows(ctx, "certificate")

    issue_svid(ctx, join_grant(ctx, secret), make_csr(new_key(KeyType.EC_P256)))

    assert count_rows(ctx, "certificate") == certificates + 1
    replaced = ctx.writes._connection
    assert replaced is not None and replaced is not broken

    replaced.begin()  # as if an earlier rollback had failed: a transaction left open
    issue_svid(ctx, join_grant(ctx, secret), make_csr(new_key(KeyType.EC_P256)))
    assert count_rows(ctx, "certificate") == certificates + 2
    assert ctx.writes._connection is not replaced and replaced.invalidated
    ctx.writes.close()
    assert ctx.writes._connection is None


def test_issuances_ready_on_one_event_loop_share_one_commit(ctx: Context) -> None:
    """``issue_svid_async`` (what the API runs in place with key files, on either database):
    the requests an event loop has ready at once are recorded in one transaction; a refused one
    (a spent single-use token) is refused alone."""
    entry = add_entry(ctx, WEB)
    _, many = join_secret(ctx, entry, uses=6)
    _, single = join_secret(ctx, entry, uses=1)
    grants = [join_grant(ctx, many) for _ in range(6)] + [join_grant(ctx, single)] * 2
    csrs = [make_csr(new_key(KeyType.EC_P256)) for _ in grants]
    certificates, batches = count_rows(ctx, "certificate"), ctx.writes.batches

    outcomes = issue_on_one_loop(ctx, grants, csrs)

    assert [type(o).__name__ for o in outcomes] == ["IssuedSvid"] * 7 + ["AuthenticationFailed"]
    assert ctx.writes.batches == batches + 1
    assert count_rows(ctx, "certificate") == certificates + 7
    with ctx.engine.connect() as connection:
        stored = set(connection.execute(sa.text("SELECT serial FROM certificate")).scalars())
    assert {o.serial.hex for o in outcomes if isinstance(o, IssuedSvid)} <= stored


def test_a_batch_updates_shared_rows_in_key_order(ctx: Context) -> None:
    """Units run in ``lock_key`` order (ties keep their arrival order): two processes' batches lock
    the same join tokens in the same order and cannot deadlock (on PostgreSQL a deadlock cost a
    second, ``deadlock_timeout``, and a failed batch)."""
    ran: list[str] = []

    def unit(name: str, key: str) -> Callable[[], None]:
        return lambda: ctx.writes.run(lambda _c, _rows: ran.append(name), key)

    with one_batch(ctx.writes, 4):
        join = start(
            [unit("b1", "token:b"), unit("a", "token:a"), unit("b2", "token:b"), unit("-", "")]
        )
    assert join() == [None] * 4
    assert ran[:2] == ["-", "a"] and sorted(ran[2:]) == ["b1", "b2"]


@contextmanager
def row_locked(ctx: Context, table: str, key: str) -> Iterator[Callable[[], None]]:
    """The row of ``table`` whose id is ``key`` locked by a transaction of another connection
    (as another worker's batch spending the same join token holds it): a batch that updates
    it waits until that transaction ends. Yields the release (a rollback)."""
    other = sa.create_engine(ctx.engine.url, poolclass=sa.pool.NullPool)
    connection = other.connect()
    connection.execute(sa.text(f"SELECT id FROM {table} WHERE id = :id FOR UPDATE"), {"id": key})
    try:
        yield connection.rollback
    finally:
        connection.close()
        other.dispose()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_the_loop_goes_on_while_a_postgresql_batch_commits(ctx: Context) -> None:
    """On PostgreSQL a batch waits on the network (its statements, the WAL flush of its
    commit, here a row lock), so ``run_async`` never makes the loop wait for it: the loop goes
    on serving meanwhile, and what becomes ready during that batch is the next batch,
    committed after it, not alongside it."""
    entry = add_entry(ctx, WEB)
    token_id, secret = join_secret(ctx, entry, uses=6)
    csrs = [make_csr(new_key(KeyType.EC_P256)) for _ in range(6)]
    certificates, batches = count_rows(ctx, "certificate"), ctx.writes.batches
    # The first batch waits for the token's row, held by another transaction, until the loop
    # has moved on (were the batch made on the loop, the loop would wait too, for ever).
    order: list[str] = []

    async def issue(label: str, csr: bytes) -> IssuedSvid:
        svid = await issue_svid_async(ctx, join_grant(ctx, secret), csr)
        order.append(label)
        return svid

    async def scenario(release: Callable[[], None]) -> list[IssuedSvid]:
        first = [asyncio.ensure_future(issue("first", c)) for c in csrs[:3]]
        await asyncio.sleep(0.3)  # the loop runs while the first batch is stuck
        assert not any(task.done() for task in first)
        second = [asyncio.ensure_future(issue("second", c)) for c in csrs[3:]]
        await asyncio.sleep(0.3)
        assert not any(task.done() for task in second)
        release()
        return await asyncio.wait_for(asyncio.gather(*first, *second), 20)

    with row_locked(ctx, "token", token_id) as release:
        issued = asyncio.run(scenario(release))

    assert order == ["first"] * 3 + ["second"] * 3
    assert ctx.writes.batches == batches + 2
    assert count_rows(ctx, "certificate") == certificates + 6
    assert len({svid.serial.hex for svid in issued}) == 6
    assert uses_remaining(ctx, token_id) == 0


def backends(ctx: Context) -> set[int]:
    """Server processes serving this database, the asking one aside: their pids, so that a
    test tells a new connection from one that closed a moment ago and whose backend has not
    left pg_stat_activity yet (counting them, a test took such a one for part of its baseline)."""
    with ctx.engine.connect() as connection:
        return {
            int(pid)
            for pid in connection.execute(
                sa.text(
                    "SELECT pid FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalars()
        }


def gone(ctx: Context, pids: set[int], seconds: float = 5) -> bool:
    """Whether every one of ``pids`` has left within ``seconds``: a backend leaves
    pg_stat_activity only once it has exited, a moment after its connection closed."""
    deadline = time.monotonic() + seconds
    while backends(ctx) & pids:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_loop_commits_on_one_postgresql_connection_and_closes_it_when_it_ends(
    ctx: Context,
) -> None:
    """An event loop commits its batches on a connection of its own, kept while the loop
    lives; when the loop ends (``asyncio.run`` returns) the connection is closed with it, so
    loops run one after another (tests, TestClient's portals) leave none behind."""
    _, secret = join_secret(ctx, add_entry(ctx, WEB), uses=8)

    async def two_batches() -> set[int]:
        for _ in range(2):
            await issue_svid_async(ctx, join_grant(ctx, secret), make_csr(new_key(KeyType.EC_P256)))
        return await asyncio.to_thread(backends, ctx)

    batches = ctx.writes.batches
    asyncio.run(two_batches())  # the pools' connections opened: the baseline after this
    for _ in range(3):
        before = backends(ctx)
        new = asyncio.run(two_batches()) - before
        assert len(new) == 1, new  # the loop's own connection, one for both batches
        assert gone(ctx, new), "the loop's connection outlived the loop"
    assert ctx.writes.batches == batches + 8


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_loop_that_ends_while_its_postgresql_batch_waits_cancels_it(ctx: Context) -> None:
    """A loop ending while its batch waits in the server (here on a row lock; at shutdown, on
    a server that does not answer) does not wait for it: the statement is cancelled in the
    server, the transaction rolled back, its connection closed, and nothing is written."""
    token_id, secret = join_secret(ctx, add_entry(ctx, WEB), uses=3)
    grants = [join_grant(ctx, secret) for _ in range(3)]
    csrs = [make_csr(new_key(KeyType.EC_P256)) for _ in grants]
    certificates = count_rows(ctx, "certificate")
    outcomes: list[asyncio.Task[IssuedSvid]] = []

    async def leave_them_waiting() -> None:
        for grant, csr in zip(grants, csrs, strict=True):
            outcomes.append(asyncio.ensure_future(issue_svid_async(ctx, grant, csr)))
        await asyncio.sleep(0.5)  # the batch is in the server, waiting for the row
        assert not any(task.done() for task in outcomes)

    baseline = backends(ctx)
    with row_locked(ctx, "token", token_id):
        started = time.monotonic()
        asyncio.run(leave_them_waiting())  # ends: asyncio.run cancels what is left
        assert time.monotonic() - started < 5
        assert all(task.cancelled() for task in outcomes)
    assert gone(ctx, backends(ctx) - baseline)  # the loop's connection too
    assert count_rows(ctx, "certificate") == certificates
    assert uses_remaining(ctx, token_id) == 3


async def issue_under_way(
    ctx: Context, secret: str, csr: bytes, lookup_seconds: float = 0.0
) -> IssuedSvid:
    """What the API does on a loop: the issuance declared under way from its credential lookup
    (which takes ``lookup_seconds`` more here) to its commit."""
    with under_way(ctx):
        await asyncio.sleep(lookup_seconds)
        grant = await join_grant_async(ctx, secret)
        return await issue_svid_async(ctx, grant, csr)


def issuing_with_waits(
    ctx: Context, monkeypatch: pytest.MonkeyPatch, seconds: float, turns: int, uses: int
) -> tuple[str, list[bytes]]:
    """A PostgreSQL batch's wait for the issuances under way set to ``turns`` of ``seconds``;
    a join token with ``uses`` uses, and as many CSRs."""
    monkeypatch.setattr(batch, "COMING_WAIT_SECONDS", seconds)
    monkeypatch.setattr(batch, "COMING_WAIT_TURNS", turns)
    _, secret = join_secret(ctx, add_entry(ctx, WEB), uses=uses)
    return secret, [make_csr(new_key(KeyType.EC_P256)) for _ in range(uses)]


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_postgresql_batch_waits_for_the_issuances_under_way_on_its_loop(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch ready while another issuance on its loop is still being looked up and signed
    waits for it, and both commit in one transaction; the wait ends when it arrives, not when
    the turns run out."""
    secret, csrs = issuing_with_waits(ctx, monkeypatch, 0.02, 250, uses=2)  # 5 s: not reached
    certificates, batches, waits = count_rows(ctx, "certificate"), ctx.writes.batches, 0

    async def scenario() -> list[IssuedSvid]:
        nonlocal waits
        first = asyncio.ensure_future(issue_under_way(ctx, secret, csrs[0]))
        second = asyncio.ensure_future(issue_under_way(ctx, secret, csrs[1], 0.3))
        await asyncio.sleep(0.2)
        assert not first.done()  # ready, and waiting for the second
        waits = ctx.writes.waits
        return await asyncio.wait_for(asyncio.gather(first, second), 20)

    started = time.monotonic()
    issued = asyncio.run(scenario())

    assert time.monotonic() - started < 3
    assert waits >= 5  # turns of 20 ms while the second was looked up
    assert ctx.writes.batches == batches + 1
    assert count_rows(ctx, "certificate") == certificates + 2
    assert len({svid.serial.hex for svid in issued}) == 2
    assert not ctx.writes._coming and not ctx.writes._coming_waits


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_postgresql_batch_stops_waiting_for_an_issuance_that_fails(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An issuance under way that ends without a unit (a refused credential) is no longer
    waited for: the ready batch commits then, not after its turns."""
    secret, csrs = issuing_with_waits(ctx, monkeypatch, 0.02, 250, uses=2)
    certificates, batches = count_rows(ctx, "certificate"), ctx.writes.batches

    async def scenario() -> list[object]:
        first = issue_under_way(ctx, secret, csrs[0])
        refused = issue_under_way(ctx, "not-a-token-" + secret, csrs[1], 0.3)
        return await asyncio.wait_for(asyncio.gather(first, refused, return_exceptions=True), 20)

    started = time.monotonic()
    outcomes = asyncio.run(scenario())

    assert time.monotonic() - started < 3
    assert isinstance(outcomes[0], IssuedSvid)
    assert isinstance(outcomes[1], AuthenticationFailed)
    assert ctx.writes.batches == batches + 1
    assert count_rows(ctx, "certificate") == certificates + 1
    assert not ctx.writes._coming and not ctx.writes._coming_waits


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_postgresql_batch_waits_its_turns_at_most(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An issuance that takes longer than ``COMING_WAIT_TURNS`` turns is not waited for: the
    ready batch commits without it, and it commits in the next one. A lone issuance (c=1)
    does not wait at all."""
    secret, csrs = issuing_with_waits(ctx, monkeypatch, 0.01, 3, uses=3)
    certificates, batches = count_rows(ctx, "certificate"), ctx.writes.batches

    async def scenario() -> tuple[IssuedSvid, IssuedSvid, int]:
        first = asyncio.ensure_future(issue_under_way(ctx, secret, csrs[0]))
        slow = asyncio.ensure_future(issue_under_way(ctx, secret, csrs[1], 1.0))
        done, _ = await asyncio.wait([first, slow], return_when=asyncio.FIRST_COMPLETED)
        assert done == {first}
        waited = ctx.writes.waits
        await slow
        return first.result(), slow.result(), waited

    first, slow, waited = asyncio.run(scenario())

    assert waited == 3
    assert ctx.writes.batches == batches + 2
    assert count_rows(ctx, "certificate") == certificates + 2
    assert first.serial != slow.serial
    alone = asyncio.run(issue_under_way(ctx, secret, csrs[2]))
    assert isinstance(alone, IssuedSvid)
    assert ctx.writes.waits == waited  # nothing else was under way: no wait
    assert not ctx.writes._coming and not ctx.writes._coming_waits


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("by", ["process", "sealer"])
def test_a_sqlite_batch_waits_for_the_write_lock_without_stopping_its_loop(
    ctx: Context, by: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While another worker (or this worker's audit sealer) holds SQLite's write lock, the loop
    whose batch is ready goes on: it serves the next request, which joins the waiting batch,
    and it is the loop itself that releases the lock here. Were the loop blocked on the lock,
    only the 5 s backstop would release it, and the two issuances would be two batches."""
    monkeypatch.setattr(batch, "LOCK_WAIT_TURNS", 25_000)  # ~5 s of turns: never given up here
    entry = add_entry(ctx, WEB)
    _, secret = join_secret(ctx, entry, uses=2)
    csrs = [make_csr(new_key(KeyType.EC_P256)) for _ in range(2)]
    certificates, batches = count_rows(ctx, "certificate"), ctx.writes.batches

    async def scenario(release: Callable[[], None]) -> list[IssuedSvid]:
        first = asyncio.ensure_future(issue_svid_async(ctx, join_grant(ctx, secret), csrs[0]))
        await asyncio.sleep(0.1)  # its batch is ready, and finds the lock taken
        assert not first.done()
        second = asyncio.ensure_future(issue_svid_async(ctx, join_grant(ctx, secret), csrs[1]))
        await asyncio.sleep(0.1)
        assert not second.done()
        release()
        return await asyncio.wait_for(asyncio.gather(first, second), 20)

    started = time.monotonic()
    with write_lock_held(ctx, by) as release:
        issued = asyncio.run(scenario(release))

    assert time.monotonic() - started < 4
    assert ctx.writes.batches == batches + 1
    assert count_rows(ctx, "certificate") == certificates + 2
    assert len({svid.serial.hex for svid in issued}) == 2
    assert not ctx.writes._lock_waits


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_sqlite_batch_that_waited_its_turns_blocks_on_the_lock_and_commits(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock held past ``LOCK_WAIT_TURNS``: the batch then waits on it as a thread would (the
    loop stops) and commits as soon as it is free; no request is dropped or left waiting."""
    monkeypatch.setattr(batch, "LOCK_WAIT_TURNS", 3)
    entry = add_entry(ctx, WEB)
    _, secret = join_secret(ctx, entry, uses=1)
    csr = make_csr(new_key(KeyType.EC_P256))
    certificates = count_rows(ctx, "certificate")
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    async def scenario() -> IssuedSvid:
        beat = asyncio.ensure_future(ticker())
        await asyncio.sleep(0.05)
        try:
            return await asyncio.wait_for(issue_svid_async(ctx, join_grant(ctx, secret), csr), 20)
        finally:
            beat.cancel()

    with write_lock_held(ctx, "process") as release:
        threading.Timer(0.5, release).start()
        issued = asyncio.run(scenario())

    assert isinstance(issued, IssuedSvid)
    assert count_rows(ctx, "certificate") == certificates + 1
    assert max(b - a for a, b in itertools.pairwise(ticks)) > 0.3  # the loop did wait
    assert not ctx.writes._lock_waits


def test_a_batch_inserts_its_rows_with_one_statement_per_table(ctx: Context) -> None:
    """The rows of a batch's units (certificates, audit records) are inserted together after the
    units ran: one INSERT per table, whatever the batch size, audit records in the units' order,
    one per certificate, naming the join token that paid for it."""
    entry = add_entry(ctx, WEB)
    token_id, secret = join_secret(ctx, entry, uses=5)
    grants = [join_grant(ctx, secret) for _ in range(5)]
    csrs = [make_csr(new_key(KeyType.EC_P256)) for _ in grants]
    inserts: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_rest: object) -> None:
        if statement.lstrip().upper().startswith("INSERT"):
            inserts.append(statement.split("(")[0].split()[-1].strip('"'))

    with ctx.engine.connect() as connection:
        first_new = connection.execute(
            sa.text("SELECT coalesce(max(id), 0) FROM audit_log")
        ).scalar()
    with statements_seen(count):
        issued = cast(list[IssuedSvid], issue_on_one_loop(ctx, grants, csrs))

    assert sorted(inserts) == ["audit_log", "certificate"]
    with ctx.engine.connect() as connection:
        events = connection.execute(
            sa.text("SELECT event, actor, detail FROM audit_log WHERE id > :id ORDER BY id"),
            {"id": first_new},
        ).all()
    assert [e.event for e in events] == ["certificate.issued"] * 5
    assert {e.actor for e in events} == {f"join-token:{token_id}"}
    issued_serials = [svid.serial.hex for svid in issued]
    assert [json.loads(e.detail)["serial"] for e in events] == issued_serials


def test_a_batch_spends_its_join_token_uses_in_one_statement(ctx: Context) -> None:
    """Six issuances over three tokens, one batch: the uses are spent by one UPDATE statement
    (an executemany with one row per token, taking two uses each), not one per issuance."""
    tokens = [join_secret(ctx, add_entry(ctx, f"{WEB}/{i}"), uses=3) for i in range(3)]
    grants = [join_grant(ctx, secret) for _, secret in tokens for _ in range(2)]
    csrs = [make_csr(new_key(KeyType.EC_P256)) for _ in grants]
    updates: list[tuple[str, int]] = []

    def count(
        _conn: object, _cursor: object, statement: str, params: object, _c: object, many: bool
    ) -> None:
        if statement.lstrip().upper().startswith("UPDATE TOKEN"):
            updates.append((statement, len(cast(list[object], params)) if many else 1))

    with statements_seen(count):
        outcomes = issue_on_one_loop(ctx, grants, csrs)

    assert [type(o).__name__ for o in outcomes] == ["IssuedSvid"] * 6
    assert [rows for _, rows in updates] == [3]
    assert [uses_remaining(ctx, token_id) for token_id, _ in tokens] == [1, 1, 1]


def test_a_batch_that_cannot_start_fails_its_requests_instead_of_leaving_them(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever stops a batch before its transaction (the writer lock, the database gone), the
    requests waiting on it get a 503, on the loop (SQLite) and from the committing thread
    (PostgreSQL): never a success for what was not recorded, never a wait without end."""
    entry = add_entry(ctx, WEB)
    _, secret = join_secret(ctx, entry, uses=3)
    grants = [join_grant(ctx, secret) for _ in range(3)]
    csrs = [make_csr(new_key(KeyType.EC_P256)) for _ in grants]
    certificates = count_rows(ctx, "certificate")

    def broken(_self: GroupCommit, _batch: list[object], *_on: object) -> None:
        raise OSError("no writer lock")

    monkeypatch.setattr(GroupCommit, "_commit", broken)

    outcomes = issue_on_one_loop(ctx, grants, csrs)
    threaded: list[str] = []

    def in_thread(grant: Grant, csr: bytes) -> None:
        try:
            issue_svid(ctx, grant, csr)
            threaded.append("IssuedSvid")
        except Exception as error:
            threaded.append(type(error).__name__)

    threads = [
        threading.Thread(target=in_thread, args=(g, c)) for g, c in zip(grants, csrs, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)

    assert [type(o).__name__ for o in outcomes] == ["Unavailable"] * 3
    assert threaded == ["Unavailable"] * 3
    assert count_rows(ctx, "certificate") == certificates


def test_credential_lookups_ready_on_one_loop_are_one_query(ctx: Context) -> None:
    """``join_grant_async`` (what ``POST /v1/svid`` runs on the loop): the lookups of the
    requests a loop has ready are one query (on PostgreSQL made on a reader thread), and each
    request still gets its own token's grant, or its own refusal."""
    web, api = add_entry(ctx, WEB), add_entry(ctx, "spiffe://example.org/api")
    _, web_secret = join_secret(ctx, web, uses=5)
    _, api_secret = join_secret(ctx, api, uses=5)
    _, spent = join_secret(ctx, api, uses=1)
    issue_svid(ctx, join_grant(ctx, spent), make_csr(new_key(KeyType.EC_P256)))  # its only use
    secrets = [web_secret, api_secret, web_secret, "no-such-token", spent]
    queries = ctx.lookups.queries

    async def scenario() -> list[object]:
        lookups = (join_grant_async(ctx, secret) for secret in secrets)
        return await asyncio.gather(*lookups, return_exceptions=True)

    outcomes = asyncio.run(scenario())

    assert ctx.lookups.queries == queries + 1
    granted = [str(o.spiffe_id) if isinstance(o, Grant) else type(o).__name__ for o in outcomes]
    assert granted == [WEB, "spiffe://example.org/api", WEB] + ["AuthenticationFailed"] * 2
    assert [o.join_token_id for o in outcomes[:3] if isinstance(o, Grant)] == [
        join_grant(ctx, s).join_token_id for s in secrets[:3]
    ]


def test_renewal_lookups_ready_on_one_loop_are_one_query(ctx: Context) -> None:
    """``renewal_grant_async``: the certificate lookups of the renewals a loop has ready are one
    query, and each proof still gets the grant of the certificate it names (or its refusal)."""
    web, api = enrol(ctx, WEB), enrol(ctx, "spiffe://example.org/api")
    csrs = [make_csr(new_key(KeyType.EC_P256)) for _ in range(3)]
    proofs = [
        make_proof(old.cert, old.key, csr_sha256(csr), ctx.clock.now())
        for old, csr in zip((web, api, web), csrs, strict=True)
    ]
    queries = ctx.lookups.queries

    async def scenario() -> list[object]:
        renewals = [renewal_grant_async(ctx, p, c) for p, c in zip(proofs, csrs, strict=True)]
        unknown = renewal_grant_async(ctx, proofs[0], make_csr(new_key(KeyType.EC_P256)))
        return await asyncio.gather(*renewals, unknown, return_exceptions=True)

    outcomes = asyncio.run(scenario())

    assert ctx.lookups.queries == queries + 1
    granted = [o.renews_serial if isinstance(o, Grant) else type(o).__name__ for o in outcomes]
    serials = [format(old.cert.serial_number, "x") for old in (web, api, web)]
    assert granted == [*serials, "AuthenticationFailed"]  # a proof bound to another CSR


def test_a_failed_lookup_fails_every_request_that_waited_on_it(ctx: Context) -> None:
    """A database error in the shared query reaches every request of the batch (a 503 each,
    through the API's problem handlers), and none is left waiting."""
    _, secret = join_secret(ctx, add_entry(ctx, WEB), uses=5)
    ctx.reads.dispose()
    original = ctx.lookups._engine
    broken = sa.create_engine("sqlite:////nonexistent/dir/trellis.db")
    ctx.lookups._engine = broken

    async def scenario() -> list[object]:
        return await asyncio.gather(
            *(join_grant_async(ctx, secret) for _ in range(3)), return_exceptions=True
        )

    try:
        outcomes = asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        ctx.lookups._engine = original
        broken.dispose()
    assert [type(o).__name__ for o in outcomes] == ["OperationalError"] * 3


def test_a_batch_records_each_request_s_id_and_its_own_log_lines_name_none(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch is committed by a callback or task that the first of its requests started (or
    by the thread of one of them), in that request's context. Each ``certificate.issued``
    record still names its own request (it is made before the unit is handed over); a line
    the batch logs for all of them (here a failure before its transaction) names none: it
    named the request that happened to start the batch, on the loop and in threads alike."""
    entry = add_entry(ctx, WEB)
    _, secret = join_secret(ctx, entry, uses=9)
    grants = [join_grant(ctx, secret) for _ in range(9)]
    csrs = [make_csr(new_key(KeyType.EC_P256)) for _ in grants]

    async def as_request(request_id: str, grant: Grant, csr: bytes) -> IssuedSvid:
        REQUEST_ID.set(request_id)  # what api.requestid does, in this request's task
        return await issue_svid_async(ctx, grant, csr)

    def on_one_loop(first: int, last: int) -> list[object]:
        async def all_at_once() -> list[object]:
            issuing = (as_request(f"rid-{i}", grants[i], csrs[i]) for i in range(first, last))
            return await asyncio.wait_for(asyncio.gather(*issuing, return_exceptions=True), 20)

        return asyncio.run(all_at_once())

    issued = on_one_loop(0, 3)
    serials = {o.serial.hex: f"rid-{i}" for i, o in enumerate(issued) if isinstance(o, IssuedSvid)}
    assert len(serials) == 3, issued
    records = audit.list_audit(ctx, event="certificate.issued")
    assert {r.detail["serial"]: r.request_id for r in records} == serials

    seen: list[str | None] = []

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(REQUEST_ID.get())

    def broken(_self: GroupCommit, _batch: list[object], *_on: object) -> None:
        raise OSError("no writer lock")

    monkeypatch.setattr(GroupCommit, "_commit", broken)
    handler = Seen()
    logging.getLogger("trellis.store").addHandler(handler)
    try:
        assert {type(o).__name__ for o in on_one_loop(3, 6)} == {"Unavailable"}

        def in_thread(index: int) -> None:
            REQUEST_ID.set(f"rid-{index}")
            with contextlib.suppress(Unavailable):
                issue_svid(ctx, grants[index], csrs[index])

        threads = [threading.Thread(target=in_thread, args=(i,)) for i in range(6, 9)]
        with one_batch(ctx.writes, 3):
            for thread in threads:
                thread.start()
        for thread in threads:
            thread.join(20)
    finally:
        logging.getLogger("trellis.store").removeHandler(handler)
    assert len(seen) >= 2 and set(seen) == {None}, seen
