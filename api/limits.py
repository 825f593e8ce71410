"""Refuse request bodies over 64 KiB before anything parses them (a CSR is a few KiB)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import problem_response

__all__ = ["MAX_BODY", "BodyLimit"]

MAX_BODY = 64 * 1024


async def _reply_413(scope: Scope, receive: Receive, send: Send) -> None:
    """The problem every other refusal is (``api.problems``), request id included; the
    connection closes, as the rest of the body is never read."""
    response = problem_response(
        413,
        "payload-too-large",
        "Payload too large",
        f"request bodies are limited to {MAX_BODY} bytes",
        Request(scope),
    )
    response.headers["connection"] = "close"
    await response(scope, receive, send)


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: int = MAX_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await _reply_413(scope, receive, send)
                return
        seen = 0
        refused = False

        async def limited_receive() -> Message:
            # Past the limit, answer 413 ourselves and tell the app the client went away; whatever
            # the app then tries to send is dropped.
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    refused = True
                    await _reply_413(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)
