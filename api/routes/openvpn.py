"""OpenVPN (admin token): the deployment, server files, client profiles and offboarding; and the
CRL file's content for VPN servers that fetch it (no authentication, like ``/v1/crl``).

The wire models live here (as in ``api/routes/federation.py``); ``cli/openvpn.py`` renders the
same ones for ``--json``.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status
from pydantic import BaseModel, Field, StrictInt

from api.deps import AdminDep, CtxDep
from api.problems import PROBLEM_RESPONSES, responses
from api.schemas import CertificateOut, RequestBody
from ca import openvpn
from ca.durations import Ttl
from ca.keys import KeyType
from ca.revocation import RevocationReason

__all__ = [
    "ClientCreate",
    "ClientOut",
    "ClientRevokedOut",
    "OpenVpnOut",
    "ProfileOut",
    "ServerCertOut",
    "ServerConfigOut",
    "admin",
    "public",
]

admin = APIRouter(prefix="/v1/openvpn", tags=["openvpn"], responses=PROBLEM_RESPONSES)
public = APIRouter(prefix="/v1/openvpn", tags=["openvpn"])

AuthorityQuery = Annotated[
    str, Query(max_length=32, pattern="^[a-z][a-z0-9-]*$", description="The OpenVPN authority")
]
OVPN = "application/x-openvpn-profile"


class OpenVpnInit(RequestBody):
    key_type: str | None = Field(default=None, description="Default: ec-p256 (intermediate)")
    root_key_type: str | None = Field(default=None, description="Default: key_type or ec-p384")
    key_backend: str | None = Field(default=None, examples=["file", "vault"])
    ca_ttl: str = Field(default="1y", description="Intermediate lifetime (rotated on schedule)")


class OpenVpnConfigure(RequestBody):
    remote: str | None = Field(default=None, max_length=253, examples=["vpn.example.org"])
    port: StrictInt | None = Field(default=None, ge=1, le=65535)
    proto: str | None = Field(default=None, examples=["udp"])
    crl_path: str | None = Field(
        default=None, max_length=1024, description="CRL file on the Trellis host, kept current"
    )
    server_cn: str | None = Field(default=None, max_length=64)


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
    cn: str | None = Field(default=None, max_length=64, description="Default: the server CN")
    key_type: str = "ec-p256"
    ttl: str = "1y"
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
    name: str = Field(max_length=64, examples=["alice"], description="Becomes the certificate CN")
    ttl: str = "30d"
    tls_crypt: str = Field(default="v2", description="v2 (a key per client) or shared")
    key_type: str = "ec-p256"


class ClientRenew(RequestBody):
    ttl: str = "30d"
    tls_crypt: str | None = Field(default=None, description="Default: as before")
    key_type: str = "ec-p256"


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
    reason: str = "cessationOfOperation"


class ClientRevokedOut(BaseModel):
    name: str
    revoked: list[CertificateOut]
    crl_path: str | None = Field(description="The CRL file rewritten, if one is configured")
    crl_error: str | None = Field(
        default=None, description="Why the CRL file could not be rewritten (the job retries)"
    )

    @classmethod
    def of(cls, value: openvpn.ClientRevoked) -> ClientRevokedOut:
        return cls(
            name=value.name,
            revoked=[CertificateOut.of(info) for info in value.revoked],
            crl_path=str(value.crl_path) if value.crl_path else None,
            crl_error=value.crl_error,
        )


def _profile_response(profile: openvpn.ClientProfile, status_code: int) -> Response:
    return Response(
        profile.ovpn,
        status_code=status_code,
        media_type=OVPN,
        headers={
            "Content-Disposition": f'attachment; filename="{profile.name}.ovpn"',
            "X-Certificate-Serial": profile.serial.hex,
            "Cache-Control": "no-store",
        },
    )


_PROFILE = {"content": {OVPN: {}}, "description": "The inline client profile (.ovpn)"}


@admin.post(
    "/init",
    response_model=OpenVpnOut,
    status_code=status.HTTP_201_CREATED,
    responses=responses(409),
    summary="Create the OpenVPN CA hierarchy and its tls-crypt keys",
)
def init(
    body: OpenVpnInit, ctx: CtxDep, principal: AdminDep, authority: AuthorityQuery = openvpn.OPENVPN
) -> OpenVpnOut:
    params = openvpn.InitParams(
        name=authority,
        key_type=KeyType.parse(body.key_type or "ec-p256"),
        root_key_type=KeyType.parse(body.root_key_type or body.key_type or "ec-p384"),
        key_backend=body.key_backend,
        ca_ttl=Ttl.parse(body.ca_ttl),
        actor=str(principal),
    )
    return OpenVpnOut.of(openvpn.init_openvpn(ctx, params))


@admin.get("", response_model=OpenVpnOut, responses=responses(404), summary="The deployment")
def show(ctx: CtxDep, _admin: AdminDep, authority: AuthorityQuery = openvpn.OPENVPN) -> OpenVpnOut:
    return OpenVpnOut.of(openvpn.get_config(ctx, authority))


@admin.patch(
    "",
    response_model=OpenVpnOut,
    responses=responses(404, 409),
    summary="Change where clients connect and where the CRL file is kept",
)
def configure(
    body: OpenVpnConfigure,
    ctx: CtxDep,
    principal: AdminDep,
    authority: AuthorityQuery = openvpn.OPENVPN,
) -> OpenVpnOut:
    params = openvpn.ConfigureParams(
        remote=body.remote,
        port=body.port,
        proto=openvpn.Proto.parse(body.proto) if body.proto else None,
        crl_path=Path(body.crl_path) if body.crl_path else None,
        server_cn=openvpn.VpnName(body.server_cn) if body.server_cn is not None else None,
        actor=str(principal),
    )
    return OpenVpnOut.of(openvpn.configure(ctx, params, authority))


@admin.post(
    "/server-cert",
    response_model=ServerCertOut,
    status_code=status.HTTP_201_CREATED,
    responses=responses(404, 409),
    summary="A server certificate (serverAuth only) and its key",
)
def server_cert(
    body: ServerCertRequest,
    ctx: CtxDep,
    principal: AdminDep,
    authority: AuthorityQuery = openvpn.OPENVPN,
) -> ServerCertOut:
    return ServerCertOut.of(openvpn.issue_server_cert(ctx, body.params(authority, principal)))


@admin.post(
    "/server-config",
    response_model=ServerConfigOut,
    status_code=status.HTTP_201_CREATED,
    responses=responses(404, 409),
    summary="server.conf and every file it names, with a fresh server certificate",
)
def server_config(
    body: ServerCertRequest,
    ctx: CtxDep,
    principal: AdminDep,
    authority: AuthorityQuery = openvpn.OPENVPN,
) -> ServerConfigOut:
    network = openvpn.client_pool(body.network) if body.network is not None else None
    files = openvpn.server_config(ctx, body.params(authority, principal), network)
    return ServerConfigOut(
        files={name: data.decode() for name, data in files.items()},
        private=sorted(openvpn.PRIVATE_FILES),
    )


@admin.post(
    "/clients",
    response_class=Response,
    status_code=status.HTTP_201_CREATED,
    responses={201: _PROFILE, **responses(404, 409)},
    summary="Onboard a user: a certificate with CN = name, in a complete .ovpn profile",
)
def add_client(
    body: ClientCreate,
    ctx: CtxDep,
    principal: AdminDep,
    authority: AuthorityQuery = openvpn.OPENVPN,
) -> Response:
    request = openvpn.ClientRequest(
        name=openvpn.VpnName(body.name),
        authority=authority,
        ttl=Ttl.parse(body.ttl),
        tls_crypt=openvpn.TlsCrypt.parse(body.tls_crypt),
        key_type=KeyType.parse(body.key_type),
        requested_by=str(principal),
    )
    return _profile_response(openvpn.add_client(ctx, request), status.HTTP_201_CREATED)


@admin.get(
    "/clients", response_model=list[ClientOut], responses=responses(404), summary="Every client"
)
def list_clients(
    ctx: CtxDep, _admin: AdminDep, authority: AuthorityQuery = openvpn.OPENVPN
) -> list[ClientOut]:
    return [ClientOut.of(info) for info in openvpn.list_clients(ctx, authority)]


@admin.post(
    "/clients/{name}/renew",
    response_class=Response,
    responses={200: _PROFILE, **responses(404, 409)},
    summary="A fresh profile; the previous certificate is revoked as superseded",
)
def renew_client(
    name: str,
    body: ClientRenew,
    ctx: CtxDep,
    principal: AdminDep,
    authority: AuthorityQuery = openvpn.OPENVPN,
) -> Response:
    request = openvpn.ClientRequest(
        name=openvpn.VpnName(name),
        authority=authority,
        ttl=Ttl.parse(body.ttl),
        tls_crypt=openvpn.TlsCrypt.parse(body.tls_crypt) if body.tls_crypt else None,
        key_type=KeyType.parse(body.key_type),
        requested_by=str(principal),
    )
    return _profile_response(openvpn.renew_client(ctx, request), status.HTTP_200_OK)


@admin.post(
    "/clients/{name}/revoke",
    response_model=ClientRevokedOut,
    responses=responses(404, 409),
    summary="Offboard a user: revoke every live certificate and rewrite the CRL file",
)
def revoke_client(
    name: str,
    body: ClientRevoke,
    request: Request,
    ctx: CtxDep,
    principal: AdminDep,
    authority: AuthorityQuery = openvpn.OPENVPN,
) -> ClientRevokedOut:
    revoked = openvpn.revoke_client(
        ctx,
        openvpn.VpnName(name),
        authority=authority,
        reason=RevocationReason.parse(body.reason),
        actor=str(principal),
        request_id=request.state.request_id,
    )
    return ClientRevokedOut.of(revoked)


@public.get(
    "/crl.pem",
    response_class=Response,
    responses={
        200: {"content": {"application/x-pem-file": {}}, "description": "One CRL per CA"},
        **responses(400, 404),
    },
    summary="What crl-verify reads: a PEM CRL for every CA of the chain (no authentication)",
)
def crl_pem(ctx: CtxDep, authority: AuthorityQuery = openvpn.OPENVPN) -> Response:
    return Response(
        openvpn.crl_pem(ctx, authority),
        media_type="application/x-pem-file",
        headers={"Cache-Control": "public, max-age=60"},
    )
