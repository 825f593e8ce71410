"""RFC 9457 problem responses: the one place ``ca`` errors become HTTP statuses."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ca import errors
from ca.store import outage

__all__ = [
    "PROBLEM_RESPONSES",
    "Problem",
    "answering_problems",
    "install",
    "problem_response",
    "responses",
    "strip_validation_responses",
]

log = logging.getLogger("trellis.api")

MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://trellis.dev/problems/"

STATUS: dict[type[errors.TrellisError], int] = {
    errors.InvalidInput: 400,
    errors.AuthenticationFailed: 401,
    errors.PermissionDenied: 403,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.NotInitialised: 503,
    errors.Unavailable: 503,
    errors.InternalError: 500,
}


class Problem(BaseModel):
    """An RFC 9457 problem detail."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    request_id: str | None = None


def status_for(error: errors.TrellisError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def problem_response(
    status: int, code: str, title: str, detail: str, request: Request | None = None
) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None) if request is not None else None
    body = Problem(
        type=TYPE_BASE + code,
        title=title,
        status=status,
        detail=detail,
        code=code,
        request_id=request_id,
    )
    headers = {"WWW-Authenticate": 'Bearer realm="trellis"'} if status == 401 else None
    return JSONResponse(
        body.model_dump(), status_code=status, media_type=MEDIA_TYPE, headers=headers
    )


async def _trellis_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.TrellisError)
    status = status_for(exc)
    # The caller is told ``public``; where on this server the fault is goes to the log only.
    if status >= 500:
        log.error("request failed: %s", exc.detail)
    elif exc.public != exc.detail:
        log.info("request refused: %s", exc.detail)
    return problem_response(status, exc.code, exc.title, exc.public, request)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    said = first.get("msg", "invalid request")
    if first.get("type") == "string_pattern_mismatch":  # pydantic's message is its regex
        said = f"{str(first.get('input'))[:64]!r} is not a valid value"
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        detail = "a request body is required: a JSON object"  # was only "invalid request body"
    elif first.get("type") == "json_invalid":  # loc holds the offset: "12: JSON decode error"
        reason = (first.get("ctx") or {}).get("error", "")
        detail = f"the body is not valid JSON ({reason} at character {where})"
    else:
        detail = f"{where}: {said}" if where else "invalid request body"
    return problem_response(400, "invalid-request", "Invalid request", detail, request)


def _allowed_methods(request: Request) -> str:
    """Starlette names only the first route matching the path; RFC 9110 §15.5.6 wants all.
    ``create_app`` stores every route of the routers it mounts in ``app.state.routes``."""
    methods: set[str] = set()
    for route in getattr(request.app.state, "routes", ()):
        if route.path_regex.match(request.scope["path"]):
            methods |= set(route.methods or ())
    if "GET" in methods:  # answered by api.conditional.HeadAsGet
        methods.add("HEAD")
    return ", ".join(sorted(methods))


# Starlette's and FastAPI's own refusals. A 400 is a body they could not read (not UTF-8, JSON
# nested past the parser's recursion limit): the same ``invalid-request`` as one that does not
# parse or validate (``_validation_error``), whichever route read it.
_HTTP_CODES = {
    400: ("invalid-request", "Invalid request"),
    404: ("not-found", None),
    405: ("method-not-allowed", None),
    413: ("payload-too-large", None),
}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code, title = _HTTP_CODES.get(exc.status_code, ("http-error", None))
    detail = str(exc.detail)
    response = problem_response(exc.status_code, code, title or detail, detail, request)
    response.headers.update(exc.headers or {})
    if exc.status_code == 405:
        response.headers["Allow"] = _allowed_methods(request)
    return response


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    """A lost or refused database connection is the server's state, not the caller's fault:
    503, so clients retry (the pool replaces dead connections). Anything else stays a 500."""
    if outage.unreachable(exc):
        # The driver's reason: its type alone was the same for every cause (ca.store.outage).
        log.error("database unavailable: %s", outage.reason(exc))
        return problem_response(
            503,
            errors.Unavailable.code,
            errors.Unavailable.title,
            "the database cannot be reached right now",
            request,
        )
    return await _unexpected(request, exc)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return problem_response(
        500, "internal", "Internal error", "an unexpected error occurred", request
    )


_HANDLERS: dict[type[Exception], Callable[[Request, Exception], Awaitable[JSONResponse]]] = {
    errors.TrellisError: _trellis_error,
    RequestValidationError: _validation_error,
    StarletteHTTPException: _http_error,
    sa_exc.DBAPIError: _database_error,
    Exception: _unexpected,
}


def install(app: object) -> None:
    from fastapi import FastAPI

    assert isinstance(app, FastAPI)
    for cls, handler in _HANDLERS.items():
        app.add_exception_handler(cls, handler)


def answering_problems(endpoint: Callable[[Request], Awaitable[Response]]) -> ASGIApp:
    """``endpoint`` as an ASGI app whose exceptions become the same problem responses the
    application's handlers give (the closest class in the exception's MRO wins, as in
    Starlette): for routes served outside the FastAPI middleware stack (``api.app``)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request)
        except Exception as exc:
            handler = next(_HANDLERS[c] for c in type(exc).__mro__ if c in _HANDLERS)
            response = await handler(request, exc)
        await response(scope, receive, send)

    return app


_DESCRIPTIONS = {
    400: "Invalid input or not allowed by policy",
    401: "Missing or invalid credential",
    403: "Credential valid but not allowed here",
    404: "No such object",
    409: "Conflicts with the object's current state",
    413: "Request body larger than 64 KiB",
    503: "Authority not initialised or a backend is unavailable",
}


def responses(*statuses: int) -> dict[int | str, dict[str, object]]:
    """OpenAPI ``responses`` documenting the given statuses as problem documents."""
    return {
        status: {
            "model": Problem,
            "description": _DESCRIPTIONS[status],
            "content": {MEDIA_TYPE: {}},
        }
        for status in statuses
    }


# What every authenticated route can answer; routes add 404/409 where they can.
PROBLEM_RESPONSES = responses(400, 401, 403, 413, 503)


def strip_validation_responses(schema: dict[str, Any]) -> dict[str, Any]:
    """Validation failures are answered as 400 problems (see ``_validation_error``), never 422:
    remove FastAPI's automatic 422 documentation so generated clients expect what they get."""
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return schema
