"""Conditional GET for resources served with an ``ETag``: ``If-None-Match`` as RFC 9110
§13.1.2 reads it (``*`` or a list of entity tags, compared weakly), which neither Starlette nor
FastAPI offers outside ``StaticFiles``."""

from __future__ import annotations

import hashlib
import re

__all__ = ["content_etag", "none_match"]

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
