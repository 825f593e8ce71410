"""Unauthenticated endpoints: the trust bundle and health probes."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from api.deps import CtxDep
from api.problems import responses
from api.schemas import Health
from ca.authority import active_issuer, bundle_pem
from ca.errors import TrellisError
from ca.scheduler import job_statuses

router = APIRouter(tags=["public"])


@router.get(
    "/v1/bundle",
    response_class=Response,
    responses={
        200: {"content": {"application/x-pem-file": {}}, "description": "Root certificates"},
        **responses(503),
    },
    summary="The trust bundle (PEM), no authentication",
)
def get_bundle(ctx: CtxDep) -> Response:
    return Response(bundle_pem(ctx), media_type="application/x-pem-file")


@router.get("/healthz", response_model=Health, summary="The process is up")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    responses={503: {"model": Health, "description": "Database or keys unreachable"}},
    summary="The database answers and the issuing key can be used",
)
def readyz(ctx: CtxDep) -> Response:
    detail: dict[str, str] = {}
    try:
        with ctx.engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        detail["database"] = "ok"
    except sa.exc.SQLAlchemyError as exc:
        detail["database"] = f"unavailable: {type(exc).__name__}"
    try:
        ctx.keys.check()
        active_issuer(ctx)
        detail["keys"] = "ok"
    except TrellisError as exc:
        detail["keys"] = exc.detail
    except sa.exc.SQLAlchemyError:
        detail["keys"] = "unknown: database unavailable"
    ok = all(value == "ok" for value in detail.values())
    # Failing jobs are reported but do not take the replica out of rotation: it still issues.
    try:
        failing = [
            f"{j.name} ({j.consecutive_failures}x: {j.last_result[:80]})"
            for j in job_statuses(ctx)
            if j.failing
        ]
        detail["jobs"] = "failing: " + "; ".join(failing) if failing else "ok"
    except sa.exc.SQLAlchemyError:
        detail["jobs"] = "unknown"
    body = Health(status="ok" if ok else "unavailable", detail=detail)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)
