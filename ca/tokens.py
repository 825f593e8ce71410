"""Bearer tokens: admin tokens (manage Trellis) and join tokens (bootstrap one workload).

Only a SHA-256 of each secret is stored: the secrets carry 256 random bits, so a plain hash is
enough to make a leaked database useless for authentication (no password-hashing work factor is
needed for high-entropy secrets).
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from ca import audit
from ca.config import Context
from ca.durations import Ttl
from ca.errors import AuthenticationFailed, Conflict, InvalidInput, NotFound, PermissionDenied
from ca.store import locks
from ca.store.batch import Spend
from ca.store.core import table
from ca.store.models import EntryRow, TokenRow
from ca.text import free_text

__all__ = [
    "AdminPrincipal",
    "TokenInfo",
    "TokenKind",
    "authenticate_admin",
    "check_live",
    "create_admin_token",
    "create_join_token",
    "hash_secret",
    "join_token_use",
    "list_tokens",
    "revoke_token",
    "valid_secret",
]

DEFAULT_JOIN_TTL = Ttl(3600)
MAX_JOIN_USES = 1000

# Built once (see ca.store.core): every issuance with a join token runs these.
_TOKEN = table(TokenRow)
_FIND = sa.select(
    _TOKEN.c.id, _TOKEN.c.kind, _TOKEN.c.uses_remaining, _TOKEN.c.expires_at, _TOKEN.c.revoked_at
).where(_TOKEN.c.secret_hash == sa.bindparam("secret_hash"))
_USES = sa.bindparam("uses", type_=sa.Integer)
_SPEND = (
    sa.update(_TOKEN)
    .where(
        _TOKEN.c.id == sa.bindparam("key"),
        _TOKEN.c.uses_remaining >= _USES,
        _TOKEN.c.revoked_at.is_(None),
        sa.or_(_TOKEN.c.expires_at.is_(None), _TOKEN.c.expires_at > sa.bindparam("now")),
    )
    .values(uses_remaining=_TOKEN.c.uses_remaining - _USES)
)


class TokenKind(enum.Enum):
    ADMIN = "admin"
    JOIN = "join"

    @property
    def prefix(self) -> str:
        return {"admin": "trellis-admin-", "join": "trellis-join-"}[self.value]


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A token as it may be shown: never the secret."""

    id: str
    kind: TokenKind
    entry_id: str | None
    uses_remaining: int | None
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    created_at: dt.datetime
    description: str


@dataclass(frozen=True, slots=True)
class AdminPrincipal:
    token_id: str

    def __str__(self) -> str:
        return f"admin-token:{self.token_id}"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _info(row: TokenRow) -> TokenInfo:
    return TokenInfo(
        id=row.id,
        kind=TokenKind(row.kind),
        entry_id=row.entry_id,
        uses_remaining=row.uses_remaining,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        created_at=row.created_at,
        description=row.description,
    )


def _create(ctx: Context, session: Session, row: TokenRow, actor: str) -> tuple[TokenInfo, str]:
    secret = TokenKind(row.kind).prefix + secrets.token_urlsafe(32)
    row.secret_hash = hash_secret(secret)
    session.add(row)
    audit.record(
        session,
        "token.created",
        f"token:{row.id}",
        actor=actor,
        at=row.created_at,
        detail={"kind": row.kind, "entry_id": row.entry_id, "uses": row.uses_remaining},
    )
    session.commit()
    session.refresh(row)
    return _info(row), secret


def create_admin_token(
    ctx: Context, description: str = "", *, ttl: Ttl | None = None, actor: str = "local"
) -> tuple[TokenInfo, str]:
    """Admin tokens never expire unless given a TTL (the one `init` writes is revoked by hand)."""
    description = free_text(description, "a token description")
    now = ctx.clock.now()
    with Session(ctx.engine) as session:
        row = TokenRow(
            id=secrets.token_hex(8),
            kind=TokenKind.ADMIN.value,
            secret_hash="",
            expires_at=now + ttl.delta if ttl is not None else None,
            created_at=now,
            description=description,
        )
        return _create(ctx, session, row, actor)


def create_join_token(
    ctx: Context,
    entry_id: str,
    *,
    uses: int = 1,
    ttl: Ttl = DEFAULT_JOIN_TTL,
    description: str = "",
    actor: str = "local",
) -> tuple[TokenInfo, str]:
    description = free_text(description, "a token description")
    if not 1 <= uses <= MAX_JOIN_USES:
        raise InvalidInput(f"a join token allows 1 to {MAX_JOIN_USES} uses")
    if ttl.seconds > 30 * 86400:
        raise InvalidInput("a join token may live at most 30d")
    try:  # as ca.entries reads an entry id: any case, braces or not
        entry_id = str(uuid.UUID(entry_id))
    except ValueError:
        raise NotFound(f"registration entry {entry_id[:40]!r} does not exist") from None
    with Session(ctx.engine) as session:
        # Before the entry is read: a deletion under way commits first (this is then a 404) or
        # waits for the token and deletes it with the entry (ca.store.locks). Checked and then
        # inserted without it, the token met a deleted entry's foreign key (a 500 here, or the
        # deletion's on PostgreSQL, which then deleted nothing).
        connection = session.connection()
        locks.begin_write(connection)
        locks.claim(connection, [locks.entry_name(entry_id)], shared=True)
        if session.get(EntryRow, entry_id) is None:
            raise NotFound(f"registration entry {entry_id[:40]!r} does not exist")
        now = ctx.clock.now()
        row = TokenRow(
            id=secrets.token_hex(8),
            kind=TokenKind.JOIN.value,
            secret_hash="",
            entry_id=entry_id,
            uses_remaining=uses,
            expires_at=now + ttl.delta,
            created_at=now,
            description=description,
        )
        return _create(ctx, session, row, actor)


def check_live(found: Mapping[Any, Any] | None, now: dt.datetime) -> Mapping[Any, Any]:
    """The checks every presented secret passes (one message for unknown and revoked secrets,
    so a caller cannot probe which tokens exist)."""
    if found is None or found["revoked_at"] is not None:
        raise AuthenticationFailed("missing or invalid bearer token")
    if found["expires_at"] is not None and found["expires_at"] <= now:
        raise AuthenticationFailed("the token has expired")
    if found["uses_remaining"] is not None and found["uses_remaining"] <= 0:
        raise AuthenticationFailed("the join token has already been used")
    return found


def valid_secret(secret: str) -> str:
    if not secret or len(secret) > 200:
        raise AuthenticationFailed("missing or invalid bearer token")
    return hash_secret(secret)


def authenticate_admin(ctx: Context, secret: str) -> AdminPrincipal:
    digest = valid_secret(secret)
    with ctx.reads.connect() as connection:
        found = connection.execute(_FIND, {"secret_hash": digest}).mappings().first()
    token = check_live(found, ctx.clock.now())
    if token["kind"] != TokenKind.ADMIN.value:
        raise PermissionDenied("this endpoint needs an admin token")
    return AdminPrincipal(token["id"])


def join_token_use(token_id: str, now: dt.datetime) -> Spend:
    """One use of the join token, spent in the issuing transaction with the batch's other uses
    (``ca.store.batch.Spend``). The conditional UPDATE makes concurrent redemptions of a
    single-use token race safely: only one of them changes a row.

    A use has no audit record of its own: the record of the certificate it paid for names the
    token as its actor (``join-token:<id>``) and names the serial, which a separate "token.used"
    record did not. Dropping that record saved a row and its chaining per issuance
    (docs/benchmarks.md, change 52)."""
    refusal = AuthenticationFailed("the join token has already been used or has expired")
    return Spend(_SPEND, token_id, now, refusal)


def list_tokens(ctx: Context) -> list[TokenInfo]:
    with Session(ctx.engine) as session:
        rows = session.exec(
            select(TokenRow).order_by(col(TokenRow.created_at), col(TokenRow.id))
        ).all()
    return [_info(row) for row in rows]


def revoke_token(ctx: Context, token_id: str, *, actor: str = "local") -> TokenInfo:
    """Revoke once: a second revocation, even one made at the same moment, is a ``Conflict``.
    The row is read with the write lock taken (SQLite) or locked (PostgreSQL): read before, two
    revocations both found it live, and both were answered 200 and recorded."""
    with Session(ctx.engine) as session:
        locks.begin_write(session.connection())
        row = session.get(TokenRow, token_id, with_for_update=True)
        if row is None:
            raise NotFound(f"token {token_id[:40]!r} does not exist")
        if row.revoked_at is not None:  # as for certificates: the first revocation stands
            raise Conflict(f"token {row.id} is already revoked")
        row.revoked_at = ctx.clock.now()
        session.add(row)
        audit.record(session, "token.revoked", f"token:{row.id}", actor=actor, at=row.revoked_at)
        session.commit()
        session.refresh(row)
        return _info(row)
