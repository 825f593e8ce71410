"""A path holding a control character names nothing: 404, before any route is matched.

Starlette compiles every route as ``^...$``, and Python's ``$`` also matches just before a
final newline, so ``/metrics%0A`` (the path decoded: ``/metrics\\n``) was served as
``/metrics``, ``POST /v1/entries%0A`` created an entry, and ``/v1/crl/mesh/root.crl%0A`` was
the CRL. A proxy in front that guards a path exactly (nginx ``location = /metrics { deny all;
}``) does not match the path with the newline, and passed it through. No Trellis path, and no
value of a path parameter (an id, a serial, a name), has a use for a control character (Unicode
Cc: C0, DEL, C1), so a path holding one, once percent-decoded as the router sees it, is an
unknown path (docs/api.md), for every route alike. U+0000 was already 404 in a path parameter
(``api.deps.well_formed_url``); it is one control character among the others here.
"""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from api.problems import problem_response
from ca.errors import NotFound

__all__ = ["PlainPath"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NAMES = {"\x00": "NUL", "\t": "TAB", "\n": "LF", "\r": "CR", "\x1b": "ESC", "\x7f": "DEL"}


class PlainPath:
    """Innermost of the middlewares (``api.app``): the 404 carries the request id, and a HEAD
    gets it without its body, as every other problem."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = _CONTROL.search(scope["path"]) if scope["type"] == "http" else None
        if found is None:
            await self.app(scope, receive, send)
            return
        char = found[0]
        named = f"{_NAMES[char]} (U+{ord(char):04X})" if char in _NAMES else f"U+{ord(char):04X}"
        response = problem_response(
            404,
            NotFound.code,
            NotFound.title,
            f"no such path: it holds {named}, a control character",
            Request(scope),
        )
        await response(scope, receive, send)
