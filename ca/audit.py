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
signatures, naming the first record that was edited, deleted or reordered.

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
import datetime as dt
import hashlib
import json
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import Any, cast

import sqlalchemy as sa
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from sqlmodel import Session, col, select

from ca.config import Context
from ca.errors import InternalError, InvalidInput, NotInitialised, TrellisError, Unavailable
from ca.keys import PrivateKey
from ca.store.batch import Rows, Work
from ca.store.core import insert_now, prepared, table
from ca.store.models_audit import AuditRow, AuditSealRow

__all__ = [
    "INSERT",
    "AuditEntry",
    "Verification",
    "entry",
    "list_audit",
    "record",
    "seal",
    "verify",
]

SETTLE = dt.timedelta(seconds=5)
MAX_LIST = 10_000  # records a listing returns at most
SIGN_EVERY = dt.timedelta(seconds=10)
GENESIS = "0" * 64
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
    """One record's row, for ``INSERT`` (what ``record`` executes; group commits batch it)."""
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


def _sign(key: PrivateKey, data: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(data)


def _check_signature(cert: x509.Certificate, signature: bytes, data: bytes) -> bool:
    public = cert.public_key()
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, data)
        else:
            return False
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Sealed:
    records: int
    head_seq: int | None


_AUDIT, _SEALS = table(AuditRow), table(AuditSealRow)
_HEAD = (
    sa.select(_AUDIT.c.seq, _AUDIT.c.hash)
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


def seal(
    ctx: Context,
    *,
    settle: dt.timedelta | None = None,
    sign_every: dt.timedelta | None = None,
    pause: bool = False,
) -> Sealed:
    """Chain every settled, unsealed record and sign the new head (idempotent; run by one
    replica at a time). ``sign_every``: sign only if the last signature is at least that old
    (the job passes ``SIGN_EVERY``); by default, whenever the head is not signed yet.
    ``pause``: sleep now and then, so that the process's other threads get the GIL (see
    ``PAUSE_EVERY``); a server's job seals on its event loop instead (``seal_on_loop``).

    Records are chained in chunks, each written in a transaction of its own
    (``GroupCommit.run_apart``: beside the batches of requests on PostgreSQL, through the one
    write lock on SQLite); the new head is signed with the last chunk. Only one sealer runs at
    a time (the scheduler's lock), so the head read before a chunk is still the head when it is
    written; ``seq`` is unique and ``_CHAIN`` only touches unsealed rows, so a second sealer
    could fail but never fork the chain."""
    steps = _sealing(ctx, settle, sign_every)
    signing = _Signing(ctx)
    step = _advance(steps, None)
    while not isinstance(step, Sealed):
        answer: Any = None
        if isinstance(step, _Read):
            answer = _read(ctx, step.query)
        elif isinstance(step, _Write):
            ctx.writes.run_apart(step.work)
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
    PostgreSQL +11.5 % (docs/benchmarks.md, change 49)."""
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
    seq = head[0] if head and head[0] is not None else 0
    previous = head[1] if head and head[1] else GENESIS
    signed_seq = last_seal[0] if last_seal else 0
    sign = sign_every is None or last_seal is None or now - last_seal[1] >= sign_every
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
            seq += 1
            digest = _digest(row, seq, previous)
            chained.append(
                {"row_id": row["id"], "new_seq": seq, "new_prev": previous, "new_hash": digest}
            )
            previous = digest
        if not chained:
            break
        signature = (yield _Sign((seq, previous, now))) if last and sign else None
        yield _Write(_chunk_writer(chained, signature))
        total += len(chained)
        if last:
            break
    if not total and sign and seq > signed_seq:  # chained by an earlier run, not signed yet
        signature = yield _Sign((seq, previous, now))
        if signature is not None:
            yield _Write(_chunk_writer([], signature))
    return Sealed(total, seq if total else None)


def _chunk_writer(chained: list[dict[str, Any]], signature: dict[str, Any] | None) -> Work:
    def write(connection: sa.Connection, _rows: Rows) -> None:
        if chained:
            prepared(_CHAIN).executemany(connection, chained)
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
    """The signed seal over ``head``, or None when there is no mesh CA to sign with yet."""
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
        "signature": _sign(issuer.signer.private_key, head.encode()),
    }


@dataclass(frozen=True, slots=True)
class Verification:
    ok: bool
    sealed: int
    unsealed: int
    seals_checked: int
    problems: tuple[str, ...]
    unsigned: int = 0  # chained after the last signed head


def verify(ctx: Context) -> Verification:
    """Recompute the chain from the first record; report every break, first one first."""
    problems: list[str] = []
    with Session(ctx.engine) as session:
        rows = session.exec(
            select(AuditRow).where(col(AuditRow.seq).is_not(None)).order_by(col(AuditRow.seq))
        ).all()
        unsealed = session.execute(
            sa.select(sa.func.count()).select_from(AuditRow).where(col(AuditRow.seq).is_(None))
        ).scalar_one()
        seals = session.exec(select(AuditSealRow).order_by(col(AuditSealRow.seq))).all()
    previous, expected_seq = GENESIS, 1
    hashes_by_seq: dict[int, str] = {}
    for row in rows:
        assert row.seq is not None
        where = f"record seq {row.seq} (id {row.id}, {row.event})"
        if row.seq != expected_seq:
            problems.append(f"records seq {expected_seq}..{row.seq - 1} are missing before {where}")
        if row.prev_hash != previous:
            problems.append(f"{where}: does not follow the record before it (reordered or deleted)")
        if row.hash != _digest(vars(row), row.seq, row.prev_hash or GENESIS):
            problems.append(f"{where}: its content does not match its hash (edited)")
        previous, expected_seq = row.hash or "", row.seq + 1
        hashes_by_seq[row.seq] = row.hash or ""
    for seal_row in seals:
        cert = x509.load_pem_x509_certificate(seal_row.signer_cert_pem.encode())
        if hashes_by_seq.get(seal_row.seq) != seal_row.head_hash:
            problems.append(
                f"seal at seq {seal_row.seq}: the chain no longer ends in the sealed head"
            )
        elif not _check_signature(cert, seal_row.signature, seal_row.head_hash.encode()):
            problems.append(f"seal at seq {seal_row.seq}: the CA signature does not verify")
    signed_up_to = max((seal_row.seq for seal_row in seals), default=0)
    unsigned = sum(1 for row in rows if row.seq is not None and row.seq > signed_up_to)
    return Verification(
        not problems, len(rows), int(unsealed), len(seals), tuple(problems), unsigned
    )


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
    ctx: Context, *, since: dt.datetime | None = None, event: str | None = None, limit: int = 100
) -> list[AuditEntry]:
    if not 1 <= limit <= MAX_LIST:  # SQLite reads a negative LIMIT as none at all
        raise InvalidInput(f"limit must be between 1 and {MAX_LIST}")
    query = select(AuditRow)
    if since is not None:
        query = query.where(col(AuditRow.at) >= since)
    if event is not None:
        query = query.where(col(AuditRow.event).startswith(event))
    with Session(ctx.engine) as session:
        rows = session.exec(query.order_by(col(AuditRow.id).desc()).limit(limit)).all()
    return [
        AuditEntry(
            id=row.id or 0,
            seq=row.seq,
            at=row.at,
            actor=row.actor,
            event=row.event,
            subject=row.subject,
            detail=json.loads(row.detail),
            request_id=row.request_id,
        )
        for row in rows
    ]
