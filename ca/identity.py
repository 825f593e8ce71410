"""SPIFFE IDs and trust domains as validated value types.

Implements the SPIFFE-ID standard (spiffe/spiffe ``standards/SPIFFE-ID.md``): §2 (scheme, no
query or fragment), §2.1 (trust domain), §2.2 (path) and §2.3 (length limits). Parsing is done
by hand rather than with ``urllib.parse`` because that normalises and accepts things the spec
forbids (ports, userinfo, percent-encoding, dot segments). Every rejection raises
:class:`~ca.errors.InvalidSpiffeId` whose ``reason`` names the broken rule.

One deliberate leniency: upper-case ASCII letters in the scheme and trust domain are accepted
and normalised to lower-case (both are case-insensitive in RFC 3986 §3.1/§3.2.2), so the stored
and emitted form is always the canonical lower-case one. The path stays case-sensitive.
"""

from __future__ import annotations

import functools
import string
from dataclasses import dataclass

from ca.errors import InvalidSpiffeId

__all__ = ["MAX_ID_BYTES", "MAX_TRUST_DOMAIN_BYTES", "SERVER_PATH", "SpiffeId", "TrustDomain"]

SCHEME = "spiffe://"
MAX_ID_BYTES = 2048  # §2.3: implementations must support, and should not generate, more
MAX_TRUST_DOMAIN_BYTES = 255  # §2.3: the RFC 3986 host limit
# Trellis's own serving identity, spiffe://<td>/trellis/server: issued only to ``trellis serve``
# (``ca.entries.check_not_reserved`` keeps it out of entries) and required of the server by
# workload clients (``ca.serverconn``).
SERVER_PATH = "/trellis/server"
_TD_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")
_SEGMENT_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")


def _trust_domain_problem(name: str) -> str | None:
    """Why ``name`` is not a valid trust domain (§2.1), or None; upper case is tolerated."""
    if not name:
        return "trust domain is missing"
    if not name.isascii():
        return "non-ASCII characters are not allowed"
    if "@" in name:
        return "userinfo is not allowed"
    # Scanned in order, so that the first character at fault is named: a colon after a name
    # is a port, but the colons of an IP literal ("[::1]") come after its "[".
    for char in name.lower():
        if char == ":":
            return "trust domain contains a port"
        if char not in _TD_CHARS:
            return f"invalid character {char!r} in trust domain"
    if len(name) > MAX_TRUST_DOMAIN_BYTES:
        return f"trust domain exceeds {MAX_TRUST_DOMAIN_BYTES} bytes"
    return None


def _path_problem(path: str) -> str | None:
    """Why ``path`` is not a valid SPIFFE ID path (§2, §2.2), or None; "" is valid."""
    if not path:
        return None
    if not path.isascii():
        return "non-ASCII characters are not allowed"
    for char, rule in (("%", "percent-encoding"), ("?", "query"), ("#", "fragment")):
        if char in path:
            return f"{rule} is not allowed"
    if not path.startswith("/"):
        return "path must start with '/'"
    segments = path[1:].split("/")
    for index, segment in enumerate(segments):
        if not segment:
            last = index == len(segments) - 1
            return "path has a trailing slash" if last else "path has an empty segment"
        if segment in (".", ".."):
            return f"path segment {segment!r} is not allowed"
        for char in segment:
            if char not in _SEGMENT_CHARS:
                return f"invalid character {char!r} in path segment"
    return None


@dataclass(frozen=True, slots=True, order=True)
class TrustDomain:
    """A trust domain name (§2.1), always stored lower-case; constructing one validates it."""

    name: str

    def __post_init__(self) -> None:
        if (reason := _trust_domain_problem(self.name)) is not None:
            raise InvalidSpiffeId(self.name, reason)
        object.__setattr__(self, "name", self.name.lower())

    @classmethod
    def parse(cls, value: str) -> TrustDomain:
        """Accept a bare name (``example.org``) or its trust-domain ID (``spiffe://example.org``).

        Anything with ``://`` is parsed as an ID so a wrong scheme is reported as such; the ID
        must have no path, because a workload ID is not a trust domain.
        """
        if "://" in value:
            spiffe_id = SpiffeId.parse(value)
            if spiffe_id.path:
                raise InvalidSpiffeId(value, "trust domain ID must not have a path")
            return spiffe_id.trust_domain
        return cls(value)

    def id(self) -> SpiffeId:
        """The trust domain's own ID (empty path), as carried by its signing authority (§3.1)."""
        return SpiffeId(self, "")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    """A SPIFFE ID (§2): trust domain plus a path that is "" or ``/seg/seg``."""

    trust_domain: TrustDomain
    path: str

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            raise TypeError("trust_domain must be a TrustDomain")
        value = f"{SCHEME}{self.trust_domain}{self.path}"
        if (reason := _path_problem(self.path)) is not None:
            raise InvalidSpiffeId(value, reason)
        if len(value.encode()) > MAX_ID_BYTES:
            raise InvalidSpiffeId(value, f"ID exceeds {MAX_ID_BYTES} bytes")

    @classmethod
    def parse(cls, value: str) -> SpiffeId:
        """Parse ``spiffe://<trust-domain><path>``, reporting the first rule the input breaks."""
        return _parse_spiffe_id(value)

    @classmethod
    def from_path(cls, trust_domain: TrustDomain, path: str) -> SpiffeId:
        """Build an ID in ``trust_domain`` from a path such as ``/ns/default/sa/web`` (§2.2)."""
        return cls(trust_domain, path)

    def member_of(self, trust_domain: TrustDomain) -> bool:
        """Whether this ID was issued in ``trust_domain``, the root of its trust (§3.1)."""
        return self.trust_domain == trust_domain

    @property
    def is_trust_domain_id(self) -> bool:
        """True for the trust domain's own ID (no path), e.g. a signing authority's (§3.1)."""
        return not self.path

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}{self.path}"


@functools.lru_cache(maxsize=8192)
def _parse_spiffe_id(value: str) -> SpiffeId:
    """``SpiffeId.parse``. Cached: an ID is an immutable value, and an issuance parsed the same
    few IDs three times over (its entry's, its CSR's, its certificate's), ~10 µs each. Invalid
    input raises, and exceptions are not cached."""
    if not value:
        raise InvalidSpiffeId(value, "ID is empty")
    if not value.isascii():  # §2.3: RFC 3986 URIs are ASCII only
        raise InvalidSpiffeId(value, "non-ASCII characters are not allowed")
    if len(value) > MAX_ID_BYTES:
        raise InvalidSpiffeId(value, f"ID exceeds {MAX_ID_BYTES} bytes")
    if value[: len(SCHEME)].lower() != SCHEME:
        raise InvalidSpiffeId(value, "scheme must be spiffe (expected 'spiffe://')")
    rest = value[len(SCHEME) :]
    for char, rule in (("#", "fragment"), ("?", "query"), ("%", "percent-encoding")):
        if char in rest:
            raise InvalidSpiffeId(value, f"{rule} is not allowed")
    authority, slash, path = rest.partition("/")
    path = slash + path
    reason = _trust_domain_problem(authority) or _path_problem(path)
    if reason is not None:
        raise InvalidSpiffeId(value, reason)
    return SpiffeId(TrustDomain(authority), path)
