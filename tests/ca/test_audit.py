"""The audit trail: every change leaves a record in its own transaction, and the sealed hash
chain exposes any edited, deleted or reordered record."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from ca import audit, jobs
from ca.certs import revoke_certificate
from ca.clock import FixedClock
from ca.config import Context, Settings, build_context
from ca.entries import EntryParams, create_entry, delete_entry
from ca.errors import AuthenticationFailed
from ca.grants import join_grant
from ca.identity import SpiffeId
from ca.issue import issue_svid
from ca.keys import KeyType
from ca.logs import REQUEST_ID
from ca.revocation import RevocationReason
from ca.tokens import create_join_token
from tests.ca.svidkit import make_csr

WEB = "spiffe://example.org/ns/default/sa/web"


def _events(ctx: Context) -> list[str]:
    return [e.event for e in reversed(audit.list_audit(ctx, limit=1000))]


def _activity(ctx: Context) -> str:
    """Enrol a workload through the real pipeline, then revoke it; returns the serial."""
    entry = create_entry(ctx, EntryParams(SpiffeId.parse(WEB)), actor="admin-token:t1")
    _, secret = create_join_token(ctx, entry.id, actor="admin-token:t1")
    svid = issue_svid(ctx, join_grant(ctx, secret), make_csr(KeyType.EC_P256.generate()))
    request = REQUEST_ID.set("req-42")  # as api.requestid sets it for a REST request
    try:
        revoke_certificate(ctx, svid.serial, RevocationReason.KEY_COMPROMISE, "admin-token:t1")
    finally:
        REQUEST_ID.reset(request)
    return svid.serial.hex


def _sealed(ctx: Context) -> None:
    audit.seal(ctx, settle=dt.timedelta(0))


def _records(ctx: Context, count: int) -> None:
    with ctx.engine.begin() as connection:
        for i in range(count):
            audit.record(connection, "test.event", f"s-{i}", actor="t", at=ctx.clock.now())


def test_every_change_is_recorded_with_who_and_which_request(ctx: Context) -> None:
    serial = _activity(ctx)
    events = _events(ctx)
    assert events[:2] == ["ca.created", "ca.created"]  # init: root and intermediate
    assert events[-4:] == [
        "entry.created",
        "token.created",
        "certificate.issued",
        "certificate.revoked",
    ]
    # The use of the join token is the issuance's record: its actor is the token.
    issued = audit.list_audit(ctx, event="certificate.issued")[0]
    token = audit.list_audit(ctx, event="token.created")[0]
    assert issued.actor == f"join-token:{token.subject.removeprefix('token:')}"
    assert issued.detail["serial"] == serial
    revoked = audit.list_audit(ctx, event="certificate.revoked")[0]
    assert (revoked.subject, revoked.actor, revoked.request_id) == (
        serial,
        "admin-token:t1",
        "req-42",
    )
    assert revoked.detail == {"reason": "keyCompromise"}


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("token.", ["token.created"]),
        ("token_", []),  # "_" was LIKE's any one character: it matched token.created
        ("%", []),  # LIKE's anything: it matched every record
        ("50%", ["50%.done"]),
        ("50_", []),
        ("", ["50%.done", "entry_created", "token.created"]),
    ],
)
def test_the_event_filter_is_a_literal_prefix(
    bare_ctx: Context, prefix: str, expected: list[str]
) -> None:
    """``trellis audit list --event`` promises an event prefix (docs/cli.md): ``%`` and ``_``
    are characters of it, on both databases, not SQL LIKE wildcards."""
    with bare_ctx.engine.begin() as connection:
        for event in ("token.created", "entry_created", "50%.done"):
            audit.record(connection, event, "s", actor="t", at=bare_ctx.clock.now())
    found = audit.list_audit(bare_ctx, event=prefix)
    assert sorted(e.event for e in found) == expected


def test_a_refused_change_leaves_no_record(ctx: Context) -> None:
    entry = create_entry(ctx, EntryParams(SpiffeId.parse(WEB)))
    _, secret = create_join_token(ctx, entry.id, uses=1)
    grant = join_grant(ctx, secret)
    issue_svid(ctx, grant, make_csr(KeyType.EC_P256.generate()))
    before = _events(ctx)
    with pytest.raises(AuthenticationFailed):
        issue_svid(ctx, grant, make_csr(KeyType.EC_P256.generate()))  # the token is spent
    assert _events(ctx) == before


def test_a_clean_trail_verifies_and_its_head_is_signed_by_the_ca(ctx: Context) -> None:
    _activity(ctx)
    _sealed(ctx)
    result = audit.verify(ctx)
    assert result.ok, result.problems
    assert result.sealed == len(_events(ctx)) and result.unsealed == 0
    assert result.seals_checked == 1
    delete_entry(ctx, audit.list_audit(ctx, event="entry.created")[0].detail["id"])
    _sealed(ctx)
    again = audit.verify(ctx)
    assert again.ok and again.seals_checked == 2 and again.sealed == result.sealed + 1


def _execute(ctx: Context, statement: str, **params: object) -> None:
    with ctx.engine.begin() as connection:
        connection.execute(sa.text(statement), params)


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        ("UPDATE audit_log SET actor = 'mallory' WHERE seq = 4", "record seq 4 "),
        ("UPDATE audit_log SET detail = '{\"forged\": 1}' WHERE seq = 5", "record seq 5 "),
        ("DELETE FROM audit_log WHERE seq = 4", "records seq 4..4 are missing"),
        ("DELETE FROM audit_log WHERE seq = (SELECT max(seq) FROM audit_log)", "seal at seq"),
    ],
    ids=["fail/edited-actor", "fail/edited-detail", "fail/deleted", "fail/deleted-head"],
)
def test_tampering_is_detected_at_the_right_record(
    ctx: Context, tamper: str, expected: str
) -> None:
    _activity(ctx)
    _sealed(ctx)
    assert audit.verify(ctx).ok
    _execute(ctx, tamper)
    result = audit.verify(ctx)
    assert not result.ok
    assert expected in result.problems[0], result.problems


def test_swapping_two_records_is_detected(ctx: Context) -> None:
    _activity(ctx)
    _sealed(ctx)
    # Exchange the content of records 3 and 4 while leaving their seq and hashes in place.
    with ctx.engine.begin() as connection:
        rows = {
            row.seq: row
            for row in connection.execute(
                sa.text(
                    "SELECT seq, actor, event, subject, detail FROM audit_log WHERE seq IN (3, 4)"
                )
            )
        }
        for target, source in ((3, rows[4]), (4, rows[3])):
            connection.execute(
                sa.text(
                    "UPDATE audit_log SET actor = :a, event = :e, subject = :s, detail = :d "
                    "WHERE seq = :seq"
                ),
                {
                    "a": source.actor,
                    "e": source.event,
                    "s": source.subject,
                    "d": source.detail,
                    "seq": target,
                },
            )
    result = audit.verify(ctx)
    assert not result.ok
    assert result.problems[0].startswith("record seq 3 ")


def test_records_settle_before_they_are_sealed(ctx: Context, clock: FixedClock) -> None:
    _activity(ctx)
    first = audit.seal(ctx, settle=dt.timedelta(seconds=30))
    assert first.records == 0  # written "now": not settled yet
    clock.advance(dt.timedelta(seconds=31))
    second = audit.seal(ctx, settle=dt.timedelta(seconds=30))
    assert second.records == len(_events(ctx))
    assert audit.seal(ctx, settle=dt.timedelta(0)).records == 0  # idempotent


def test_sealing_in_chunks_chains_everything_and_signs_the_head_once(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records are chained a chunk per write transaction (so the sealer never holds the write
    lock long); one signed seal covers the new head."""
    monkeypatch.setattr(audit, "SEAL_CHUNK", 3)
    _activity(ctx)
    _records(ctx, 6)
    total = len(_events(ctx))
    assert total > 3 * 2  # several chunks
    before = ctx.writes.batches

    sealed = audit.seal(ctx, settle=dt.timedelta(0))

    assert sealed.records == total and sealed.head_seq == total
    assert ctx.writes.batches - before == -(-total // 3)  # one write per chunk
    result = audit.verify(ctx)
    assert result.ok, result.problems
    assert result.sealed == total and result.unsealed == 0 and result.seals_checked == 1
    assert audit.seal(ctx, settle=dt.timedelta(0)).records == 0


def test_a_last_chunk_exactly_full_is_still_signed(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    _activity(ctx)
    total = len(_events(ctx))
    monkeypatch.setattr(audit, "SEAL_CHUNK", total)  # the records fill the chunk exactly

    assert audit.seal(ctx, settle=dt.timedelta(0)).records == total

    result = audit.verify(ctx)
    assert result.ok and result.sealed == total and result.seals_checked == 1


def test_the_sealer_finds_unsealed_records_without_walking_sealed_ones(ctx: Context) -> None:
    """The sealer's query for the oldest unsealed records reads only unsealed ones: PostgreSQL
    from a partial index of them (ordered by id over the primary key instead, it walked every
    sealed record first, once per chunk: seconds of CPU per sealer run under load), SQLite
    through the unique index on seq, where they are the NULLs."""
    with ctx.engine.begin() as connection:
        connection.execute(
            sa.insert(audit._AUDIT),
            [
                {"at": ctx.clock.now(), "actor": "t", "event": "e", "subject": "s", "detail": "{}"}
                for _ in range(500)
            ],
        )
    audit.seal(ctx, settle=dt.timedelta(0))
    compiled = audit._PENDING.compile(dialect=ctx.engine.dialect)
    values = compiled.construct_params({"cutoff": ctx.clock.now().isoformat(), "chunk": 251})
    params = tuple(values[n] for n in compiled.positiontup or ()) if compiled.positional else values
    explain = "EXPLAIN QUERY PLAN " if ctx.engine.dialect.name == "sqlite" else "EXPLAIN "
    with ctx.engine.begin() as connection:
        connection.exec_driver_sql("ANALYZE")
        found = connection.exec_driver_sql(explain + str(compiled), params)
        plan = " ".join(str(row) for row in found)
    wanted = "(seq=?)" if ctx.engine.dialect.name == "sqlite" else "ix_audit_log_unsealed"
    assert wanted in plan and "SCAN audit_log" not in plan, plan


def test_the_job_chains_every_run_but_signs_the_head_at_most_every_sign_every(
    ctx: Context, clock: FixedClock
) -> None:
    """The audit-seal job runs every 2 s; a signed seal (with the CA certificate) every run
    would be a row every 2 s, so the head is signed when the last signature is SIGN_EVERY old.
    What is chained in between is counted by verify until a signature covers it."""
    every = audit.SIGN_EVERY
    _activity(ctx)
    first = audit.seal(ctx, settle=dt.timedelta(0), sign_every=every)
    assert first.records > 0 and audit.verify(ctx).seals_checked == 1  # no seal yet: signed

    clock.advance(dt.timedelta(seconds=2))
    _records(ctx, 3)
    second = audit.seal(ctx, settle=dt.timedelta(0), sign_every=every)
    assert second.records == 3  # chained...
    result = audit.verify(ctx)
    assert result.ok, result.problems
    assert (result.seals_checked, result.unsigned, result.unsealed) == (1, 3, 0)  # ...not signed

    clock.advance(every)
    third = audit.seal(ctx, settle=dt.timedelta(0), sign_every=every)
    assert third.records == 0  # nothing new to chain, but the head is now signed
    result = audit.verify(ctx)
    assert result.ok, result.problems
    assert (result.seals_checked, result.unsigned) == (2, 0)
    assert audit.seal(ctx, settle=dt.timedelta(0), sign_every=every).records == 0
    assert audit.verify(ctx).seals_checked == 2  # nothing to sign: no new seal


def test_the_signed_head_is_what_an_unsigned_tail_can_be_rewritten_after(
    ctx: Context, clock: FixedClock
) -> None:
    """A tail chained but not signed yet can be rewritten consistently (hashes recomputed)
    without verify noticing, as unsealed records always could: it is reported, not hidden."""
    _activity(ctx)
    audit.seal(ctx, settle=dt.timedelta(0), sign_every=audit.SIGN_EVERY)
    with ctx.engine.begin() as connection:
        audit.record(connection, "test.event", "tail", actor="t", at=clock.now())
    audit.seal(ctx, settle=dt.timedelta(0), sign_every=audit.SIGN_EVERY)
    with ctx.engine.begin() as connection:  # rewritten, its hash recomputed: no key needed
        tail = connection.execute(
            sa.select(audit._AUDIT).where(audit._AUDIT.c.subject == "tail")
        ).one()
        forged = {**tail._asdict(), "actor": "forger"}
        connection.execute(
            sa.update(audit._AUDIT)
            .where(audit._AUDIT.c.id == tail.id)
            .values(actor="forger", hash=audit._digest(forged, tail.seq, tail.prev_hash))
        )
    before = audit.verify(ctx)
    assert before.ok and before.unsigned == 1  # undetectable, but reported as unsigned

    clock.advance(audit.SIGN_EVERY)
    audit.seal(ctx, settle=dt.timedelta(0), sign_every=audit.SIGN_EVERY)
    with ctx.engine.begin() as connection:  # now signed: editing it breaks the chain
        connection.execute(
            sa.update(audit._AUDIT).where(audit._AUDIT.c.subject == "tail").values(actor="t")
        )
    after = audit.verify(ctx)
    assert not after.ok and "edited" in after.problems[0]


@pytest.mark.parametrize(
    ("subject", "request_id"),
    [
        ("spiffe://example.org/ns/default/sa/web", None),
        ('CN=é "quoted" \\ back\tslash\n\u2028', "req-1"),
        ("\x00\x1f\x7f \U0001f600 </script>", 'ünïcode"id'),
    ],
)
def test_the_digest_is_the_sorted_canonical_json_chains_were_sealed_with(
    subject: str, request_id: str | None
) -> None:
    """Chains sealed before keep verifying: the record hash is SHA-256 of the record's JSON with
    sorted keys and no spaces (``json.dumps``'s escaping), whichever way it is built."""
    row = {
        "id": 41,
        "at": dt.datetime(2026, 11, 26, 12, 0, 1, 250_000, tzinfo=dt.UTC),
        "actor": "token:3f2a",
        "event": "certificate.issued",
        "subject": subject,
        "detail": json.dumps({"serial": "5f00", "profile": "x509-svid", "note": subject}),
        "request_id": request_id,
    }
    document = {**row, "at": row["at"].isoformat(), "seq": 7, "prev": "ab" * 32}
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    assert audit._digest(row, 7, "ab" * 32) == hashlib.sha256(canonical).hexdigest()


def test_a_sealer_chunk_in_progress_holds_up_issuance_only_on_sqlite(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL the sealer's chunks are transactions of their own
    (``GroupCommit.run_apart``): an issuance commits while one is still open. Through the group
    commit, a chunk held the process's commit lock and every batch of requests waited behind
    it. SQLite has one write lock, so there the issuance waits for the chunk."""
    _activity(ctx)  # records to seal
    inside, release = threading.Event(), threading.Event()
    real_writer = audit._chunk_writer

    def held_writer(chained: list[dict[str, object]], signature: object) -> object:
        write = real_writer(chained, signature)  # type: ignore[arg-type]

        def held(connection: sa.Connection, rows: object) -> None:
            write(connection, rows)  # type: ignore[arg-type]
            inside.set()
            release.wait(10)

        return held

    entry = create_entry(ctx, EntryParams(SpiffeId.parse(f"{WEB}-2")))
    _, secret = create_join_token(ctx, entry.id)
    grant = join_grant(ctx, secret)
    csr = make_csr(KeyType.EC_P256.generate())
    monkeypatch.setattr(audit, "_chunk_writer", held_writer)
    sealer = threading.Thread(target=_sealed, args=(ctx,))
    sealer.start()
    issued_while_open = False
    try:
        assert inside.wait(10)
        done = threading.Event()

        def issue() -> None:
            issue_svid(ctx, grant, csr)
            done.set()

        issuer = threading.Thread(target=issue)
        issuer.start()
        issued_while_open = done.wait(2)
        release.set()
        issuer.join(20)
        assert done.is_set()
    finally:
        release.set()
        sealer.join(20)
    assert issued_while_open == (ctx.engine.dialect.name == "postgresql")
    assert audit.verify(ctx).ok


def test_sealing_on_a_loop_lets_it_serve_every_few_records_and_chains_as_the_thread_does(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A serving worker's loop seals between its requests (``seal_on_loop``): it lets the
    loop's other work run at least every ``PAUSE_EVERY`` records, and commits each chunk
    through the loop's group commit. What it chains verifies as ``seal``'s chain does."""
    monkeypatch.setattr(audit, "SEAL_CHUNK", 40)
    _activity(ctx)
    _records(ctx, 90)
    total = len(_events(ctx))
    ticks = 0
    at_digest: list[int] = []
    digest = audit._digest

    def counted(*args: object) -> str:
        at_digest.append(ticks)
        return digest(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(audit, "_digest", counted)

    async def serving() -> audit.Sealed:
        nonlocal ticks
        sealing = asyncio.ensure_future(audit.seal_on_loop(ctx, settle=dt.timedelta(0)))
        while not sealing.done():
            ticks += 1
            await asyncio.sleep(0)
        return sealing.result()

    before = ctx.writes.batches
    sealed = asyncio.run(serving())

    assert sealed.records == total and sealed.head_seq == total
    assert ctx.writes.batches - before == -(-total // 40)  # one commit per chunk
    assert len(at_digest) == total
    held = audit.PAUSE_EVERY  # the loop's other work ran within every PAUSE_EVERY records
    assert all(at_digest[i] < at_digest[i + held] for i in range(total - held)), at_digest
    result = audit.verify(ctx)
    assert result.ok, result.problems
    assert (result.sealed, result.unsealed, result.seals_checked) == (total, 0, 1)
    _records(ctx, 3)
    assert audit.seal(ctx, settle=dt.timedelta(0)).records == 3  # the thread goes on from it
    assert audit.verify(ctx).ok


@contextlib.contextmanager
def _serving_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in a thread, as a worker's, until the block ends (``asyncio.run``,
    so that the loop's committing task closes its connection)."""
    started = threading.Event()
    found: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def serve() -> None:
        stop = asyncio.Event()
        found.append((asyncio.get_running_loop(), stop))
        started.set()
        await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()
    assert started.wait(10)
    loop, stop = found[0]
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(20)


def test_the_job_seals_on_the_serving_loop_while_there_is_one(
    ctx: Context, clock: FixedClock
) -> None:
    """In a server the audit-seal job (a scheduler thread) has the serving loop seal
    (``seal_on_loop``): a thread hashing records took the GIL from the loop each time it let
    go of it, and requests in flight waited (docs/benchmarks.md, change 49). Without a loop,
    as in the CLI, the job seals in its own thread."""
    _activity(ctx)
    clock.advance(audit.SETTLE + dt.timedelta(seconds=1))
    total = len(_events(ctx))
    busy = threading.Event()
    with _serving_loop() as loop:
        ctx.serving_loop = loop
        try:
            loop.call_soon_threadsafe(busy.wait, 20)  # the loop is busy until `busy` is set
            outcome: list[str] = []
            job = threading.Thread(target=lambda: outcome.append(jobs.seal_audit(ctx)))
            job.start()
            job.join(1)
            assert job.is_alive()  # waiting for the loop
            assert audit.verify(ctx).unsealed == total
            busy.set()
            job.join(20)
            assert outcome == [f"sealed {total} audit record(s)"]
        finally:
            busy.set()
            ctx.serving_loop = None
    result = audit.verify(ctx)
    assert result.ok and result.sealed == total, result.problems

    clock.advance(dt.timedelta(seconds=10))
    _records(ctx, 2)
    clock.advance(audit.SETTLE + dt.timedelta(seconds=1))
    assert jobs.seal_audit(ctx) == "sealed 2 audit record(s)"  # no loop: in this thread
    assert audit.verify(ctx).ok


def test_two_sealers_at_once_chain_each_record_once(
    ctx: Context, settings: Settings, clock: FixedClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``trellis audit seal`` beside the server's job (two processes, here two contexts on one
    database): each waits for the other, so every record is chained once and counted once. The
    second used to read the same head and chain the same records again: a wrong count or a
    UNIQUE failure on ``seq`` reported as a damaged database."""
    monkeypatch.setattr(audit, "SEAL_CHUNK", 5)  # many chunks: the runs would interleave
    _records(ctx, 300)
    total = len(_events(ctx))
    other = build_context(settings, clock=clock)
    start = threading.Barrier(2)
    results: list[audit.Sealed] = []
    failures: list[BaseException] = []

    def run(context: Context) -> None:
        start.wait()
        try:
            results.append(audit.seal(context, settle=dt.timedelta(0)))
        except BaseException as error:  # reported by the assertion below
            failures.append(error)

    try:
        threads = [threading.Thread(target=run, args=(c,)) for c in (ctx, other)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        other.close()

    assert failures == []
    assert sorted(r.records for r in results) == [0, total]
    verified = audit.verify(ctx)
    assert verified.ok, verified.problems
    assert verified.sealed == total and verified.unsealed == 0
