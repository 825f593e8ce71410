"""SPIFFE federation: relationships with foreign trust domains (admin) and the bundle map
(no authentication, like ``/v1/bundle``).

The wire models are in ``api/schemas/federation.py``; ``cli/federation.py`` renders the same ones.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Response, status

from api.deps import AdminDep, CtxDep
from api.problems import PROBLEM_RESPONSES, responses
from api.schemas.federation import FederationCreate, FederationOut
from api.schemas.wire import TrustDomainText
from ca import federation
from ca.identity import SpiffeId, TrustDomain

__all__ = ["router"]

router = APIRouter(tags=["federation"])


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
def show_federation(trust_domain: TrustDomainText, ctx: CtxDep, _admin: AdminDep) -> FederationOut:
    return FederationOut.of(federation.get_federation(ctx, TrustDomain.parse(trust_domain)))


@router.delete("/v1/federation/{trust_domain}", response_model=FederationOut, responses=ADMIN)
def remove_federation(trust_domain: TrustDomainText, ctx: CtxDep, admin: AdminDep) -> FederationOut:
    """Forget the trust domain's bundle and stop polling it (SPIFFE Federation §6.3)."""
    return FederationOut.of(
        federation.remove_federation(ctx, TrustDomain.parse(trust_domain), actor=str(admin))
    )


@router.post(
    "/v1/federation/{trust_domain}/refresh",
    response_model=FederationOut,
    responses={**ADMIN, **responses(409)},
    summary="Fetch the trust domain's bundle now; 503 if that fails (the last good one is kept)",
)
def refresh_federation(
    trust_domain: TrustDomainText, ctx: CtxDep, admin: AdminDep
) -> FederationOut:
    td = TrustDomain.parse(trust_domain)
    return FederationOut.of(federation.refreshed_federation(ctx, td, actor=str(admin)))


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
