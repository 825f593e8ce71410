"""RFC 9457 problem responses: the one place ``ca`` errors become HTTP statuses."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ca import errors

__all__ = ["PROBLEM_RESPONSES", "Problem", "install", "problem_response"]

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


def status_for(error: errors.TrellisError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def problem_response(status: int, code: str, title: str, detail: str) -> JSONResponse:
    body = Problem(type=TYPE_BASE + code, title=title, status=status, detail=detail, code=code)
    headers = {"WWW-Authenticate": 'Bearer realm="trellis"'} if status == 401 else None
    return JSONResponse(
        body.model_dump(), status_code=status, media_type=MEDIA_TYPE, headers=headers
    )


async def _trellis_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.TrellisError)
    status = status_for(exc)
    if status >= 500:
        log.error("request failed: %s", exc.detail)
    return problem_response(status, exc.code, exc.title, exc.detail)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    detail = f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request body"
    return problem_response(400, "invalid-request", "Invalid request", detail)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not-found", 405: "method-not-allowed", 413: "payload-too-large"}.get(
        exc.status_code, "http-error"
    )
    return problem_response(exc.status_code, code, str(exc.detail), str(exc.detail))


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return problem_response(500, "internal", "Internal error", "an unexpected error occurred")


def install(app: object) -> None:
    from fastapi import FastAPI

    assert isinstance(app, FastAPI)
    app.add_exception_handler(errors.TrellisError, _trellis_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


def _doc(status: int, description: str) -> dict[str, object]:
    return {"model": Problem, "description": description, "content": {MEDIA_TYPE: {}}}


PROBLEM_RESPONSES: dict[int | str, dict[str, object]] = {
    400: _doc(400, "Invalid input or not allowed by policy"),
    401: _doc(401, "Missing or invalid credential"),
    403: _doc(403, "Credential valid but not allowed here"),
    413: _doc(413, "Request body larger than 64 KiB"),
    503: _doc(503, "Authority not initialised or a backend is unavailable"),
}
