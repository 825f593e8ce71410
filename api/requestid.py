"""A request id on every request: taken from ``X-Request-ID`` when it is sane, else generated;
echoed in the response, put in problem bodies and recorded with revocations."""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable

from fastapi import Request, Response

__all__ = ["HEADER", "request_id_middleware"]

HEADER = "X-Request-ID"
_SANE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


async def request_id_middleware(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    given = request.headers.get(HEADER, "")
    request.state.request_id = given if _SANE.match(given) else uuid.uuid4().hex
    response = await call_next(request)
    response.headers[HEADER] = request.state.request_id
    return response
