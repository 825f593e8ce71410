"""Wire models of OpenVPN, shared by ``api/routes/openvpn.py`` and ``cli/openvpn.py``
(pydantic and ``ca`` only, so the CLI need not import FastAPI)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field, StrictInt

from api.schemas import RequestBody, RevokedCertificateOut, decided_by_ca
from api.schemas.wire import (
    VPN_NAME,
    Duration,
    KeyBackendOrEmpty,
    KeyTypeName,
    KeyTypeOrEmpty,
    ReasonName,
    one_of,
    string_schema,
)
from ca import openvpn
from ca.durations import Ttl
from ca.keys import KeyType

__all__ = [
    "ClientCreate",
    "ClientOut",
    "ClientRenew",
    "ClientRevoke",
    "ClientRevokedOut",
    "OpenVpnConfigure",
    "OpenVpnInit",
    "OpenVpnOut",
    "ProfileOut",
    "ServerCertOut",
    "ServerCertRequest",
    "ServerConfigOut",
]

# What ``openvpn.TlsCrypt.parse``, ``Proto.parse`` and ``VpnName`` take (``api.schemas.wire``);
# "" is the default where the route reads it as absent.
TlsCryptName = Annotated[str, one_of(t.value for t in openvpn.TlsCrypt)]
TlsCryptOrEmpty = Annotated[str, one_of((t.value for t in openvpn.TlsCrypt), empty=True)]
ProtoOrEmpty = Annotated[str, one_of((p.value for p in openvpn.Proto), empty=True)]
VpnNameText = Annotated[str, string_schema(pattern=VPN_NAME)]


class OpenVpnInit(RequestBody):
    key_type: KeyTypeOrEmpty | None = Field(
        default=None, description="Default: ec-p256 (intermediate)"
    )
    root_key_type: KeyTypeOrEmpty | None = Field(
        default=None, description="Default: key_type or ec-p384"
    )
    key_backend: KeyBackendOrEmpty | None = Field(default=None, examples=["file", "vault"])
    ca_ttl: Duration = Field(
        default="1y", description="Intermediate lifetime (rotated on schedule)"
    )


class OpenVpnConfigure(RequestBody):
    remote: str | None = Field(
        default=None,
        json_schema_extra=decided_by_ca(maxLength=253),
        examples=["vpn.example.org"],
    )
    port: StrictInt | None = Field(default=None, ge=1, le=65535)
    proto: ProtoOrEmpty | None = Field(default=None, examples=["udp"])
    crl_path: str | None = Field(
        default=None, max_length=1024, description="CRL file on the Trellis host, kept current"
    )
    server_cn: VpnNameText | None = Field(
        default=None, json_schema_extra=decided_by_ca(maxLength=64)
    )


class OpenVpnOut(BaseModel):
    authority: str
    remote: str | None
    port: int
    proto: str
    crl_path: str | None
    server_cn: str | None
    key_store: str = Field(description="Where the tls-crypt keys are held: file or vault")

    @classmethod
    def of(cls, config: openvpn.OpenVpnConfig) -> OpenVpnOut:
        return cls(
            authority=config.authority,
            remote=config.remote,
            port=config.port,
            proto=config.proto.value,
            crl_path=str(config.crl_path) if config.crl_path else None,
            server_cn=config.server_cn,
            key_store=config.secret_store,
        )


class ServerCertRequest(RequestBody):
    cn: VpnNameText | None = Field(
        default=None,
        json_schema_extra=decided_by_ca(maxLength=64),
        description="Default: the server CN",
    )
    key_type: KeyTypeName = "ec-p256"
    ttl: Duration = "1y"
    network: str | None = Field(default=None, examples=["10.8.0.0/24"], description="config only")

    def params(self, authority: str, principal: object) -> openvpn.ServerRequest:
        return openvpn.ServerRequest(
            authority=authority,
            common_name=openvpn.VpnName(self.cn) if self.cn is not None else None,
            key_type=KeyType.parse(self.key_type),
            ttl=Ttl.parse(self.ttl),
            requested_by=str(principal),
        )


class ServerCertOut(BaseModel):
    common_name: str
    serial: str
    expires_at: dt.datetime
    certificate: str = Field(description="The leaf, then the chain (OpenVPN's cert file)")
    key: str = Field(description="PKCS#8 PEM; Trellis keeps no copy")

    @classmethod
    def of(cls, value: openvpn.ServerCredentials) -> ServerCertOut:
        return cls(
            common_name=value.common_name,
            serial=value.serial.hex,
            expires_at=value.not_after,
            certificate=value.certificate_pem.decode(),
            key=value.key_pem.decode(),
        )


class ServerConfigOut(BaseModel):
    files: dict[str, str] = Field(description="File name → content, for one directory")
    private: list[str] = Field(description="Files to write with mode 0600")


class ClientCreate(RequestBody):
    name: VpnNameText = Field(
        json_schema_extra=decided_by_ca(maxLength=64),
        examples=["alice"],
        description="Becomes the certificate CN",
    )
    ttl: Duration = "30d"
    tls_crypt: TlsCryptName = Field(default="v2", description="v2 (a key per client) or shared")
    key_type: KeyTypeName = "ec-p256"


class ClientRenew(RequestBody):
    ttl: Duration = "30d"
    tls_crypt: TlsCryptOrEmpty | None = Field(default=None, description="Default: as before")
    key_type: KeyTypeName = "ec-p256"


class ClientOut(BaseModel):
    name: str
    status: str = Field(description="active, revoked, expired or pending (being issued)")
    serial: str | None
    not_after: dt.datetime | None
    revoked_at: dt.datetime | None
    tls_crypt: str
    created_at: dt.datetime

    @classmethod
    def of(cls, info: openvpn.ClientInfo) -> ClientOut:
        return cls(
            name=info.name,
            status=info.status,
            serial=info.serial,
            not_after=info.not_after,
            revoked_at=info.revoked_at,
            tls_crypt=info.tls_crypt.value,
            created_at=info.created_at,
        )


class ProfileOut(BaseModel):
    """What ``trellis openvpn client add|renew --json`` prints (REST returns the .ovpn itself)."""

    name: str
    serial: str
    expires_at: dt.datetime
    tls_crypt: str
    path: str | None = None

    @classmethod
    def of(cls, profile: openvpn.ClientProfile, path: Path | None = None) -> ProfileOut:
        return cls(
            name=profile.name,
            serial=profile.serial.hex,
            expires_at=profile.not_after,
            tls_crypt=profile.tls_crypt.value,
            path=str(path) if path else None,
        )


class ClientRevoke(RequestBody):
    reason: ReasonName = "cessationOfOperation"


class ClientRevokedOut(BaseModel):
    name: str
    revoked: list[RevokedCertificateOut] = Field(
        description="Each with crl_skipped: why its issuer's CRL was not re-signed, or null"
    )
    crl_path: str | None = Field(description="The CRL file rewritten, if one is configured")
    crl_error: str | None = Field(
        default=None, description="Why the CRL file could not be rewritten (the job retries)"
    )

    @classmethod
    def of(cls, value: openvpn.ClientRevoked) -> ClientRevokedOut:
        return cls(
            name=value.name,
            revoked=[RevokedCertificateOut.of(info) for info in value.revoked],
            crl_path=str(value.crl_path) if value.crl_path else None,
            crl_error=value.crl_error,
        )
