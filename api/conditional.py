"""Conditional GET for resources served with an ``ETag``: ``If-None-Match`` as RFC 9110
§13.1.2 reads it (``*`` or a list of entity tags, compared weakly), which neither Starlette nor
FastAPI offers outside ``StaticFiles``; and HEAD for every GET route (RFC 9110 §9.1), which
FastAPI's routes, unlike Starlette's, do not answer."""

from __future__ import annotations

import hashlib
import re

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["HeadAsGet", "cacheable", "content_etag", "none_match"]

# entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE (RFC 9110 §8.8.3). etagc excludes DQUOTE but not
# the comma, so the list is checked as a whole and its tags are its quoted strings.
_OPAQUE = r'"[\x21\x23-\x7e\x80-\xff]*"'
_TAG = rf"(?:W/)?{_OPAQUE}"
_LIST = re.compile(rf"\s*(?:{_TAG}\s*)?(?:,\s*(?:{_TAG}\s*)?)*")  # unambiguous: linear


def none_match(if_none_match: str | None, etag: str) -> bool:
    """Whether a request with this ``If-None-Match`` gets ``304 Not Modified`` for the current
    representation, tagged ``etag``: ``*`` matches it; so does a listed tag whose opaque part is
    ``etag``'s, ``W/`` or not (weak comparison). A header that does not parse matches nothing,
    so the client gets the full answer."""
    if if_none_match is None:
        return False
    if if_none_match.strip() == "*":
        return True
    if not _LIST.fullmatch(if_none_match):
        return False
    ours = etag.removeprefix("W/")
    return ours in re.findall(_OPAQUE, if_none_match)


def content_etag(label: str | int, body: bytes) -> str:
    """A strong entity tag for ``body``: RFC 9110 §8.8.3 wants it to change whenever the
    representation does. A sequence or CRL number alone restarts at 1 for a new CA (``init
    --force``), and a client revalidating with the old tag would get 304 and keep trusting the
    replaced root, so a digest of the served bytes follows the readable label."""
    return f'"{label}-{hashlib.sha256(body).hexdigest()[:16]}"'


def cacheable(
    request: Request, body: bytes, *, etag: str, media_type: str, cache_control: str
) -> Response:
    """``body`` tagged ``etag``, or ``304 Not Modified`` when the request's ``If-None-Match``
    names it: without the body, but with the ``ETag`` and ``Cache-Control`` the 200 would have
    carried (RFC 9110 §15.4.5), so a cache refreshes what it holds."""
    headers = {"ETag": etag, "Cache-Control": cache_control}
    # RFC 9110 §5.3: a list field sent on several lines is one list, the lines joined by
    # commas; ``headers.get`` read the first line only, and a tag on the second got a 200.
    fields = request.headers.getlist("if-none-match")
    if none_match(", ".join(fields) if fields else None, etag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=media_type, headers=headers)


class HeadAsGet:
    """Answers HEAD as the GET of the same target would be answered, headers and status alike
    (``Content-Length`` and ``ETag`` included), without its body: RFC 9110 §9.1 wants every
    server to support both, and a cache or a monitoring probe revalidates with HEAD. The routes
    see a GET, so each GET route has its HEAD and none is written twice; the request id and the
    access log, outside this middleware, still see the HEAD."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)
