"""A request id on every request: taken from ``X-Request-ID`` when it is sane, else generated;
echoed in the response, put in problem bodies and recorded with revocations."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

from fastapi import Request, Response

from ca.logs import REQUEST_ID

__all__ = ["HEADER", "request_id_middleware"]

HEADER = "X-Request-ID"
_SANE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
access = logging.getLogger("trellis.access")


async def request_id_middleware(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    given = request.headers.get(HEADER, "")
    request.state.request_id = given if _SANE.match(given) else uuid.uuid4().hex
    token = REQUEST_ID.set(request.state.request_id)
    started = time.perf_counter()
    try:
        response = await call_next(request)
        response.headers[HEADER] = request.state.request_id
        access.info(
            "%s %s %d",
            request.method,
            request.url.path,
            response.status_code,
            extra={
                "status": response.status_code,
                "ms": round((time.perf_counter() - started) * 1000, 2),
            },
        )
        return response
    finally:
        REQUEST_ID.reset(token)
