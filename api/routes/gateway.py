"""API-gateway partners (admin): the gateway authority, consumers, their client certificates,
truststores and the nginx server block. ``docs/gateway.md`` describes the flow.

The wire models live here (not in ``api/schemas.py``, which other features edit concurrently);
``cli/gateway.py`` renders the same ones, so ``--json`` output and REST bodies have one shape.
"""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path as FsPath
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from api.deps import AdminDep, CtxDep
from api.problems import PROBLEM_RESPONSES, responses
from api.schemas import RequestBody, RevokeRequest
from ca import gateway
from ca.durations import Ttl
from ca.keys import KeyType
from ca.pem import fingerprint
from ca.revocation import RevocationReason
from ca.serial import Serial

__all__ = [
    "ConsumerCreate",
    "ConsumerOut",
    "GatewayCertOut",
    "GatewayInit",
    "GatewayOut",
    "GatewayRevokedOut",
    "TruststoreOut",
    "router",
]

router = APIRouter(prefix="/v1/gateway", tags=["gateway"], responses=PROBLEM_RESPONSES)
ConsumerPath = Annotated[str, Path(max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]


class GatewayInit(RequestBody):
    key_type: str | None = Field(default=None, examples=["ec-p256"], description="Intermediate")
    root_key_type: str | None = Field(default=None, examples=["ec-p384"])
    key_backend: str | None = Field(default=None, examples=["file"], description="file or vault")
    ca_ttl: str | None = Field(default=None, examples=["3y"], description="Intermediate lifetime")
    default_ttl: str | None = Field(default=None, examples=["90d"])
    max_ttl: str | None = Field(default=None, examples=["398d"])


class GatewayOut(BaseModel):
    authority: str
    default_ttl: str
    max_ttl: str
    root_serial: str
    root_fingerprint_sha256: str
    root_not_after: dt.datetime
    intermediate_serial: str
    intermediate_not_after: dt.datetime

    @classmethod
    def of(cls, state: gateway.GatewayStatus) -> GatewayOut:
        return cls(
            authority=gateway.GATEWAY,
            default_ttl=str(state.policy.default_ttl),
            max_ttl=str(state.policy.max_ttl),
            root_serial=format(state.root.serial_number, "x"),
            root_fingerprint_sha256=fingerprint(state.root),
            root_not_after=state.root.not_valid_after_utc,
            intermediate_serial=format(state.intermediate.serial_number, "x"),
            intermediate_not_after=state.intermediate.not_valid_after_utc,
        )


class ConsumerCreate(RequestBody):
    name: str = Field(max_length=64, examples=["acme-payments"])
    contact: str = Field(default="", max_length=255, examples=["api-team@acme.example"])


class ConsumerOut(BaseModel):
    name: str
    contact: str
    enabled: bool
    created_at: dt.datetime
    disabled_at: dt.datetime | None
    live_certificates: int = Field(description="Active, unexpired certificates (at most 2)")

    @classmethod
    def of(cls, consumer: gateway.Consumer) -> ConsumerOut:
        return cls(
            name=consumer.name.value,
            contact=consumer.contact,
            enabled=consumer.enabled,
            created_at=consumer.created_at,
            disabled_at=consumer.disabled_at,
            live_certificates=consumer.live_certificates,
        )


class Pkcs12Options(RequestBody):
    password: str = Field(min_length=gateway.MIN_P12_PASSWORD, max_length=1024)
    legacy: StrictBool = Field(
        default=False,
        description="pbeWithSHA1And3-KeyTripleDES-CBC for old Java/Windows stores, instead of "
        "AES-256-CBC with PBKDF2-HMAC-SHA256",
    )
    key_type: str | None = Field(
        default=None, examples=["ec-p256"], description="Default ec-p256; rsa-2048 when legacy"
    )


class CertIssueRequest(RequestBody):
    """Exactly one of ``csr`` (preferred: the key never leaves the partner) or ``pkcs12``."""

    csr: str | None = Field(default=None, max_length=60_000, description="PEM PKCS#10")
    pkcs12: Pkcs12Options | None = Field(
        default=None, description="Generate the key here and return it once, encrypted"
    )
    ttl: str | None = Field(default=None, examples=["90d"], description="At most the max TTL")


class GatewayCertOut(BaseModel):
    model_config = ConfigDict(serialize_by_alias=True)
    serial: str = Field(description="Lower-case hex")
    consumer: str
    status: str
    delivery: str | None = Field(description="csr, pkcs12 or pkcs12-legacy")
    not_before: dt.datetime
    not_after: dt.datetime
    fingerprint_sha256: str
    x5t_s256: str = Field(
        serialization_alias="x5t#S256",
        description="RFC 8705 thumbprint: put it in access tokens as cnf.x5t#S256",
    )
    requested_by: str
    revoked_at: dt.datetime | None
    revocation_reason: str | None
    certificate: str = Field(description="The leaf, PEM")
    chain: str | None = Field(default=None, description="Issuing intermediate, PEM (on issue)")
    pkcs12: str | None = Field(
        default=None, description="Base64 PKCS#12 (key, leaf, chain): returned once, never stored"
    )
    clamped: bool = Field(
        default=False, description="Shorter than requested: the issuing CA expires first"
    )

    @classmethod
    def of(cls, cert: gateway.GatewayCertificate) -> GatewayCertOut:
        info = cert.info
        return cls(
            serial=info.serial.hex,
            consumer=cert.consumer.value,
            status=info.status.value,
            delivery=cert.delivery.value if cert.delivery else None,
            not_before=info.not_before,
            not_after=info.not_after,
            fingerprint_sha256=info.fingerprint_sha256,
            x5t_s256=cert.x5t_s256,
            requested_by=info.requested_by,
            revoked_at=info.revoked_at,
            revocation_reason=info.revocation_reason.value if info.revocation_reason else None,
            certificate=info.certificate_pem,
        )

    @classmethod
    def issued(
        cls, issued: gateway.IssuedGatewayCertificate, *, with_pkcs12: bool
    ) -> GatewayCertOut:
        out = cls.of(issued.record)
        out.chain = issued.chain_pem.decode()
        out.clamped = issued.clamped
        if with_pkcs12 and issued.pkcs12 is not None:
            out.pkcs12 = base64.b64encode(issued.pkcs12).decode()
        return out


class GatewayRevokedOut(GatewayCertOut):
    rewritten: list[str] = Field(
        default_factory=list,
        description="Truststore files rewritten on the server's host: reload those gateways",
    )


class TruststoreOut(BaseModel):
    format: str
    files: dict[str, str] = Field(description="File name → content (PEM, or README text)")


def init_params(body: GatewayInit) -> gateway.GatewayParams:
    """Shared with the CLI: unset fields keep ``GatewayParams``' defaults."""
    key_type = KeyType.parse(body.key_type) if body.key_type else KeyType.EC_P256
    # like `trellis init`: an RSA intermediate gets an RSA root unless told otherwise
    root_default = KeyType.EC_P384 if key_type is KeyType.EC_P256 else key_type
    return gateway.GatewayParams(
        key_type=key_type,
        root_key_type=KeyType.parse(body.root_key_type) if body.root_key_type else root_default,
        key_backend=body.key_backend,
        ca_ttl=Ttl.parse(body.ca_ttl) if body.ca_ttl else gateway.DEFAULT_CA_TTL,
        default_ttl=Ttl.parse(body.default_ttl) if body.default_ttl else gateway.DEFAULT_TTL,
        max_ttl=Ttl.parse(body.max_ttl) if body.max_ttl else gateway.DEFAULT_MAX_TTL,
    )


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
    ctx: CtxDep,
    _admin: AdminDep,
    consumer: Annotated[str | None, Query(max_length=64)] = None,
    live: Annotated[bool, Query(description="Only active, unexpired ones")] = False,
) -> list[GatewayCertOut]:
    name = gateway.ConsumerName(consumer) if consumer else None
    found = gateway.list_gateway_certificates(ctx, name, live_only=live)
    return [GatewayCertOut.of(cert) for cert in found]


@router.get("/certificates/{serial}", response_model=GatewayCertOut, responses=responses(404))
def show_certificate(serial: str, ctx: CtxDep, _admin: AdminDep) -> GatewayCertOut:
    return GatewayCertOut.of(gateway.show_certificate(ctx, Serial.parse(serial)))


@router.post(
    "/certificates/{serial}/revoke",
    response_model=GatewayRevokedOut,
    responses=responses(404, 409),
)
def revoke(
    serial: str, body: RevokeRequest, request: Request, ctx: CtxDep, admin: AdminDep
) -> GatewayRevokedOut:
    """The gateway CRL is re-signed in the revoking transaction; recorded nginx truststores on
    the server's host are rewritten (reload nginx after)."""
    cert, written = gateway.revoke_gateway_certificate(
        ctx,
        Serial.parse(serial),
        RevocationReason.parse(body.reason),
        str(admin),
        request.state.request_id,
        body.invalidity_date,
    )
    out = GatewayCertOut.of(cert).model_dump(by_alias=False)
    return GatewayRevokedOut(**out, rewritten=[str(path) for path in written])


@router.get("/truststore/{format}", response_model=TruststoreOut, responses=responses(404))
def truststore(
    format: Annotated[str, Path(pattern="^(pem|nginx|aws|kong)$")], ctx: CtxDep, _admin: AdminDep
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
