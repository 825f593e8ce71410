"""A tamper-evident audit trail.

Every security-relevant change (issue, renew, revoke, token create/use/revoke, entry changes, CA
transitions, ...) appends a row to ``audit_log`` *in the transaction of the change*: no change
without its record, no record without its change.

The hash chain is added after the fact by ``seal`` (a scheduled job): it takes the records that
have settled, in id order, gives each the next ``seq`` and ``hash = SHA-256(canonical record ||
previous hash)``, and signs the new head with the mesh's issuing CA key, at most every
``SIGN_EVERY``. Sealing afterwards keeps writers from serialising on the head of the chain
(issuance runs thousands of transactions per second); the settle delay lets transactions that
took an id earlier but committed later land first. ``verify`` recomputes the chain and checks the
signatures, naming the first record that was edited, deleted or reordered; what a signature
proves, and whose counts, is ``ca.audit_seals``.

The job runs every 2 s but signs at most every 10 s. Run every 10 s, each run chained ~40,000
records at 2,000 issuances a second, a burst of most of a second during which the sealing
worker's loop waited on the GIL and its commit lock and the other worker on SQLite's write lock
(c=16 p99 25 to 41 ms, against 16 to 20 ms with no sealer; docs/benchmarks.md, change 35); a
signed seal per run at 2 s would add a row with the CA certificate every 2 s. The records after
the last signed head are what an attacker with write access to the database could still rewrite
undetected, as unsealed ones always were: ``verify`` counts both.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Any, cast

import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlmodel import Session, select

from ca.audit_seals import Anchors, SealCa, Signers, seal_message, sign, signed_as
from ca.config import Context
from ca.errors import (
    AuditTampered,
    Conflict,
    InternalError,
    InvalidInput,
    NotInitialised,
    TrellisError,
    Unavailable,
)
from ca.logs import REQUEST_ID
from ca.progress import Progress, report
from ca.store.batch import Rows, Work
from ca.store.core import insert_now, prepared, table
from ca.store.models import UtcDateTime
from ca.store.models_audit import AuditRow, AuditSealRow

__all__ = [
    "INSERT",
    "LATE",
    "Anchors",
    "AuditEntry",
    "AuditPage",
    "Verification",
    "audit_page",
    "entry",
    "list_audit",
    "record",
    "seal",
    "stored_anchors",
    "verify",
]

log = logging.getLogger("trellis.audit")

SETTLE = dt.timedelta(seconds=5)
MAX_LIST = 10_000  # records a listing returns at most
SIGN_EVERY = dt.timedelta(seconds=10)
GENESIS = "0" * 64
# How far behind the chain a record may be and still be chained or left unsigned. The server
# chains every 2 s (after a settle delay of 5 s on PostgreSQL) and signs every 10 s, so a record
# honestly left behind is seconds behind; ten minutes leaves room for a slow transaction (an
# ``init`` generating RSA keys) and clock jitter between replicas. A record further behind the
# chain's head or its newest signature had its chain or seal removed (see ``verify``).
LATE = dt.timedelta(minutes=10)
INSERT = sa.insert(table(AuditRow))  # built once: see ca.store.core


def record(
    session: Session | sa.Connection,
    event: str,
    subject: str,
    *,
    actor: str,
    at: dt.datetime,
    detail: dict[str, Any] | None = None,
    request_id: str | None = None,
) -> None:
    """Append one record inside the caller's transaction."""
    insert_now(
        session,
        (INSERT, entry(event, subject, actor=actor, at=at, detail=detail, request_id=request_id)),
    )


def entry(
    event: str,
    subject: str,
    *,
    actor: str,
    at: dt.datetime,
    detail: dict[str, Any] | None = None,
    request_id: str | None = None,
) -> dict[str, Any]:
    """One record's row, for ``INSERT`` (what ``record`` executes; group commits batch it).

    Without an explicit ``request_id`` the record takes the id of the request being served
    (``ca.logs.REQUEST_ID``, set by ``api.requestid`` for every REST request and by
    ``cli.common.State`` to ``cli-<hex>`` for a CLI command, None in the scheduler's jobs):
    every change names its request (docs/operations.md), with no parameter threaded through
    each route and core function, and issuance pays one context-variable read."""
    request_id = request_id or REQUEST_ID.get()
    return {
        "at": at,
        "actor": actor[:255],
        "event": event[:64],
        "subject": subject[:2048],
        "detail": json.dumps(detail or {}, sort_keys=True, default=str),
        "request_id": request_id[:64] if request_id else None,
    }


# The canonical form is the text of ``json.dumps(record, sort_keys=True, separators=(",", ":"))``,
# what the chain has always hashed, built by formatting: the keys in sorted order and each
# string through ``json.dumps``'s own (C) escaping, instead of encoding a dict per record. The
# sealer runs in a serving worker's thread and shares its GIL: 1.7 instead of 3.9 µs a record,
# 9.5 -> 8.5 µs for a whole sealed record (docs/benchmarks.md, change 47).
# tests/ca/test_audit.py compares the two forms on strings that need escaping.
_quote = encode_basestring_ascii


def _digest(row: Mapping[str, Any], seq: int, previous: str) -> str:
    """``row``: the record's columns by name."""
    request_id = row["request_id"]
    canonical = (
        f'{{"actor":{_quote(row["actor"])},"at":{_quote(row["at"].isoformat())},'
        f'"detail":{_quote(row["detail"])},"event":{_quote(row["event"])},'
        f'"id":{row["id"]:d},"prev":{_quote(previous)},'
        f'"request_id":{"null" if request_id is None else _quote(request_id)},'
        f'"seq":{seq:d},"subject":{_quote(row["subject"])}}}'
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Sealed:
    records: int
    head_seq: int | None  # the head this run chained to, None when it chained nothing
    # The chain's head after the run (seq, hash), None while the chain is empty, and the seq
    # of the newest signed head: what an operator compares with a witnessed one (``--head``).
    head: tuple[int, str] | None = None
    signed_seq: int | None = None


_AUDIT, _SEALS = table(AuditRow), table(AuditSealRow)
_HEAD = (
    sa.select(_AUDIT.c.seq, _AUDIT.c.hash, _AUDIT.c.id, _AUDIT.c.at)
    .where(_AUDIT.c.seq.is_not(None))
    .order_by(_AUDIT.c.seq.desc())
    .limit(1)
)
_PENDING = (
    sa.select(
        _AUDIT.c.id,
        _AUDIT.c.at,
        _AUDIT.c.actor,
        _AUDIT.c.event,
        _AUDIT.c.subject,
        _AUDIT.c.detail,
        _AUDIT.c.request_id,
    )
    .where(_AUDIT.c.seq.is_(None), _AUDIT.c.at <= sa.bindparam("cutoff"))
    .order_by(_AUDIT.c.id)
    .limit(sa.bindparam("chunk"))
)
# Seals are written in seq order: the newest by primary key, without an index on seq.
_LAST_SEAL = sa.select(_SEALS.c.seq, _SEALS.c.signed_at).order_by(_SEALS.c.id.desc()).limit(1)
_CHAIN = (
    sa.update(_AUDIT)
    .where(_AUDIT.c.id == sa.bindparam("row_id"), _AUDIT.c.seq.is_(None))
    .values(
        seq=sa.bindparam("new_seq"),
        prev_hash=sa.bindparam("new_prev"),
        hash=sa.bindparam("new_hash"),
    )
)
# Records chained per write transaction. The sealer shares the database with issuance (about
# two records per certificate): a chunk holds SQLite's write lock for a few milliseconds, where
# sealing ten seconds of records in one transaction held it for seconds, stalling every
# issuance. Chunks of 1,000 still added 6 to 12 ms to the c=16 p99 (26 to 33 ms, 19 to 21 ms
# with no sealer); chunks of 250, 23 to 25 ms (docs/benchmarks.md).
SEAL_CHUNK = 250


# How often the sealer lets the rest of its process go first: every 25 records (about 0.2 ms
# of hashing). On a serving worker's loop (``seal_on_loop``) that is a turn of the loop, so the
# requests ready meanwhile are served between two runs of 25. A sealer in a thread of a worker
# (``seal`` with ``pause``, how the job ran before change 49) shared the GIL with the loop and,
# hashing back to back, kept it for up to the 5 ms switch interval each time the loop let go of
# it for a system call: c=16 p99 19 to 27 ms against 14 to 19 with no sealer; sleeping 0.5 ms
# every 25 records gave 16 to 21 ms (docs/benchmarks.md, change 39).
PAUSE_EVERY, PAUSE_SECONDS = 25, 0.0005


# The PostgreSQL advisory lock every sealer holds (``one_sealer``); apart from the jobs' own keys
# (``ca.scheduler._lock_key``), which the audit-seal job already holds on another connection.
_SEAL_LOCK = 0x7E12_5EA1


@contextlib.contextmanager
def one_sealer(ctx: Context) -> Iterator[None]:
    """Held by every sealer for its whole run, across processes: the server's job and
    ``trellis audit seal`` both read the chain's head, then write the records after it. Two at
    once chained the same records twice over: the second's writes matched no unsealed row (its
    count was wrong) or took a ``seq`` the first had used (a UNIQUE failure reported as a
    damaged database). A sealer that finds another running waits for it and then finds nothing
    or little left to do. PostgreSQL: a session advisory lock; SQLite: a ``flock`` on a file
    beside the database (the same way batches take its write lock)."""
    if ctx.engine.dialect.name == "postgresql":
        with ctx.engine.connect() as connection:
            connection.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _SEAL_LOCK})
            connection.commit()
            try:
                yield
            finally:
                connection.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _SEAL_LOCK})
                connection.commit()
        return
    database = ctx.engine.url.database
    if not database or database == ":memory:":  # private to this process
        yield
        return
    descriptor = os.open(
        Path(f"{database}.seal-lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
    )
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the flock


def seal(
    ctx: Context,
    *,
    settle: dt.timedelta | None = None,
    sign_every: dt.timedelta | None = None,
    pause: bool = False,
    progress: Progress | None = None,
) -> Sealed:
    """Chain every settled, unsealed record and sign the new head (idempotent; run by one
    replica at a time). ``sign_every``: sign only if the last signature is at least that old
    (the job passes ``SIGN_EVERY``); by default, whenever the head is not signed yet.
    ``pause``: sleep now and then, so that the process's other threads get the GIL (see
    ``PAUSE_EVERY``); a server's job seals on its event loop instead (``seal_on_loop``).

    Records are chained in chunks, each written in a transaction of its own
    (``GroupCommit.run_apart``: beside the batches of requests on PostgreSQL, through the one
    write lock on SQLite); the new head is signed with the last chunk. Only one sealer runs at
    a time (``one_sealer``), so the head read before a chunk is still the head when it is
    written; should that ever fail, ``seq`` is unique and ``_CHAIN`` only touches unsealed rows,
    and a chunk that chains fewer rows than it read is rolled back (``_chunk_writer``).

    ``progress`` counts the records chained and written, chunk by chunk; how many are pending
    is not counted first (no total), since the count would cost a scan of its own."""
    with one_sealer(ctx):
        return _seal(ctx, settle, sign_every, pause, progress)


def _seal(
    ctx: Context,
    settle: dt.timedelta | None,
    sign_every: dt.timedelta | None,
    pause: bool,
    progress: Progress | None = None,
) -> Sealed:
    steps = _sealing(ctx, settle, sign_every)
    signing = _Signing(ctx)
    step = _advance(steps, None)
    written = 0
    while not isinstance(step, Sealed):
        answer: Any = None
        if isinstance(step, _Read):
            answer = _read(ctx, step.query)
        elif isinstance(step, _Write):
            ctx.writes.run_apart(step.work)
            written += step.records
            report(progress, written, None)
        elif isinstance(step, _Sign):
            answer = signing.sign(*step.head)
        elif pause:
            time.sleep(PAUSE_SECONDS)
        step = _advance(steps, answer)
    return signing.outcome(step)


async def seal_on_loop(
    ctx: Context, *, settle: dt.timedelta | None = None, sign_every: dt.timedelta | None = None
) -> Sealed:
    """``seal`` made by a serving worker's event loop, ``PAUSE_EVERY`` records at a time
    between its requests: the reads and the signature in the loop's executor (a read on
    PostgreSQL waits on the network, a Vault key signs over it), each chunk's write committed
    with the loop's next batch of issuances (``GroupCommit.run_async``) instead of in a
    transaction of its own. The job ran ``seal`` in a scheduler thread of that worker, which
    took the GIL from the loop every time the loop let go of it. Two workers at c=16, three
    runs of eight alternated pairs each (``tests.bench.pairs``): SQLite +5.2 % on average,
    PostgreSQL +11.5 % (docs/benchmarks.md, change 49). Its caller holds ``one_sealer``: a
    blocking lock has no place on the loop."""
    loop = asyncio.get_running_loop()
    steps = _sealing(ctx, settle, sign_every)
    signing = _Signing(ctx)
    step = _advance(steps, None)
    while not isinstance(step, Sealed):
        answer: Any = None
        if isinstance(step, _Read):
            answer = await loop.run_in_executor(None, _read, ctx, step.query)
        elif isinstance(step, _Write):
            await ctx.writes.run_async(step.work)
        elif isinstance(step, _Sign):
            answer = await loop.run_in_executor(None, signing.sign, *step.head)
        else:
            await asyncio.sleep(0)
        step = _advance(steps, answer)
    return signing.outcome(step)


@dataclass(frozen=True, slots=True)
class _Read:
    query: Callable[[sa.Connection], Any]


@dataclass(frozen=True, slots=True)
class _Write:
    work: Work
    records: int = 0  # chained by it


@dataclass(frozen=True, slots=True)
class _Sign:
    head: tuple[int, str, dt.datetime]


# A step of None: let the process's other work go first (``PAUSE_EVERY``).
_Step = _Read | _Write | _Sign | None


def _advance(steps: Generator[_Step, Any, Sealed], answer: Any) -> _Step | Sealed:
    """The sealer's next step, given the answer to the last one; its outcome once done."""
    try:
        return steps.send(answer)
    except StopIteration as done:
        return cast(Sealed, done.value)


def _read(ctx: Context, query: Callable[[sa.Connection], Any]) -> Any:
    with ctx.reads.connect() as connection:
        return query(connection)


def _sealing(
    ctx: Context, settle: dt.timedelta | None, sign_every: dt.timedelta | None
) -> Generator[_Step, Any, Sealed]:
    """The sealer's steps, whoever makes them (``seal``, ``seal_on_loop``): what to read, write
    and sign, and where to let the process's other work go first."""
    if settle is None:
        settle = SETTLE if ctx.engine.dialect.name == "postgresql" else dt.timedelta(0)
    now = ctx.clock.now()
    head, last_seal = yield _Read(
        lambda connection: (
            connection.execute(_HEAD).first(),
            connection.execute(_LAST_SEAL).first(),
        )
    )
    if (damaged := _damaged_head(head, last_seal)) is not None:
        raise damaged
    seq = head[0] if head and head[0] is not None else 0
    previous = head[1] if head and head[1] else GENESIS
    signed_seq = last_seal[0] if last_seal else 0
    sign = sign_every is None or last_seal is None or now - last_seal[1] >= sign_every
    # A record that sits before the chain's head by id (SQLite commits in id order; PostgreSQL
    # may commit a slow transaction's lower id later, what the settle delay is for) or is older
    # than the head or the last signature by more than LATE was unchained or inserted behind
    # the chain's back: signing it would bless a rewritten history. One comparison a record.
    newest = max(
        (at for at in (head[3] if head else None, last_seal[1] if last_seal else None) if at),
        default=None,
    )
    floor = newest - LATE if newest is not None else None
    head_id = head[2] if head and ctx.engine.dialect.name != "postgresql" else None
    pending_rows = prepared(_PENDING)
    # One row more than a chunk tells whether this chunk is the last (then it is signed).
    chunk = {"cutoff": now - settle, "chunk": SEAL_CHUNK + 1}
    total = 0
    while True:
        pending = yield _Read(lambda connection: pending_rows.rows(connection, chunk))
        last = len(pending) <= SEAL_CHUNK
        chained = []
        for index, row in enumerate(pending[:SEAL_CHUNK]):
            if index % PAUSE_EVERY == 0:
                yield None
            if (floor is not None and row["at"] < floor) or (
                head_id is not None and row["id"] < head_id
            ):
                raise _refused(row, head, last_seal)
            seq += 1
            try:
                digest = _digest(row, seq, previous)
            except (TypeError, ValueError, AttributeError):  # SQLite keeps any value anywhere
                raise _damaged_record(row) from None
            chained.append(
                {"row_id": row["id"], "new_seq": seq, "new_prev": previous, "new_hash": digest}
            )
            previous = digest
        if not chained:
            break
        signature = (yield _Sign((seq, previous, now))) if last and sign else None
        yield _Write(_chunk_writer(chained, signature), len(chained))
        if signature is not None:
            _witness(seq, previous)
            signed_seq = seq
        total += len(chained)
        if last:
            break
    if not total and sign and seq > signed_seq:  # chained by an earlier run, not signed yet
        signature = yield _Sign((seq, previous, now))
        if signature is not None:
            yield _Write(_chunk_writer([], signature))
            _witness(seq, previous)
            signed_seq = seq
    return Sealed(
        total, seq if total else None, (seq, previous) if seq else None, signed_seq or None
    )


def _witness(seq: int, head: str) -> None:
    """A truncated tail (the last records and their seals deleted) leaves a consistent chain:
    only a copy of a signed head kept elsewhere shows it. Shipped logs are that copy
    (``trellis audit verify --head SEQ:HASH``)."""
    log.info("audit head signed: seq %d hash %s", seq, head)


def _refused(row: Mapping[str, Any], head: Any, last_seal: Any) -> AuditTampered:
    chain = (
        f"the chain's head is record id {head[2]} (seq {head[0]}, {head[3].isoformat()})"
        if head is not None
        else "the chain is empty"
    )
    signed = f"last signed at seq {last_seal[0]} ({last_seal[1].isoformat()})" if last_seal else ""
    return AuditTampered(
        f"refused to chain audit record id {row['id']} ({row['event']}, "
        f"{row['at'].isoformat()}): {chain}{', ' + signed if signed else ''}, and a record "
        f"sitting before it or older than it by more than {int(LATE.total_seconds() // 60)} "
        "minutes had its chain removed or was inserted behind the chain's back; nothing was "
        "signed: run 'trellis audit verify'"
    )


def _damaged_head(head: Any, last_seal: Any) -> AuditTampered | None:
    """A chain's head or newest seal whose seq is no integer (SQLite keeps a text or a real in
    an integer column, and sorts a text after every number: it is then the head): numbering
    the next records after it would chain them to garbage."""
    if head is not None and (type(head[0]) is not int or not isinstance(head[1], str)):
        return AuditTampered(
            f"refused to chain audit records: the chain's head, record id {head[2]}, is damaged "
            f"(seq {_shown(head[0])}, hash {_shown(head[1])}); nothing was chained or signed: "
            "run 'trellis audit verify'"
        )
    if last_seal is not None and type(last_seal[0]) is not int:
        return AuditTampered(
            f"refused to chain audit records: the newest seal is damaged (seq "
            f"{_shown(last_seal[0])}); nothing was chained or signed: run 'trellis audit verify'"
        )
    return None


def _damaged_record(row: Mapping[str, Any]) -> AuditTampered:
    kinds = ", ".join(
        f"{name} {type(row[name]).__name__}"
        for name in ("actor", "event", "subject", "detail", "request_id")
        if row[name] is not None and not isinstance(row[name], str)
    )
    return AuditTampered(
        f"refused to chain audit record id {row['id']}: it is damaged ({kinds or 'unreadable'}); "
        "nothing was signed: run 'trellis audit verify'"
    )


def _chunk_writer(chained: list[dict[str, Any]], signature: dict[str, Any] | None) -> Work:
    def write(connection: sa.Connection, _rows: Rows) -> None:
        if chained and prepared(_CHAIN).executemany(connection, chained) != len(chained):
            # Chained by another sealer meanwhile: what this one computed follows a head that
            # is no longer the head. Nothing of the chunk is written.
            raise Conflict("another sealer chained these audit records first: run it again")
        if signature is not None:
            connection.execute(sa.insert(_SEALS), signature)

    return write


class _Signing:
    """The signatures of one sealing run. Chaining needs no key, so a head that cannot be signed
    (the key store unreachable, a key that is not its certificate's) does not stop it: the
    records are chained and written unsigned, and the run then fails saying so, because
    sealing means "chain and sign now" and a run reported as done must have signed."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.failed: tuple[int, TrellisError] | None = None

    def sign(self, seq: int, head: str, now: dt.datetime) -> dict[str, Any] | None:
        try:
            return _seal_row(self.ctx, seq, head, now)
        except TrellisError as error:
            self.failed = (seq, error)
            return None

    def outcome(self, sealed: Sealed) -> Sealed:
        if self.failed is None:
            return sealed
        seq, error = self.failed
        detail = (
            f"chained {sealed.records} record(s), head at seq {seq}, but could not sign the "
            f"head: {error.detail}"
        )
        raise Unavailable(detail) if isinstance(error, Unavailable) else InternalError(detail)


def _seal_row(ctx: Context, seq: int, head: str, now: dt.datetime) -> dict[str, Any] | None:
    """The signed seal over ``head``, or None when there is no mesh CA to sign with yet. It
    signs ``seal_message``: the seq and the time with the head, so that ``verify`` can hold the
    time against its signer's revocation (``ca.audit_seals``)."""
    from ca.authority import MESH, active_issuer  # the audit module is imported by ca.authority

    try:
        issuer = active_issuer(ctx, MESH)
    except NotInitialised:
        return None
    return {
        "seq": seq,
        "head_hash": head,
        "signed_at": now,
        "signer_cert_pem": issuer.certificate.public_bytes(serialization.Encoding.PEM).decode(),
        "signature": sign(issuer.signer.private_key, seal_message(MESH, seq, head, now)),
    }


@dataclass(frozen=True, slots=True)
class Verification:
    ok: bool
    sealed: int
    unsealed: int
    seals_checked: int
    problems: tuple[str, ...]
    unsigned: int = 0  # chained after the last signed head
    anchors: str = ""  # where the trust anchors the seals were checked against came from
    # seals whose signer was revoked, that prove nothing on their own (``ca.audit_seals``)
    not_counted: int = 0


def _time_of(value: Any) -> dt.datetime | None:
    """A time column as stored, read without the ORM's parsing (which raises on a damaged
    value): SQLite hands back its text, PostgreSQL a datetime."""
    if isinstance(value, dt.datetime):
        parsed = value
    else:
        try:
            parsed = dt.datetime.fromisoformat(str(value))
        except ValueError:
            return None
    return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed.astimezone(dt.UTC)


def _raw(column: sa.Column[Any]) -> Any:
    return sa.type_coerce(column, sa.String()) if isinstance(column.type, UtcDateTime) else column


def _stored(column: sa.Column[Any], sqlite: bool) -> Any:
    """A column as ``verify`` reads it. SQLite keeps any value in any column, and hands back
    a text that is not UTF-8 as an error for the whole query (the database "cannot be used",
    naming no row): there every text column is read as the bytes it holds, and ``_text``
    decodes it, a damaged one making a ``BROKEN`` line that names its row."""
    if sqlite and not isinstance(column.type, sa.Integer):
        return sa.cast(column, sa.LargeBinary()).label(column.name)
    return _raw(column)


def _text(value: Any) -> str | None:
    """A column read by ``_stored`` as text, None when it is no text."""
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def _stored_time(value: Any) -> dt.datetime | None:
    """A time column read by ``_stored``, None when damaged."""
    if isinstance(value, dt.datetime):
        return _time_of(value)
    text = _text(value)
    return None if text is None else _time_of(text)


def _shown(value: Any) -> str:
    return repr(value)[:40]


_RECORD_COLUMNS = ("id", "seq", "prev_hash", "hash", "at", "actor", "event", "subject", "detail")
# Read as text by ``verify``; the ones that may be NULL; ``at`` is also a datetime (PostgreSQL).
_TEXT_COLUMNS = ("at", "actor", "event", "subject", "detail", "prev_hash", "hash", "request_id")
_NULLABLE = frozenset({"prev_hash", "hash", "request_id"})


def _verify_queries(sqlite: bool) -> tuple[sa.Select[Any], sa.Select[Any], sa.Select[Any]]:
    """The chained records in seq order, the unchained ones (id and time) and the seals."""
    records = (
        sa.select(*(_stored(_AUDIT.c[name], sqlite) for name in (*_RECORD_COLUMNS, "request_id")))
        .where(_AUDIT.c.seq.is_not(None))
        .order_by(_AUDIT.c.seq)
    )
    unsealed = sa.select(_AUDIT.c.id, _stored(_AUDIT.c.at, sqlite)).where(_AUDIT.c.seq.is_(None))
    seals = sa.select(
        _SEALS.c.id,
        _SEALS.c.seq,
        *(
            _stored(_SEALS.c[name], sqlite)
            for name in ("head_hash", "signed_at", "signer_cert_pem", "signature")
        ),
    ).order_by(_SEALS.c.seq, _SEALS.c.id)
    return records, unsealed.order_by(_AUDIT.c.id), seals


def stored_anchors(ctx: Context) -> Anchors:
    """The mesh's roots as this database stores them, in every state (a seal made before a
    root rotation was signed under the root of its time)."""
    from ca.authority import MESH  # the audit module is imported by ca.authority
    from ca.store.models import CaRow

    with Session(ctx.engine) as session:
        pems = session.exec(
            select(CaRow.cert_pem).where(CaRow.authority == MESH, CaRow.role == "root")
        ).all()
    return Anchors(
        tuple(x509.load_pem_x509_certificate(pem.encode()) for pem in pems),
        "the mesh roots stored in this database (the one being verified: "
        "give a bundle for anchors kept elsewhere)",
    )


def _mesh_cas(ctx: Context) -> list[SealCa]:
    from ca.authority import MESH
    from ca.store.models import CaRow

    with Session(ctx.engine) as session:
        rows = session.exec(select(CaRow).where(CaRow.authority == MESH)).all()
    return [
        SealCa(
            row.role,
            x509.load_pem_x509_certificate(row.cert_pem.encode()),
            row.revoked_at,
            row.revocation_reason,
        )
        for row in rows
    ]


_REPORT_EVERY = 1000  # records verified between two progress reports: a report costs more


def _span(ids: list[int]) -> str:
    return f"id {ids[0]}" if len(ids) == 1 else f"ids {ids[0]}..{ids[-1]} ({len(ids)} records)"


@dataclass(slots=True)
class _Chain:
    """What the records tell: each break, and what the seals are checked against."""

    problems: list[str]
    rows: list[Mapping[str, Any]]  # the records with a sound seq, in seq order
    hashes_by_seq: dict[int, str]
    times_by_seq: dict[int, dt.datetime]  # the records that verified
    # For each sealed seq: the newest time of the records up to it (a seal is made after them).
    newest_by_seq: dict[int, dt.datetime]
    # Serial numbers of mesh intermediates an ``init --force`` replaced (``ca.audit_seals``).
    former: set[int]


def verify(
    ctx: Context,
    *,
    anchors: Anchors | None = None,
    heads: tuple[tuple[int, str], ...] = (),
    progress: Progress | None = None,
) -> Verification:
    """Recompute the chain from the first record; report every break, first one first.

    Seals count only if signed by one of the mesh authority's own intermediates, chaining to
    ``anchors`` (by default the mesh roots stored in the database), valid and not revoked when
    it signed (``ca.audit_seals``). ``heads``: (seq, hash) of signed heads witnessed elsewhere
    (the sealer logs each): a chain cut short before one of them, and re-signed, is consistent
    in the database alone.

    Records left behind the chain are reported too (``LATE``): the sealer chains every record
    within seconds of the records and signature after it, so one unchained or unsigned while
    the chain went on for more than ``LATE`` had its chain or seal removed.

    ``progress`` counts the records and seals checked, out of all of them once they are read."""
    for seq, _head in heads:
        if seq < 1:
            raise InvalidInput(
                f"a witnessed head has a seq of at least 1, the chain's first record: got {seq}"
            )
    report(progress, 0, None)
    anchors = anchors if anchors is not None else stored_anchors(ctx)
    cas = _mesh_cas(ctx)
    now = ctx.clock.now()
    records, unsealed_rows, seal_rows = _verify_queries(ctx.engine.dialect.name == "sqlite")
    with ctx.reads.connect() as connection:
        rows = connection.execute(records).mappings().all()
        unsealed = connection.execute(unsealed_rows).all()
        seals = connection.execute(seal_rows).all()
    total = len(rows) + len(seals)
    sealed_seqs = {seal[1] for seal in seals}
    chain = _chain(rows, sealed_seqs, progress, total)
    signers = Signers(anchors, cas, chain.former)
    problems = chain.problems
    signed: tuple[int, dt.datetime] | None = None  # the newest seal that counts
    last_signed_at: dt.datetime | None = None  # the newest seal's time, verified or not
    not_counted = 0
    unproven: _Unproven | None = None  # the newest seal that does not count
    for done, seal in enumerate(seals):
        report(progress, len(rows) + done, total)
        seal_seq, signed_at = seal[1], _stored_time(seal[3])
        if signed_at is not None and (last_signed_at is None or signed_at > last_signed_at):
            last_signed_at = signed_at
        verdict = _check_seal(seal, signed_at, chain, signers)
        if isinstance(verdict, str):
            problems.append(verdict)
        elif verdict is not None:
            not_counted += 1
            if unproven is None or seal_seq >= unproven.seq:
                unproven = verdict
        elif signed is None or seal_seq >= signed[0]:
            assert signed_at is not None  # a seal without a sound time is a problem
            signed = (seal_seq, signed_at)
    if (
        unproven is not None
        and (signed is None or unproven.seq > signed[0])
        and unproven.revoked_at < now - LATE
    ):
        problems.append(
            f"seal at seq {unproven.seq}: {unproven.why}; no seal by another key covers the "
            f"records up to it, more than {int(LATE.total_seconds() // 60)} minutes after the "
            "revocation: they rest on that key alone ('trellis audit seal' signs the head with "
            "the active intermediate)"
        )
    for seq, head_hash in heads:
        if chain.hashes_by_seq.get(seq) != head_hash:
            problems.append(
                f"the chain does not hold the witnessed head seq {seq} ({head_hash[:16]}...): "
                "records were removed or rewritten up to it"
            )
    signed_up_to = signed[0] if signed else 0
    unsigned = sum(1 for row in chain.rows if row["seq"] > signed_up_to)
    problems += _left_behind(
        ctx,
        chain.rows,
        chain.times_by_seq,
        unsealed,
        signed,
        last_signed_at,
        now,
        bool(seals),
        bool(cas),
    )
    report(progress, total, total)
    return Verification(
        not problems,
        len(rows),
        len(unsealed),
        len(seals),
        tuple(problems),
        unsigned,
        anchors.source,
        not_counted,
    )


def _readable(row: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The record with its text columns as text (None where one is not), and the name of the
    first damaged column, if any."""
    record = dict(row)
    damaged = None
    for name in _TEXT_COLUMNS:
        value = record[name]
        if (value is None and name in _NULLABLE) or isinstance(value, dt.datetime):
            continue
        text = record[name] = _text(value)
        if text is None and damaged is None:
            damaged = name
    return record, damaged


def _chain(rows: Any, sealed_seqs: set[Any], progress: Progress | None, total: int) -> _Chain:
    """The records' pass of ``verify``: every hash recomputed, in seq order."""
    from ca.authority import MESH

    chain = _Chain([], [], {}, {}, {}, set())
    problems = chain.problems
    previous, expected_seq = GENESIS, 1
    newest: dt.datetime | None = None
    for done, row in enumerate(rows):
        if done % _REPORT_EVERY == 0:
            report(progress, done, total)
        seq = row["seq"]
        if type(seq) is not int:  # SQLite keeps a text or a real in an integer column
            problems.append(f"record id {row['id']}: its seq is damaged ({_shown(seq)})")
            continue
        chain.rows.append(row)
        record, damaged = _readable(row)
        where = f"record seq {seq} (id {row['id']}, {record['event']})"
        if seq != expected_seq:
            problems.append(f"records seq {expected_seq}..{seq - 1} are missing before {where}")
        if record["prev_hash"] != previous:
            problems.append(f"{where}: does not follow the record before it (reordered or deleted)")
        at = _stored_time(record["at"])
        if at is not None and (newest is None or at > newest):
            newest = at
        if at is None:
            problems.append(
                f"{where}: its time is damaged ({_shown(_text(row['at']) or row['at'])})"
            )
        elif damaged is not None:
            problems.append(f"{where}: its {damaged} is damaged ({_shown(row[damaged])})")
        elif record["hash"] != _digest({**record, "at": at}, seq, record["prev_hash"] or GENESIS):
            problems.append(f"{where}: its content does not match its hash (edited)")
        else:
            chain.times_by_seq[seq] = at
            if record["event"] == "authority.reinitialised" and record["subject"] == MESH:
                chain.former |= _replaced_intermediates(record["detail"])
        if seq in sealed_seqs and newest is not None:
            chain.newest_by_seq[seq] = newest
        previous, expected_seq = record["hash"] or "", seq + 1
        chain.hashes_by_seq[seq] = record["hash"] or ""
    return chain


def _replaced_intermediates(detail: str) -> set[int]:
    """The serials of the intermediates an ``init --force`` forgot (``ca.authority._wipe``
    records them as ``intermediate/<hex>``): their seals still count."""
    try:
        old = json.loads(detail).get("old_cas") or []
        return {
            int(name.removeprefix("intermediate/"), 16)
            for name in old
            if isinstance(name, str) and name.startswith("intermediate/")
        }
    except (ValueError, AttributeError, TypeError):
        return set()


@dataclass(frozen=True, slots=True)
class _Unproven:
    """A seal that does not count, though nothing in it is wrong: its signer was revoked
    since, and its time may be anyone's (``ca.audit_seals``)."""

    seq: int
    why: str
    revoked_at: dt.datetime


def _check_seal(
    seal: Any, signed_at: dt.datetime | None, chain: _Chain, signers: Signers
) -> str | _Unproven | None:
    """One seal: a problem, an ``_Unproven`` one, or None for one that counts."""
    from ca.authority import MESH

    seal_id, seq, head_raw, signed_raw, pem, signature = seal
    if type(seq) is not int:
        return f"seal id {seal_id}: its seq is damaged ({_shown(seq)})"
    where = f"seal at seq {seq}"
    head = _text(head_raw)
    try:
        cert = x509.load_pem_x509_certificate(pem if isinstance(pem, bytes) else pem.encode())
    except (ValueError, TypeError, AttributeError):
        return f"{where}: its signer certificate is damaged"
    if signed_at is None:
        return f"{where}: its time is damaged ({_shown(_text(signed_raw) or signed_raw)})"
    if not isinstance(signature, bytes):
        return f"{where}: its signature is damaged ({_shown(signature)})"
    if head is None or chain.hashes_by_seq.get(seq) != head:
        return f"{where}: the chain no longer ends in the sealed head"
    if (untrusted := signers.problem(cert, signed_at)) is not None:
        return f"{where}: {untrusted}"
    version = signed_as(cert, signature, authority=MESH, seq=seq, head=head, signed_at=signed_at)
    if version is None:
        return f"{where}: the CA signature does not verify"
    revoked = signers.revoked(cert)
    # After its signer's revocation: broken. In the same second it is not: times are whole
    # seconds, and the sealer of a busy replica signs with the intermediate it read as active
    # while an emergency revocation on another was committing (such a seal is not counted).
    if revoked is not None and signed_at > revoked.at:
        return (
            f"{where}: its signer was revoked ({revoked.reason}) at {revoked.at.isoformat()}, "
            f"before the seal's time {signed_at.isoformat()}"
        )
    newest = chain.newest_by_seq.get(seq)
    if newest is not None and signed_at < newest:
        return (
            f"{where}: dated {signed_at.isoformat()}, before a record it covers "
            f"({newest.isoformat()}): the sealer signs after the records it chains"
        )
    if revoked is None or (version == 2 and revoked.key_kept and signed_at < revoked.at):
        return None
    if version == 1:
        why = "its time is not signed (a seal made before this release)"
    elif signed_at == revoked.at:
        why = "it was signed in the second of the revocation, which of the two came first unknown"
    else:
        why = "the key may be stolen, and signs any time"
    return _Unproven(
        seq,
        f"its signer was revoked ({revoked.reason}) at {revoked.at.isoformat()} and {why}",
        revoked.at,
    )


def _left_behind(
    ctx: Context,
    rows: Any,
    times_by_seq: dict[int, dt.datetime],
    unsealed: Any,
    signed: tuple[int, dt.datetime] | None,
    last_signed_at: dt.datetime | None,
    now: dt.datetime,
    any_seals: bool,
    has_mesh: bool,
) -> list[str]:
    """Records the chain or its signatures went past (see ``LATE``): an honest sealer chains
    every settled record in id order and, when it signs, covers all it chained. Not
    detectable here: the newest records and their seals removed together (a tail cut short),
    or every seal and chain column removed (then the trail looks like one never sealed, as
    that of a CLI-only installation is): for those, ``heads`` witnessed elsewhere."""
    problems: list[str] = []
    minutes = f"{int(LATE.total_seconds() // 60)} minutes"
    head_id = max((row["id"] for row in rows), default=None)
    head_at = times_by_seq.get(rows[-1]["seq"]) if rows else None
    newest = max((at for at in (head_at, last_signed_at) if at), default=None)
    damaged, before, late = [], [], []
    for record_id, raw in unsealed:
        at = _stored_time(raw)
        if at is None:
            damaged.append(record_id)
        elif (
            head_id is not None and record_id < head_id and ctx.engine.dialect.name != "postgresql"
        ):
            before.append(record_id)
        elif newest is not None and at < newest - LATE:
            late.append(record_id)
    if damaged:
        problems.append(f"unsealed record {_span(damaged)}: its time is damaged")
    if before:
        problems.append(
            f"record {_span(before)} not chained, though records after it are: "
            "its chain was removed (a reset chain)"
        )
    if late:
        problems.append(
            f"record {_span(late)} not chained, though the chain went on more than {minutes} "
            "past it: its chain was removed"
        )
    unsigned = [row for row in rows if signed is None or row["seq"] > signed[0]]
    if not unsigned:
        return problems
    seqs = [row["seq"] for row in unsigned]
    times = [times_by_seq[seq] for seq in seqs if seq in times_by_seq]
    span = f"records seq {seqs[0]}..{seqs[-1]}" if len(seqs) > 1 else f"record seq {seqs[0]}"
    if signed is not None and times and min(times) < signed[1] - LATE:
        problems.append(
            f"{span} chained after the last signed head (seq {signed[0]}, "
            f"{signed[1].isoformat()}) though older than it by more than {minutes}: "
            "a seal covering them was removed"
        )
    elif signed is not None and times and max(times) > signed[1] + LATE:
        problems.append(
            f"{span} chained but not signed, more than {minutes} after the last signed head "
            f"(seq {signed[0]}, {signed[1].isoformat()}): a seal was removed, or the head "
            "could not be signed since (the audit-seal job fails saying why; "
            "'trellis audit seal' signs it)"
        )
    elif signed is None and not any_seals and times and min(times) < now - LATE and has_mesh:
        # Without a mesh CA (a gateway-only installation) the sealer chains and cannot sign.
        problems.append(
            f"{span} chained but no signed head is left, the oldest more than {minutes} "
            "ago: the seals were removed, or the head was never signed (the audit-seal "
            "job fails saying why; 'trellis audit seal' signs it)"
        )
    return problems


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    seq: int | None
    at: dt.datetime
    actor: str
    event: str
    subject: str
    detail: dict[str, Any]
    request_id: str | None


def list_audit(
    ctx: Context,
    *,
    since: dt.datetime | None = None,
    event: str | None = None,
    limit: int = 100,
    after: int | None = None,
) -> list[AuditEntry]:
    """Newest first; ``after``: only records older than that record id, where a listing that
    ended with it goes on. A record the database holds damaged (a time or detail that does not
    parse) is a damaged store: ``Unavailable``, naming the record, not a traceback."""
    _check_limit(limit)
    return _records(ctx, since, event, limit, after)


@dataclass(frozen=True, slots=True)
class AuditPage:
    """One page of the trail, and the record id to continue after (None on the last page)."""

    items: list[AuditEntry]
    next_after: int | None


def audit_page(
    ctx: Context,
    *,
    since: dt.datetime | None = None,
    event: str | None = None,
    limit: int = 100,
    after: int | None = None,
) -> AuditPage:
    """``list_audit`` for a reader who pages (``trellis audit list``), as
    ``ca.certs.certificate_page``: one record more than asked tells whether another page
    exists."""
    _check_limit(limit)
    items = _records(ctx, since, event, limit + 1, after)
    more, items = len(items) > limit, items[:limit]
    return AuditPage(items, items[-1].id if more else None)


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_LIST:  # SQLite reads a negative LIMIT as none at all
        raise InvalidInput(f"limit must be between 1 and {MAX_LIST}")


def _records(
    ctx: Context,
    since: dt.datetime | None,
    event: str | None,
    limit: int,
    after: int | None,
) -> list[AuditEntry]:
    query = sa.select(*(_raw(_AUDIT.c[name]) for name in _RECORD_COLUMNS), _AUDIT.c.request_id)
    if since is not None:
        query = query.where(_AUDIT.c.at >= since)
    if event is not None:
        # A prefix taken literally (``--event``, docs/cli.md): ``%`` and ``_`` are no wildcards.
        query = query.where(_AUDIT.c.event.startswith(event, autoescape=True))
    if after is not None:
        # Ids start at 1, and a number past 64 bits was SQLite's OverflowError, a traceback.
        if not 1 <= after < 2**63:
            raise InvalidInput(f"no audit record has the id {after} to page after")
        query = query.where(_AUDIT.c.id < after)
    with ctx.reads.connect() as connection:
        rows = connection.execute(query.order_by(_AUDIT.c.id.desc()).limit(limit)).mappings()
        return [_entry(row) for row in rows]


def _entry(row: Any) -> AuditEntry:
    at = _time_of(row["at"])
    if at is None:
        raise Unavailable(
            f"the audit trail is damaged: record id {row['id']} has the time "
            f"{str(row['at'])[:40]!r}"
        )
    try:
        detail = json.loads(row["detail"])
    except ValueError:
        raise Unavailable(
            f"the audit trail is damaged: the detail of record id {row['id']} is not JSON"
        ) from None
    return AuditEntry(
        id=row["id"],
        seq=row["seq"],
        at=at,
        actor=row["actor"],
        event=row["event"],
        subject=row["subject"],
        detail=detail if isinstance(detail, dict) else {"value": detail},
        request_id=row["request_id"],
    )
