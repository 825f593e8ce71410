"""How an issuance and a write that withdraws what it relies on take turns, on both databases.

An issuance relies on rows it read when it authenticated: the certificate a renewal renews
(still active), the registration entry it issues under (still there, still enabled). Its batch
checks them again inside the transaction that records the certificate
(``ca.store.batch.Need``); a revocation, or an entry's deletion or disabling, checks and writes
inside its own. Whichever commits first, the other must see it (docs/revocation.md: a revoked
SVID cannot be renewed, a disabled entry gets nothing, a revocation cannot be half-done), and
neither database gives that to a check followed by a write:

- SQLite: pysqlite begins a transaction only at the first INSERT, UPDATE or DELETE, so the
  reads before it ran outside any transaction: each side could read, let the other commit, and
  then write what its read no longer justified. Both begin with ``BEGIN IMMEDIATE``
  (``begin_write``): the database's one write lock is taken before the first read, and one
  waits for the other to commit before it reads anything.
- PostgreSQL: a plain read does not wait for a row another transaction is changing, and
  ``SELECT ... FOR UPDATE`` cannot lock a row committed after it ran (a certificate a renewal
  of the identity being revoked was adding). Both sides take transaction-scoped advisory locks
  on the names of what is at stake (``claim``: ``identity_name``, ``certificate_name``,
  ``entry_name``) before they read: the withdrawing write exclusively, a batch shared, all its
  units' names in one statement. Under READ COMMITTED each later statement sees what the other
  side committed while this one waited. The locks live in memory (no row is written, as
  ``FOR SHARE`` would) and end with the transaction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import sqlalchemy as sa

__all__ = [
    "authority_name",
    "begin_write",
    "certificate_name",
    "claim",
    "entry_name",
    "identity_name",
    "withdrawing",
]

_SHARED = sa.text("SELECT pg_advisory_xact_lock_shared(k) FROM unnest(CAST(:keys AS bigint[])) k")
_EXCLUSIVE = sa.text("SELECT pg_advisory_xact_lock(k) FROM unnest(CAST(:keys AS bigint[])) k")


def identity_name(identity: str) -> str:
    """What ``ca.certs.revoke_identity`` withdraws, and a renewal of one of its certificates
    relies on."""
    return f"identity:{identity}"


def certificate_name(serial_hex: str) -> str:
    return f"certificate:{serial_hex}"


def entry_name(entry_id: str) -> str:
    return f"entry:{entry_id}"


def authority_name(name: str) -> str:
    """What the inits of authority ``name`` take turns on (``ca.authority.initialising``)."""
    return f"authority:{name}"


def _key(name: str) -> int:
    """A name's advisory lock key: 64 bits of its hash (two names sharing one only wait for
    each other; the migration lock's constant is one key among 2^64)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), signed=True)


def begin_write(connection: sa.Connection) -> None:
    """On SQLite, the transaction ``connection`` has just begun takes the write lock now,
    before its first read (see the module docstring). Its first statement: pysqlite has
    issued no BEGIN of its own yet. PostgreSQL locks what it must with ``claim``."""
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def withdrawing(connection: sa.Connection, name: str) -> None:
    """The first statements of a transaction that withdraws ``name`` (revokes it, deletes or
    disables it): the write lock on SQLite, ``name`` claimed exclusively on PostgreSQL. Every
    check it makes after this sees the issuances that relied on ``name`` committed, and none
    commits until it has."""
    begin_write(connection)
    claim(connection, [name], shared=False)


def claim(connection: sa.Connection, names: Iterable[str], *, shared: bool) -> None:
    """On PostgreSQL, the advisory locks on ``names`` until the transaction ends, in key order
    (two transactions claiming several never wait for each other in a cycle). Nothing on
    SQLite, where ``begin_write`` already serialises the writers."""
    if connection.dialect.name != "postgresql":
        return
    keys = sorted({_key(name) for name in names})
    if keys:
        connection.execute(_SHARED if shared else _EXCLUSIVE, {"keys": keys})
