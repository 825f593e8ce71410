"""The FastAPI application factory: routers, problem handlers, body limit. No logic lives here."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import ASGIApp, Receive, Scope, Send

from api import deps, problems, reference
from api.conditional import HeadAsGet
from api.limits import BodyLimit
from api.plainpath import PlainPath
from api.requestid import RequestId
from api.routes import (
    authorities,
    certificates,
    entries,
    federation,
    gateway,
    openvpn,
    public,
    revocation,
    svid,
    tokens,
)
from ca.config import Context

__all__ = ["YOUNG_THRESHOLD", "TrellisApi", "create_app", "freeze_startup_heap"]


class TrellisApi(FastAPI):
    """FastAPI, with the hottest routes answered before its middleware stack.

    ``hot`` maps (method, path) to a complete ASGI app of its own (request id, body limit,
    problem responses: ``api.routes.svid.hot_routes``). Routed through FastAPI's stack, an
    issuance also passed its error, telemetry and body-limit middlewares, the exception
    middleware, the exit-stack middleware and the router: ~35 µs of CPU per request, 4 to 5 %
    of an issuance (docs/benchmarks.md)."""

    hot: dict[tuple[str, str], ASGIApp]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            hot = self.hot.get((scope["method"], scope["path"]))
            if hot is not None:
                scope["app"] = self
                await hot(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def create_app(ctx: Context, *, plain_svid_routes: bool = True) -> TrellisApi:
    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        # The scheduler's audit sealer runs on this loop while it serves (ca.jobs.seal_audit).
        ctx.serving_loop = asyncio.get_running_loop()
        try:
            yield
        finally:
            ctx.serving_loop = None

    app = TrellisApi(
        lifespan=lifespan,
        title="Trellis",
        version="0.1.0",
        summary="mTLS certificate authority and SPIFFE workload identity",
        description="Errors are RFC 9457 problem documents (application/problem+json).",
        dependencies=[Depends(deps.well_formed_url)],
        docs_url=None,  # api.reference serves both, with pinned and hashed scripts
        redoc_url=None,
        # No path is served with a trailing slash, so one is an unknown path (404 problem).
        # Starlette's redirect answered it before authentication, with a Location built from
        # the Host header: ``Host: evil.example`` sent the client to https://evil.example/...
        redirect_slashes=False,
    )
    reference.install(app)
    app.state.ctx = ctx
    app.state.routes = []
    modules = (svid, entries, tokens, certificates, authorities, public, federation, gateway)
    routers = [m.router for m in modules]
    for router in [*routers, revocation.public, revocation.admin, openvpn.admin, openvpn.public]:
        app.include_router(router)
        app.state.routes.extend(router.routes)
    app.hot = svid.hot_routes() if plain_svid_routes else {}
    problems.install(app)
    app.add_middleware(PlainPath)  # innermost: its 404 is a problem like any other
    app.add_middleware(HeadAsGet)  # problem answers to a HEAD lose their body too
    app.add_middleware(BodyLimit)
    app.add_middleware(RequestId)  # outermost: even a 413 carries the request id

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = problems.strip_validation_responses(
                get_openapi(
                    title=app.title,
                    version=app.version,
                    summary=app.summary,
                    description=app.description,
                    routes=app.routes,
                )
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


# The cyclic collector's first threshold in a server process: Python's 700 is crossed by the
# objects of the requests in flight alone (each holds a CSR, a certificate, its rows and
# coroutines until its response goes out), so at c=16 two workers collected ~140 times a
# second between them, scanned objects that their reference counts were about to free anyway,
# promoted them, and so ran more than one full collection a second: 21 to 29 µs of CPU per
# certificate. Above that peak, collections are left to what they are for: garbage in
# reference cycles, of which issuance makes little (one collection in 8 s at c=16 with 10,000;
# docs/benchmarks.md, change 50). At most ~10,000 unreachable objects wait for it: a few MiB.
YOUNG_THRESHOLD = 10_000


def freeze_startup_heap() -> None:
    """Called once a server process has built everything it keeps (modules, app, context): the
    objects made so far live as long as the process, so the cyclic collector stops scanning
    them. Otherwise each of its full collections walks them all, some 70 ms with the worker's
    ~130,000 objects, and every request in flight at the time waits that long (the p99 tail in
    docs/benchmarks.md). From then on it collects at ``YOUNG_THRESHOLD``."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])
