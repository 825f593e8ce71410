"""API-gateway partners (admin): the gateway authority, consumers, their client certificates,
truststores and the nginx server block. ``docs/gateway.md`` describes the flow.

The wire models are in ``api/schemas/gateway.py``: ``cli/gateway.py`` renders the same ones, so
``--json`` output and REST bodies have one shape.
"""

from __future__ import annotations

from pathlib import Path as FsPath
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response, status

from api.deps import AdminDep, CtxDep, QueryBool
from api.problems import PROBLEM_RESPONSES, responses
from api.schemas import RevokeRequest
from api.schemas.gateway import (
    CertIssueRequest,
    ConsumerCreate,
    ConsumerNameText,
    ConsumerOut,
    GatewayCertOut,
    GatewayInit,
    GatewayOut,
    GatewayRevokedOut,
    TruststoreOut,
    init_params,
)
from api.schemas.wire import (
    CONSUMER_NAME,
    SerialOrEmpty,
    SerialText,
    one_of,
    optional,
    string_schema,
)
from ca import gateway
from ca.durations import Ttl
from ca.keys import KeyType
from ca.paging import MAX_PAGE
from ca.revocation import RevocationReason
from ca.serial import Serial

__all__ = ["router"]

router = APIRouter(prefix="/v1/gateway", tags=["gateway"], responses=PROBLEM_RESPONSES)
# Judged by ``gateway.ConsumerName`` (docs/api.md: one message for every bad value, no pattern).
ConsumerPath = Annotated[ConsumerNameText, Path(description="[a-z0-9][a-z0-9._-]{0,63}")]
ConsumerOrEmpty = Annotated[str, string_schema(pattern=optional(CONSUMER_NAME))]
FormatName = Annotated[str, one_of(f.value for f in gateway.TruststoreFormat)]


@router.post(
    "/init",
    response_model=GatewayOut,
    status_code=status.HTTP_201_CREATED,
    responses=responses(409),
)
def init(body: GatewayInit, ctx: CtxDep, admin: AdminDep) -> GatewayOut:
    """Create the gateway authority: its own root and intermediate, unrelated to the mesh."""
    return GatewayOut.of(gateway.init_gateway(ctx, init_params(body), actor=str(admin)))


@router.get("", response_model=GatewayOut)
def show(ctx: CtxDep, _admin: AdminDep) -> GatewayOut:
    return GatewayOut.of(gateway.gateway_status(ctx))


@router.post(
    "/consumers",
    response_model=ConsumerOut,
    status_code=status.HTTP_201_CREATED,
    responses=responses(409),
)
def add_consumer(body: ConsumerCreate, ctx: CtxDep, admin: AdminDep) -> ConsumerOut:
    name = gateway.ConsumerName(body.name)
    return ConsumerOut.of(gateway.add_consumer(ctx, name, body.contact, actor=str(admin)))


@router.get("/consumers", response_model=list[ConsumerOut])
def list_consumers(ctx: CtxDep, _admin: AdminDep) -> list[ConsumerOut]:
    return [ConsumerOut.of(c) for c in gateway.list_consumers(ctx)]


@router.get("/consumers/{name}", response_model=ConsumerOut, responses=responses(404))
def show_consumer(name: ConsumerPath, ctx: CtxDep, _admin: AdminDep) -> ConsumerOut:
    return ConsumerOut.of(gateway.get_consumer(ctx, gateway.ConsumerName(name)))


@router.post("/consumers/{name}/disable", response_model=ConsumerOut, responses=responses(404))
def disable_consumer(name: ConsumerPath, ctx: CtxDep, admin: AdminDep) -> ConsumerOut:
    """No new certificate from now on; revoke live ones separately to cut access at once."""
    return ConsumerOut.of(
        gateway.disable_consumer(ctx, gateway.ConsumerName(name), actor=str(admin))
    )


@router.post(
    "/consumers/{name}/certificates",
    response_model=GatewayCertOut,
    status_code=status.HTTP_201_CREATED,
    responses=responses(404, 409),
    summary="Issue a client certificate from a CSR, or with a generated key as PKCS#12",
)
def issue(
    name: ConsumerPath, body: CertIssueRequest, ctx: CtxDep, admin: AdminDep
) -> GatewayCertOut:
    """403 for a disabled consumer, 409 when it already holds two valid certificates."""
    p12 = body.pkcs12
    request = gateway.CertRequest(
        consumer=gateway.ConsumerName(name),
        requested_by=str(admin),
        csr_pem=body.csr.encode() if body.csr is not None else None,
        pkcs12_password=p12.password.encode() if p12 else None,
        legacy_pkcs12=p12.legacy if p12 else False,
        key_type=KeyType.parse(p12.key_type) if p12 and p12.key_type else None,
        ttl=Ttl.parse(body.ttl) if body.ttl else None,
    )
    issued = gateway.issue_certificate(ctx, request)
    return GatewayCertOut.issued(issued, with_pkcs12=True)


@router.get("/certificates", response_model=list[GatewayCertOut])
def list_certificates(
    request: Request,
    response: Response,
    ctx: CtxDep,
    _admin: AdminDep,
    consumer: Annotated[
        ConsumerOrEmpty | None, Query(max_length=64, description="Only this consumer's")
    ] = None,
    live: Annotated[QueryBool, Query(description="true: only active, unexpired ones")] = False,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    after: Annotated[
        SerialOrEmpty | None, Query(max_length=64, description="Serial to page after")
    ] = None,
) -> list[GatewayCertOut]:
    """Newest first, one page. The body stays the array it always was; a page with more after
    it says where the next begins in ``Link: <...&after=SERIAL>; rel="next"`` (RFC 8288), the
    ``next_after`` of ``/v1/certificates``."""
    found = gateway.gateway_certificate_page(
        ctx,
        gateway.ConsumerName(consumer) if consumer else None,
        live_only=live,
        limit=limit,
        after=Serial.parse(after) if after else None,
    )
    if found.next_after is not None:
        url = request.url.include_query_params(limit=limit, after=found.next_after.hex)
        response.headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'
    return [GatewayCertOut.of(cert) for cert in found.items]


@router.get("/certificates/{serial}", response_model=GatewayCertOut, responses=responses(404))
def show_certificate(serial: SerialText, ctx: CtxDep, _admin: AdminDep) -> GatewayCertOut:
    return GatewayCertOut.of(gateway.show_certificate(ctx, Serial.parse(serial)))


@router.post(
    "/certificates/{serial}/revoke",
    response_model=GatewayRevokedOut,
    responses=responses(404, 409),
)
def revoke(
    serial: SerialText, ctx: CtxDep, admin: AdminDep, body: RevokeRequest | None = None
) -> GatewayRevokedOut:
    """The gateway CRL is re-signed in the revoking transaction; recorded nginx truststores on
    the server's node are rewritten (reload nginx after). No body is ``{}``, as for
    ``/v1/certificates/{serial}/revoke``: every field is optional."""
    given = body or RevokeRequest()
    cert, written = gateway.revoke_gateway_certificate(
        ctx,
        Serial.parse(serial),
        RevocationReason.parse(given.reason),
        str(admin),
        given.invalidity_date,
    )
    return GatewayRevokedOut.revoked(cert, written)


@router.get("/truststore/{format}", response_model=TruststoreOut, responses=responses(404))
def truststore(
    format: Annotated[FormatName, Path(description="pem, nginx, aws or kong")],
    ctx: CtxDep,
    _admin: AdminDep,
) -> TruststoreOut:
    """What each gateway trusts: pem/aws one file, nginx client-ca.pem + crl.pem (a CRL for every
    CA), kong one PEM per CA certificate entity and a README."""
    store = gateway.build_truststore(ctx, gateway.TruststoreFormat.parse(format))
    return TruststoreOut(
        format=store.format.value, files={k: v.decode() for k, v in store.files.items()}
    )


@router.get(
    "/nginx-snippet",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "An nginx server block"}},
)
def nginx_snippet(
    _admin: AdminDep,
    upstream: Annotated[str, Query(max_length=512)] = "http://127.0.0.1:8080",
    truststore: Annotated[str, Query(max_length=512)] = "/etc/nginx/trellis-gateway",
    server_name: Annotated[str, Query(max_length=253)] = "_",
    listen: Annotated[str, Query(max_length=64)] = "443",
    ssl_certificate: Annotated[str, Query(max_length=512)] = "/etc/nginx/tls/server.crt",
    ssl_certificate_key: Annotated[str, Query(max_length=512)] = "/etc/nginx/tls/server.key",
) -> Response:
    """The same server block as ``trellis gateway nginx-snippet``."""
    params = gateway.NginxSnippet(
        upstream=upstream,
        truststore=FsPath(truststore),
        server_name=server_name,
        listen=listen,
        ssl_certificate=FsPath(ssl_certificate),
        ssl_certificate_key=FsPath(ssl_certificate_key),
    )
    return Response(gateway.nginx_snippet(params), media_type="text/plain")
