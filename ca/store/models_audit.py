"""The audit trail: an append-only log, hash-chained after the fact by the sealer."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from ca.store.models import UtcDateTime

__all__ = ["AuditRow", "AuditSealRow"]


def _time(*, nullable: bool = False, index: bool = False) -> Any:
    return Field(sa_column=sa.Column(UtcDateTime(), nullable=nullable, index=index))


class AuditRow(SQLModel, table=True):
    """One security-relevant event, written in the transaction of the change it records.

    ``seq``, ``prev_hash`` and ``hash`` are filled by the sealer (``ca.audit.seal``) once the
    record has settled, so writers never serialise on the chain's head.
    """

    __tablename__ = "audit_log"
    __table_args__ = (
        # What the sealer asks for: the oldest unsealed records. Without this index
        # PostgreSQL walked every sealed record before the first unsealed one, once per chunk:
        # tens of seconds of CPU for one run of the sealer under load, and second-long
        # issuance stalls beside it (migration 0013, docs/benchmarks.md). SQLite finds them
        # through the unique index on seq (NULLs first) and needs none.
        sa.Index("ix_audit_log_unsealed", "id", postgresql_where=sa.text("seq IS NULL")).ddl_if(
            dialect="postgresql"
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    at: dt.datetime = _time(index=True)
    actor: str = Field(max_length=255)
    event: str = Field(max_length=64, index=True)
    subject: str = Field(max_length=2048)
    detail: str = Field(sa_column=sa.Column(sa.Text(), nullable=False))
    request_id: str | None = Field(default=None, max_length=64)
    seq: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger(), unique=True))
    prev_hash: str | None = Field(default=None, max_length=64)
    hash: str | None = Field(default=None, max_length=64)


class AuditSealRow(SQLModel, table=True):
    """A signature over the chain's head at one point: proof the log up to ``seq`` existed."""

    __tablename__ = "audit_seal"

    id: int | None = Field(default=None, primary_key=True)
    seq: int = Field(sa_column=sa.Column(sa.BigInteger(), nullable=False))
    head_hash: str = Field(max_length=64)
    signed_at: dt.datetime = _time()
    signer_cert_pem: str = Field(sa_column=sa.Column(sa.Text(), nullable=False))
    signature: bytes = Field(sa_column=sa.Column(sa.LargeBinary(), nullable=False))
