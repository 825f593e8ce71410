"""Unauthenticated endpoints: the trust bundle and health probes."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import sqlalchemy as sa
from cryptography import x509
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from api.conditional import cacheable, content_etag
from api.deps import CtxDep
from api.problems import responses
from api.schemas import Health
from ca import metrics, openvpn
from ca.authority import MESH, active_issuer, bundle_pem
from ca.bundle import read_bundle
from ca.config import Context
from ca.errors import TrellisError
from ca.jwks import bundle_jwks
from ca.readiness import check_issuing_cas, check_issuing_keys, check_schema
from ca.scheduler import job_statuses
from ca.store.db import check_ready

log = logging.getLogger("trellis.api")

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


@router.get(
    "/v1/bundle.jwks",
    response_class=Response,
    responses={
        200: {"content": {"application/json": {}}, "description": "SPIFFE bundle (JWK Set)"},
        304: {"description": "Not modified (If-None-Match, RFC 9110 §13.1.2)"},
        **responses(503),
    },
    summary="The trust bundle in SPIFFE format: usable as Istio's spiffeBundleUrl and as a "
    "federation bundle endpoint (https_web)",
)
def get_bundle_jwks(request: Request, ctx: CtxDep) -> Response:
    bundle = read_bundle(ctx, MESH)
    document = bundle_jwks(
        x509.load_pem_x509_certificates(bundle.pem),
        bundle.sequence,
        ctx.settings.bundle_refresh_hint,
    )
    body = json.dumps(document).encode()
    return cacheable(
        request,
        body,
        etag=content_etag(bundle.sequence, body),
        media_type="application/json",
        cache_control=f"public, max-age={min(ctx.settings.bundle_refresh_hint, 300)}",
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus exposition"}},
    summary="Prometheus metrics (no authentication: restrict by network policy)",
)
def get_metrics(ctx: CtxDep) -> Response:
    return Response(metrics.render(ctx), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz", response_model=Health, summary="The process is up")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    responses={
        503: {
            "model": Health,
            "description": (
                "Database or keys unreachable, an issuing CA not valid now, or a database"
                " schema newer than this replica's code"
            ),
        }
    },
    summary="The database answers and every issuing CA can issue",
)
def readyz(ctx: CtxDep) -> Response:
    detail: dict[str, str] = {}
    try:
        check_ready(ctx.engine)
        detail["database"] = "ok"
    except sa.exc.SQLAlchemyError as exc:
        # The kind only: anyone may read /readyz, and the driver's words name the database's
        # host and user (libpq's do). The reason is in the log of the requests it fails.
        detail["database"] = f"unavailable: {type(exc).__name__}"
    # A newer replica migrated the database during a rolling upgrade: this one is outdated.
    detail["schema"] = _checked(ctx, "schema", lambda: check_schema(ctx))
    detail["keys"] = _checked(ctx, "keys", lambda: (active_issuer(ctx), check_issuing_keys(ctx)))
    detail["ca"] = _checked(ctx, "ca", lambda: check_issuing_cas(ctx))
    try:
        crl_problem = openvpn.crl_health(ctx)
        if crl_problem:
            detail["openvpn_crl"] = _unready(ctx, "openvpn_crl", crl_problem)
        else:
            ctx.cache.pop(("readyz", "openvpn_crl"), None)
    except sa.exc.SQLAlchemyError:
        pass
    ok = all(value == "ok" for key, value in detail.items() if key != "openvpn_crl")
    # Failing jobs are reported but do not take the replica out of rotation: it still issues.
    try:
        failing = [  # this replica's concern: the cluster's jobs and its own node's
            f"{j.label} ({j.consecutive_failures}x: {_shortened(j.last_result)})"
            for j in job_statuses(ctx, node=ctx.settings.node_name)
            if j.failing
        ]
        detail["jobs"] = "failing: " + "; ".join(failing) if failing else "ok"
    except sa.exc.SQLAlchemyError:
        detail["jobs"] = "unknown"
    body = Health(status="ok" if ok else "unavailable", detail=detail)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


def _shortened(reason: str, limit: int = 80) -> str:
    """A failing job's reason in ``/readyz``, cut at the last word that fits and marked "…"
    (``trellis jobs list`` and ``GET /v1/jobs`` have it whole): cut mid-word without a mark,
    it read as the whole reason."""
    if len(reason) <= limit:
        return reason
    cut = reason[: limit - 1]
    if reason[limit - 1] != " " and " " in cut:
        cut = cut.rsplit(" ", 1)[0]  # a word the limit cut into
    return cut.rstrip(" ,;:") + "…"


def _checked(ctx: Context, part: str, check: Callable[[], object]) -> str:
    """``part``'s line in ``/readyz``: "ok" once ``check`` passes (forgetting the logged
    problem, so that its return is logged again), else what ``_unready`` makes of it."""
    try:
        check()
    except TrellisError as exc:
        return _unready(ctx, part, exc)
    except sa.exc.SQLAlchemyError:
        return "unknown: database unavailable"
    ctx.cache.pop(("readyz", part), None)
    return "ok"


def _unready(ctx: Context, part: str, problem: TrellisError) -> str:
    """``problem`` as an unauthenticated prober may read it (``public``: no path on this
    server); the operator's version, with the path to mend, goes to the log, once a change (the
    probe comes every few seconds)."""
    logged = ("readyz", part)
    if ctx.cache.get(logged) != problem.detail:
        ctx.cache[logged] = problem.detail
        log.warning("not ready: %s", problem.detail)
    return problem.public
