"""A request id on every request: taken from ``X-Request-ID`` when it is sane, else generated;
echoed in the response, put in problem bodies and log records, and recorded with revocations and
in every audit record of the request (``ca.audit.entry`` reads ``ca.logs.REQUEST_ID``).

A caller's id that starts with ``cli-`` (in any case) is replaced too: that prefix is the CLI's
(``ca.logs.CLI_REQUEST_PREFIX``), and a REST change recorded under it would pass, by its request
id, for a command run on the host (docs/api.md). Replaced, not refused: an id is the caller's
hint for correlating logs, and an unusable one never failed a request.

A plain ASGI middleware rather than ``@app.middleware("http")``: the latter wraps every response
in a streaming body and costs a few tenths of a millisecond per request, a measurable share of
an issuance (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ca.logs import CLI_REQUEST_PREFIX, REQUEST_ID

__all__ = ["HEADER", "RequestId"]

HEADER = "X-Request-ID"
_HEADER_BYTES = HEADER.lower().encode()
_SANE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
access = logging.getLogger("trellis.access")


def _usable(text: str) -> bool:
    return bool(_SANE.match(text)) and not text.lower().startswith(CLI_REQUEST_PREFIX)


class RequestId:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope.get("headers", []) if k == _HEADER_BYTES), b"")
        text = given.decode("latin-1")
        request_id = text if _usable(text) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = REQUEST_ID.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k != _HEADER_BYTES]
                headers.append((_HEADER_BYTES, request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            access.info(
                "%s %s %d",
                scope.get("method", ""),
                scope.get("path", ""),
                status,
                extra={"status": status, "ms": round((time.perf_counter() - started) * 1000, 2)},
            )
            REQUEST_ID.reset(token)
