"""Issued certificates and revocation (admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import AdminDep, CtxDep
from api.problems import PROBLEM_RESPONSES, responses
from api.schemas import CertificateOut, CertificatePage, RevokedCertificateOut, RevokeRequest
from api.schemas.wire import DurationOrEmpty, SerialOrEmpty, SerialText, one_of
from ca import certs
from ca.durations import Ttl
from ca.identity import SpiffeId
from ca.revocation import RevocationReason
from ca.serial import Serial

# ``certs.CertStatus.parse``; "" lists every status, as no status does.
StatusOrEmpty = Annotated[str, one_of((s.value for s in certs.CertStatus), empty=True)]

router = APIRouter(prefix="/v1/certificates", tags=["certificates"], responses=PROBLEM_RESPONSES)


@router.get("", response_model=CertificatePage)
def list_certificates(
    ctx: CtxDep,
    _admin: AdminDep,
    spiffe_id: Annotated[str | None, Query(max_length=2048)] = None,
    status: Annotated[StatusOrEmpty | None, Query(description="active, revoked or expired")] = None,
    limit: Annotated[int, Query(ge=1, le=certs.MAX_PAGE)] = 100,
    after: Annotated[
        SerialOrEmpty | None, Query(max_length=64, description="Serial to page after")
    ] = None,
    expiring_within: Annotated[
        DurationOrEmpty | None,
        Query(
            max_length=16,
            description="Only live certificates expiring within this duration (e.g. 24h), "
            "soonest first",
        ),
    ] = None,
) -> CertificatePage:
    page = certs.certificate_page(
        ctx,
        spiffe_id=SpiffeId.parse(spiffe_id) if spiffe_id else None,
        status=certs.CertStatus.parse(status) if status else None,
        expiring_within=Ttl.parse(expiring_within).delta if expiring_within else None,
        limit=limit,
        after=Serial.parse(after) if after else None,
    )
    return CertificatePage(
        items=[CertificateOut.of(i) for i in page.items],
        next_after=page.next_after.hex if page.next_after else None,
    )


@router.get("/{serial}", response_model=CertificateOut, responses=responses(404))
def show_certificate(serial: SerialText, ctx: CtxDep, _admin: AdminDep) -> CertificateOut:
    return CertificateOut.of(certs.get_certificate(ctx, Serial.parse(serial)), with_pem=True)


@router.post(
    "/{serial}/revoke",
    response_model=RevokedCertificateOut,
    responses=responses(404, 409),
)
def revoke_certificate(
    serial: SerialText, ctx: CtxDep, admin: AdminDep, body: RevokeRequest | None = None
) -> RevokedCertificateOut:
    """Every field of the body is optional, so the body is too (none is ``{}``), as for the
    emergency switch and rotate; docs/api.md documents ``{"reason"?, "invalidity_date"?}``."""
    given = body or RevokeRequest()
    info = certs.revoke_certificate(
        ctx,
        Serial.parse(serial),
        RevocationReason.parse(given.reason),
        str(admin),
        invalidity_date=given.invalidity_date,
    )
    return RevokedCertificateOut.of(info)
