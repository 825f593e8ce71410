"""OpenVPN (admin token): the deployment, server files, client profiles and offboarding; and the
CRL file's content for VPN servers that fetch it (no authentication, like ``/v1/crl``).

The wire models are in ``api/schemas/openvpn.py``; ``cli/openvpn.py`` renders the same ones for
``--json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from api.deps import AdminDep, CtxDep
from api.problems import PROBLEM_RESPONSES, responses
from api.schemas.openvpn import (
    ClientCreate,
    ClientOut,
    ClientRenew,
    ClientRevoke,
    ClientRevokedOut,
    OpenVpnConfigure,
    OpenVpnInit,
    OpenVpnOut,
    ServerCertOut,
    ServerCertRequest,
    ServerConfigOut,
    VpnNameText,
)
from ca import openvpn
from ca.durations import Ttl
from ca.keys import KeyType
from ca.revocation import RevocationReason

__all__ = ["admin", "public"]

admin = APIRouter(prefix="/v1/openvpn", tags=["openvpn"], responses=PROBLEM_RESPONSES)
public = APIRouter(prefix="/v1/openvpn", tags=["openvpn"])

AuthorityQuery = Annotated[
    str, Query(max_length=32, pattern="^[a-z][a-z0-9-]*$", description="The OpenVPN authority")
]
OVPN = "application/x-openvpn-profile"


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
    name: VpnNameText,
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
    name: VpnNameText,
    ctx: CtxDep,
    principal: AdminDep,
    body: ClientRevoke | None = None,
    authority: AuthorityQuery = openvpn.OPENVPN,
) -> ClientRevokedOut:
    """No body is ``{}`` (docs/openvpn.md: ``{reason?}``), as for the other revocations."""
    revoked = openvpn.revoke_client(
        ctx,
        openvpn.VpnName(name),
        authority=authority,
        reason=RevocationReason.parse((body or ClientRevoke()).reason),
        actor=str(principal),
    )
    return ClientRevokedOut.of(revoked)


@public.get(
    "/crl.pem",
    response_class=Response,
    responses={
        200: {"content": {"application/x-pem-file": {}}, "description": "One CRL per CA"},
        **responses(400, 404, 503),
    },
    summary="What crl-verify reads: a PEM CRL for every CA of the chain (no authentication)",
)
def crl_pem(ctx: CtxDep, authority: AuthorityQuery = openvpn.OPENVPN) -> Response:
    return Response(
        openvpn.crl_pem(ctx, authority),
        media_type="application/x-pem-file",
        headers={"Cache-Control": "public, max-age=60"},
    )
