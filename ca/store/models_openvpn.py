"""Tables of the openvpn authority (kept apart so features can grow without one huge module).

Certificates themselves are ordinary ``certificate`` rows (profiles ``openvpn-client`` and
``openvpn-server``, identity ``CN=<name>``); these tables hold what only OpenVPN needs. Like the
gateway tables they reference no core table by foreign key, so ``ca.authority._wipe`` (``init
--force``) never trips over them; ``ca.openvpn.init_openvpn`` replaces them itself.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from ca.store.models import UtcDateTime

__all__ = ["OpenVpnClientRow", "OpenVpnRow"]


def _time() -> Any:
    return Field(sa_column=sa.Column(UtcDateTime(), nullable=False))


class OpenVpnRow(SQLModel, table=True):
    """One OpenVPN deployment per openvpn authority: where clients connect, where the CRL file
    is kept, and where the control-channel keys are held."""

    __tablename__ = "openvpn"

    authority: str = Field(primary_key=True, max_length=64)
    remote: str | None = Field(default=None, max_length=253)
    port: int = Field(default=1194)
    proto: str = Field(default="udp", max_length=8)
    crl_path: str | None = Field(default=None, max_length=1024)
    server_cn: str | None = Field(default=None, max_length=64)
    # "file" (an encrypted 0600 file under the data dir) or "vault" (Vault KV v2)
    secret_store: str = Field(max_length=16)
    tls_crypt_v2_ref: str = Field(max_length=255)
    tls_crypt_ref: str = Field(max_length=255)
    created_at: dt.datetime = _time()
    updated_at: dt.datetime = _time()
    # Where server-config last wrote the server's files: the server certificate is renewed there.
    server_dir: str | None = Field(default=None, max_length=1024)
    server_ttl_seconds: int | None = None
    server_key_type: str | None = Field(default=None, max_length=16)


class OpenVpnClientRow(SQLModel, table=True):
    """A client name and its current certificate. The primary key makes two concurrent
    ``client add`` of one name collide; ``serial`` is NULL while a certificate is being issued."""

    __tablename__ = "openvpn_client"

    authority: str = Field(primary_key=True, max_length=64)
    name: str = Field(primary_key=True, max_length=64)
    serial: str | None = Field(default=None, max_length=40)
    tls_crypt: str = Field(max_length=8)  # "v2" (per-client key) or "shared"
    claimed_at: dt.datetime = _time()
    created_at: dt.datetime = _time()
