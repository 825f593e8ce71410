"""SPIFFE federation: relationships with foreign trust domains (admin) and the bundle map
(no authentication, like ``/v1/bundle``).

The wire models live here rather than in ``api/schemas.py`` only because this router was added
while that module was being edited; ``cli/federation.py`` renders the same ones.
"""

from __future__ import annotations

import datetime as dt
import json

from fastapi import APIRouter, Response, status
from pydantic import BaseModel, Field

from api.deps import AdminDep, CtxDep
from api.problems import PROBLEM_RESPONSES, responses
from api.schemas import RequestBody
from ca import federation
from ca.errors import Unavailable
from ca.identity import SpiffeId, TrustDomain
from ca.pem import fingerprint

__all__ = ["FederationCreate", "FederationOut", "router"]

router = APIRouter(tags=["federation"])


class FederationCreate(RequestBody):
    trust_domain: str = Field(max_length=255, examples=["partner.org"])
    url: str = Field(max_length=2048, examples=["https://bundle.partner.org/v1/bundle.jwks"])
    profile: str = Field(examples=["https_spiffe"], description="https_web or https_spiffe")
    endpoint_spiffe_id: str | None = Field(
        default=None,
        max_length=2048,
        examples=["spiffe://partner.org/trellis/server"],
        description="https_spiffe: the SPIFFE ID the endpoint's X509-SVID must carry",
    )
    bootstrap_bundle: str | None = Field(
        default=None,
        max_length=60_000,
        description="https_spiffe: the partner's bundle (PEM or JWK Set) for the first fetch",
    )
    ca_pem: str | None = Field(
        default=None,
        max_length=60_000,
        description="https_web: PEM CA(s) to trust instead of the system store (private networks)",
    )


class FederationOut(BaseModel):
    trust_domain: str
    url: str
    profile: str
    endpoint_spiffe_id: str | None
    has_bundle: bool = Field(description="A good bundle has been fetched and is published")
    sequence: int | None = Field(description="spiffe_sequence of the last good bundle")
    refresh_hint: int | None
    authorities_sha256: list[str] = Field(description="Root certificates of the last good bundle")
    bundle_updated_at: dt.datetime | None
    last_success: dt.datetime | None
    last_attempt: dt.datetime | None
    last_error: str | None = Field(description="Why the last attempt failed (bundle kept)")
    next_refresh: dt.datetime
    created_at: dt.datetime

    @classmethod
    def of(cls, value: federation.Federation) -> FederationOut:
        return cls(
            trust_domain=str(value.trust_domain),
            url=value.url,
            profile=value.profile.value,
            endpoint_spiffe_id=str(value.endpoint_spiffe_id) if value.endpoint_spiffe_id else None,
            has_bundle=value.has_bundle,
            sequence=value.sequence,
            refresh_hint=value.refresh_hint,
            authorities_sha256=[fingerprint(cert) for cert in value.authorities],
            bundle_updated_at=value.bundle_updated_at,
            last_success=value.last_success,
            last_attempt=value.last_attempt,
            last_error=value.last_error,
            next_refresh=value.next_refresh,
            created_at=value.created_at,
        )


ADMIN = {**PROBLEM_RESPONSES, **responses(404)}


@router.post(
    "/v1/federation",
    response_model=FederationOut,
    status_code=status.HTTP_201_CREATED,
    responses={**PROBLEM_RESPONSES, **responses(409)},
    summary="Federate with a foreign trust domain; its bundle is fetched by the refresh job",
)
def add_federation(body: FederationCreate, ctx: CtxDep, admin: AdminDep) -> FederationOut:
    params = federation.FederationParams(
        trust_domain=TrustDomain.parse(body.trust_domain),
        url=body.url,
        profile=federation.Profile.parse(body.profile),
        endpoint_spiffe_id=SpiffeId.parse(body.endpoint_spiffe_id)
        if body.endpoint_spiffe_id
        else None,
        bootstrap_bundle=body.bootstrap_bundle.encode() if body.bootstrap_bundle else None,
        web_ca=body.ca_pem.encode() if body.ca_pem else None,
    )
    return FederationOut.of(federation.add_federation(ctx, params, actor=str(admin)))


@router.get("/v1/federation", response_model=list[FederationOut], responses=PROBLEM_RESPONSES)
def list_federations(ctx: CtxDep, _admin: AdminDep) -> list[FederationOut]:
    return [FederationOut.of(item) for item in federation.list_federations(ctx)]


@router.get("/v1/federation/{trust_domain}", response_model=FederationOut, responses=ADMIN)
def show_federation(trust_domain: str, ctx: CtxDep, _admin: AdminDep) -> FederationOut:
    return FederationOut.of(federation.get_federation(ctx, TrustDomain.parse(trust_domain)))


@router.delete("/v1/federation/{trust_domain}", response_model=FederationOut, responses=ADMIN)
def remove_federation(trust_domain: str, ctx: CtxDep, admin: AdminDep) -> FederationOut:
    """Forget the trust domain's bundle and stop polling it (SPIFFE Federation §6.3)."""
    return FederationOut.of(
        federation.remove_federation(ctx, TrustDomain.parse(trust_domain), actor=str(admin))
    )


@router.post(
    "/v1/federation/{trust_domain}/refresh",
    response_model=FederationOut,
    responses=ADMIN,
    summary="Fetch the trust domain's bundle now; 503 if that fails (the last good one is kept)",
)
def refresh_federation(trust_domain: str, ctx: CtxDep, _admin: AdminDep) -> FederationOut:
    td = TrustDomain.parse(trust_domain)
    result = federation.refresh_federation(ctx, td)
    if not result.ok:
        raise Unavailable(f"refreshing {td} failed, the last good bundle is kept: {result.error}")
    return FederationOut.of(federation.get_federation(ctx, td))


@router.get(
    "/v1/bundles",
    response_class=Response,
    responses={
        200: {
            "content": {"application/json": {}},
            "description": 'Bundle map: {"spiffe://<trust domain>": SPIFFE bundle (JWK Set)}',
        },
        **responses(503),
    },
    summary="Our bundle and every federated trust domain's last good bundle, no authentication",
)
def get_bundles(ctx: CtxDep) -> Response:
    headers = {"Cache-Control": f"public, max-age={min(ctx.settings.bundle_refresh_hint, 300)}"}
    document = federation.bundle_map(ctx)
    return Response(json.dumps(document), media_type="application/json", headers=headers)
