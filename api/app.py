"""The FastAPI application factory: routers, problem handlers, body limit. No logic lives here."""

from __future__ import annotations

from fastapi import FastAPI

from api import problems
from api.limits import BodyLimit
from api.routes import certificates, entries, public, svid, tokens
from ca.config import Context

__all__ = ["create_app"]


def create_app(ctx: Context) -> FastAPI:
    app = FastAPI(
        title="Trellis",
        version="0.1.0",
        summary="mTLS certificate authority and SPIFFE workload identity",
        description="Errors are RFC 9457 problem documents (application/problem+json).",
    )
    app.state.ctx = ctx
    for module in (svid, entries, tokens, certificates, public):
        app.include_router(module.router)
    problems.install(app)
    app.add_middleware(BodyLimit)
    return app
