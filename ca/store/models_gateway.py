"""Tables of the gateway authority (kept apart so features can grow without one huge module).

The certificates themselves are ordinary ``certificate`` rows (authority ``gateway``, profile
``gateway-client``, identity ``CN=<consumer>``), so listing, revocation, CRLs and OCSP treat them
like every other certificate. These tables hold only what is specific to API-gateway partners.
None of them references the core tables by foreign key: wiping or re-creating an authority
(``ca.authority._wipe``) must never trip over them.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from ca.store.models import UtcDateTime

__all__ = [
    "GatewayCertificateRow",
    "GatewayConfigRow",
    "GatewayConsumerRow",
    "GatewayTruststoreRow",
]


def _time(*, nullable: bool = False) -> Any:
    return Field(sa_column=sa.Column(UtcDateTime(), nullable=nullable))


class GatewayConfigRow(SQLModel, table=True):
    """Issuance policy of a gateway authority, set by ``trellis gateway init``."""

    __tablename__ = "gateway_config"

    authority: str = Field(primary_key=True, max_length=64)
    default_ttl_seconds: int
    max_ttl_seconds: int
    created_at: dt.datetime = _time()


class GatewayConsumerRow(SQLModel, table=True):
    """An API partner: the name is the certificate CN (what Kong's mtls-auth matches on)."""

    __tablename__ = "gateway_consumer"

    name: str = Field(primary_key=True, max_length=64)
    contact: str = Field(default="", max_length=255)
    created_at: dt.datetime = _time()
    disabled_at: dt.datetime | None = _time(nullable=True)


class GatewayCertificateRow(SQLModel, table=True):
    """How each gateway certificate was delivered, and its RFC 8705 ``x5t#S256`` thumbprint."""

    __tablename__ = "gateway_certificate"

    serial: str = Field(primary_key=True, max_length=40)
    consumer: str = Field(index=True, max_length=64)
    delivery: str = Field(max_length=16)  # csr | pkcs12 | pkcs12-legacy
    x5t_s256: str = Field(unique=True, max_length=43)
    created_at: dt.datetime = _time()


class GatewayTruststoreRow(SQLModel, table=True):
    """A truststore written to disk on ``node``; revocations and refreshes rewrite it there."""

    __tablename__ = "gateway_truststore"
    __table_args__ = (sa.UniqueConstraint("node", "path", name="uq_gateway_truststore_node_path"),)

    id: int | None = Field(default=None, primary_key=True)
    node: str = Field(max_length=255)
    path: str = Field(max_length=1024)
    format: str = Field(max_length=16)
    written_at: dt.datetime = _time()
