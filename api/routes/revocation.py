"""Relying-party endpoints (CRLs, OCSP, CA certificates: no authentication) and the admin
revocation workflow."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from api.conditional import cacheable, content_etag
from api.deps import AdminDep, AuthorityName, CaSelector, CtxDep
from api.problems import PROBLEM_RESPONSES, responses
from api.schemas import (
    IdentityRevokeRequest,
    IntermediateRevokedOut,
    IntermediateRevokeRequest,
    RevokedCertificateOut,
)
from api.schemas.wire import ReasonName
from ca import certs
from ca.cas import ca_certificate_der
from ca.crl import current_crl
from ca.emergency import revoke_intermediate
from ca.errors import InvalidInput
from ca.identity import SpiffeId
from ca.ocsp import MAX_REQUEST, respond
from ca.revocation import RevocationReason

public = APIRouter(tags=["revocation"])
admin = APIRouter(prefix="/v1", tags=["revocation"], responses=PROBLEM_RESPONSES)

CRL_CACHE = "public, max-age=300"


_NOT_MODIFIED = {304: {"description": "Not modified (If-None-Match, RFC 9110 §13.1.2)"}}


@public.get(
    "/v1/crl/{authority}/{ca}.crl",
    response_class=Response,
    responses={
        200: {"content": {"application/pkix-crl": {}}},
        **_NOT_MODIFIED,
        **responses(400, 404, 503),
    },
    summary="A CA's current CRL (DER). `ca` is a CA serial, `root` or `intermediate`",
)
def crl_der(authority: AuthorityName, ca: CaSelector, request: Request, ctx: CtxDep) -> Response:
    crl = current_crl(ctx, authority, ca)
    return _crl_response(request, crl.number, crl.der, "application/pkix-crl")


@public.get(
    "/v1/crl/{authority}/{ca}.pem",
    response_class=Response,
    responses={
        200: {"content": {"application/x-pem-file": {}}},
        **_NOT_MODIFIED,
        **responses(400, 404, 503),
    },
    summary="A CA's current CRL (PEM)",
)
def crl_pem(authority: AuthorityName, ca: CaSelector, request: Request, ctx: CtxDep) -> Response:
    crl = current_crl(ctx, authority, ca)
    return _crl_response(request, crl.number, crl.pem, "application/x-pem-file")


def _crl_response(request: Request, number: int, body: bytes, media_type: str) -> Response:
    """The CRL number restarts at 1 for a new CA (and ``root`` names whichever is current), so
    the tag also carries a digest of the bytes (``api.conditional.content_etag``)."""
    return cacheable(
        request,
        body,
        etag=content_etag(f"crl-{number}", body),
        media_type=media_type,
        cache_control=CRL_CACHE,
    )


@public.get(
    "/v1/ca/{authority}/{ca}.crt",
    response_class=Response,
    responses={200: {"content": {"application/pkix-cert": {}}}, **responses(400, 404, 503)},
    summary="A CA certificate (DER), the target of caIssuers in issued certificates",
)
def ca_cert(authority: AuthorityName, ca: CaSelector, ctx: CtxDep) -> Response:
    return Response(ca_certificate_der(ctx, authority, ca), media_type="application/pkix-cert")


_OCSP = {200: {"content": {"application/ocsp-response": {}}, "description": "RFC 6960 response"}}


@public.post(
    "/v1/ocsp",
    response_class=Response,
    # A malformed request is answered in OCSP (malformedRequest); a body past the limit is not
    # read at all (api.limits).
    responses={**_OCSP, **responses(413)},  # type: ignore[dict-item]
    summary="OCSP (RFC 6960 §A.1 POST): body is a DER OCSPRequest",
)
async def ocsp_post(request: Request, ctx: CtxDep) -> Response:
    body = await request.body()
    return _ocsp(ctx, body[: MAX_REQUEST + 1])


@public.get(
    "/v1/ocsp/{encoded:path}",
    response_class=Response,
    # A malformed request is answered in OCSP (malformedRequest); only a NUL is 404.
    responses={**_OCSP, **responses(404)},  # type: ignore[dict-item]
    summary="OCSP (RFC 6960 §A.1 GET): base64 of the DER OCSPRequest, URL-encoded",
)
def ocsp_get(encoded: str, ctx: CtxDep) -> Response:
    try:
        der = base64.b64decode(encoded.replace("-", "+").replace("_", "/") + "==", validate=False)
    except (binascii.Error, ValueError):
        der = b""
    return _ocsp(ctx, der)


def _ocsp(ctx: CtxDep, der: bytes) -> Response:
    return Response(
        respond(ctx, der),
        media_type="application/ocsp-response",
        headers={"Cache-Control": "no-store"},
    )


@admin.post(
    "/revocations",
    response_model=list[RevokedCertificateOut],
    responses=responses(404),
    summary="Revoke every live certificate of one SPIFFE ID",
)
def revoke_identity(
    body: IdentityRevokeRequest, ctx: CtxDep, principal: AdminDep
) -> list[RevokedCertificateOut]:
    revoked = certs.revoke_identity(
        ctx,
        SpiffeId.parse(body.spiffe_id),
        RevocationReason.parse(body.reason),
        str(principal),
    )
    return [RevokedCertificateOut.of(info) for info in revoked]


@admin.post(
    "/authorities/{authority}/revoke-intermediate",
    response_model=IntermediateRevokedOut,
    responses=responses(404),
    summary="Emergency: revoke the active intermediate and switch to a new one at once",
)
def emergency(
    authority: AuthorityName,
    ctx: CtxDep,
    principal: AdminDep,
    body: IntermediateRevokeRequest | None = None,
    reason: Annotated[
        ReasonName | None,
        Query(description="The reason, for callers without a body (older form)"),
    ] = None,
) -> IntermediateRevokedOut:
    """The body is read like every revocation's (unknown fields refused): this cannot be
    undone, so a request that says more than Trellis understands must change nothing. An
    empty ``?reason=`` is a reason given, and judged as the body's ``""`` and the CLI's
    ``--reason ""`` are (400); it once fell back to the default and revoked."""
    if body is not None and reason is not None:
        raise InvalidInput("give the reason in the body or in the query, not both")
    if body is not None:
        why = body.reason
    else:
        why = reason if reason is not None else IntermediateRevokeRequest().reason
    result = revoke_intermediate(
        ctx,
        actor=str(principal),
        authority=authority,
        reason=RevocationReason.parse(why),
    )
    return IntermediateRevokedOut.of(result)
