"""SPIFFE Federation: fetching, validating and keeping foreign trust domains' bundles.

A federation relationship (SPIFFE Federation §5.1) names a foreign trust domain, the URL of its
bundle endpoint and the profile that authenticates that endpoint:

- ``https_web`` (§5.2.1): the server certificate is validated with web PKI, against the system
  store or, on private networks, the CA the operator gave (``--ca-file``), with hostname
  checking (RFC 6125).
- ``https_spiffe`` (§5.2.2, self-serving endpoints only): the server presents an X509-SVID whose
  only URI SAN must equal the configured endpoint SPIFFE ID, and its chain must verify to the
  LAST GOOD bundle of that trust domain (the operator's bootstrap bundle until a fetch has
  succeeded), so the partner can rotate roots without breaking the relationship. The server is
  identified by that SPIFFE ID, not by a host name: hostname checking is off.

A fetched bundle replaces the stored one only if it parses strictly (``ca.jwks.parse_jwks``:
JSON, CA certificates, JWK parameters matching their certificate), holds at least one X.509
authority, names no other trust domain, and its ``spiffe_sequence`` does not go backwards (an
equal sequence must mean equal authorities). On any failure, foreseen or not, the last good
bundle stays, the failure is recorded (``last_error``, ``last_attempt``) and the next attempt
waits for the usual interval. Bundles of different trust domains are never merged (§4.2, §7.3):
``bundle_map`` publishes one JWK Set per trust domain.

The network sits behind one function type (``Fetch``) so tests can swap it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlmodel import Session, col, select

from ca import audit
from ca.authority import MESH
from ca.bundle import read_bundle
from ca.checks import uri_sans
from ca.config import Context
from ca.csr import is_host
from ca.errors import Conflict, InvalidInput, NotFound, NotInitialised, TrellisError, Unavailable
from ca.identity import SpiffeId, TrustDomain
from ca.jwks import (
    DEFAULT_REFRESH_HINT,
    MAX_BUNDLE_BYTES,
    MAX_REFRESH_HINT,
    JwksBundle,
    bundle_jwks,
    checked_certificate,
    jwk_for,
    parse_jwks,
)
from ca.pem import certs_pem, fingerprint, load_certs
from ca.redact import masked_url
from ca.store import locks
from ca.store.models import AuthorityRow, FederatedBundleRow

if TYPE_CHECKING:
    import httpx

# httpx is imported where a bundle is fetched or a URL parsed, not here: with click installed
# (the CLI's) it imports its own command line, rich and pygments with it, 5 MiB in every API
# worker that never federates (docs/benchmarks.md).

__all__ = [
    "MAX_REFRESH",
    "MIN_REFRESH",
    "Endpoint",
    "Federation",
    "FederationParams",
    "Fetch",
    "Profile",
    "RefreshResult",
    "accept",
    "add_federation",
    "bundle_map",
    "fetch_bundle",
    "get_federation",
    "list_federations",
    "refresh_due",
    "refresh_federation",
    "refresh_federations",
    "refreshed_federation",
    "remove_federation",
]

log = logging.getLogger("trellis.federation")

MIN_REFRESH = 10  # seconds: a tiny spiffe_refresh_hint must not turn polling into a flood
# A larger hint is clamped to this, as SPIRE clamps hints: a partner must not be able to stop
# us polling it for months (and miss its next root rotation) by announcing a huge interval.
MAX_REFRESH = MAX_REFRESH_HINT
TIMEOUT = (10.0, 5.0)  # seconds: for a read, write or pool wait; to connect
DEADLINE = 30.0  # seconds for a whole fetch: connecting, headers, redirects, body, all of it
MAX_REDIRECTS = 3
# The statuses that redirect (RFC 9110 §15.4): not 300 (a choice for the user) nor 304 (a cache
# validation answer, for a conditional request Trellis never makes), which httpx counts too.
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_URL = 2048


class Profile(StrEnum):
    HTTPS_WEB = "https_web"
    HTTPS_SPIFFE = "https_spiffe"

    @classmethod
    def parse(cls, value: str) -> Profile:
        try:
            return cls(value)
        except ValueError:
            raise InvalidInput(
                f"unknown endpoint profile {value!r}: use https_web or https_spiffe"
            ) from None


def _endpoint_url(value: str) -> str:
    """§5.2.1.1 / §5.2.2.1: scheme https, no userinfo."""
    if len(value) > MAX_URL:
        raise InvalidInput(f"the bundle endpoint URL is longer than {MAX_URL} characters")
    import httpx

    try:
        url = httpx.URL(value)
        host, port = url.host, url.port  # the host is IDNA-decoded: xn--a is no host name
    except (httpx.InvalidURL, TypeError, UnicodeError):  # UnicodeError: idna.IDNAError
        raise InvalidInput(f"{value[:200]!r} is not a URL") from None
    if url.scheme != "https":
        raise InvalidInput("a bundle endpoint URL must be https:// (SPIFFE Federation §5.2)")
    if url.userinfo:
        raise InvalidInput("a bundle endpoint URL must not include userinfo")
    if not host:
        raise InvalidInput("the bundle endpoint URL has no host")
    # httpx keeps any host it can percent-encode ("exa mple.org", "a..b"): such a relationship
    # would only fail later, as a DNS error in last_error. The raw host is the A-label form.
    if not is_host(url.raw_host.decode("ascii", "replace")):
        raise InvalidInput(
            f"the bundle endpoint URL's host {host[:64]!r} is not a host name or an IP address"
        )
    if port is not None and not 1 <= port <= 65535:
        # httpx keeps any number, and the socket layer would connect to it modulo 65536
        raise InvalidInput(f"the bundle endpoint URL's port {port} is not in 1..65535")
    return str(url)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _authorities(
    certs: Sequence[x509.Certificate], trust_domain: TrustDomain, what: str
) -> tuple[x509.Certificate, ...]:
    """X.509 authorities of ``trust_domain``: at least one, all well-formed CAs, none naming
    another trust domain (a CA carrying a foreign trust domain ID is another domain's bundle:
    §7.3); a certificate listed twice is one authority."""
    if not certs:
        raise InvalidInput(f"{what} holds no X.509 authority")
    unique = {cert.public_bytes(serialization.Encoding.DER): cert for cert in certs}
    for cert in unique.values():
        checked_certificate(cert, what)
        if not _is_ca(cert):
            raise InvalidInput(f"{what}: {cert.subject.rfc4514_string()!r} is not a CA")
        for uri in uri_sans(cert):
            if uri[:9].lower() == "spiffe://" and not SpiffeId.parse(uri).member_of(trust_domain):
                raise InvalidInput(f"{what}: an authority names {uri}, not {trust_domain.id()}")
    return tuple(unique.values())


def _bootstrap(data: bytes, trust_domain: TrustDomain) -> tuple[x509.Certificate, ...]:
    """The operator's bundle for the first https_spiffe connection: PEM or a SPIFFE JWK Set."""
    if data.lstrip().startswith(b"{"):
        certs: Sequence[x509.Certificate] = parse_jwks(data).certificates
    else:
        try:
            certs = load_certs(data)
        except InvalidInput:
            raise InvalidInput("the bootstrap bundle is neither PEM nor a SPIFFE JWK Set") from None
    return _authorities(certs, trust_domain, "the bootstrap bundle")


def _web_ca(data: bytes) -> bytes:
    try:
        certs = load_certs(data)
        ssl.create_default_context(cadata=certs_pem(certs).decode())
    except (InvalidInput, ssl.SSLError, ValueError):
        raise InvalidInput("the CA file is not a PEM certificate bundle") from None
    return certs_pem(certs)


@dataclass(frozen=True, slots=True)
class FederationParams:
    trust_domain: TrustDomain
    url: str
    profile: Profile
    endpoint_spiffe_id: SpiffeId | None = None
    bootstrap_bundle: bytes | None = None  # https_spiffe: PEM or JWK Set
    web_ca: bytes | None = None  # https_web: PEM trust anchors instead of the system store

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", _endpoint_url(self.url))
        td = self.trust_domain
        if self.profile is Profile.HTTPS_WEB:
            if self.endpoint_spiffe_id is not None or self.bootstrap_bundle is not None:
                raise InvalidInput(
                    "an endpoint SPIFFE ID and a bootstrap bundle are for https_spiffe only"
                )
            return
        if self.web_ca is not None:
            raise InvalidInput(
                "a CA for the endpoint's TLS is for https_web only: https_spiffe trusts the bundle"
            )
        spiffe_id = self.endpoint_spiffe_id
        if spiffe_id is None or self.bootstrap_bundle is None:
            raise InvalidInput("https_spiffe needs an endpoint SPIFFE ID and a bootstrap bundle")
        if not spiffe_id.member_of(td) or spiffe_id.is_trust_domain_id:
            raise InvalidInput(
                f"the endpoint SPIFFE ID {spiffe_id} must be a workload ID in {td} "
                "(only self-serving https_spiffe endpoints are supported)"
            )


@dataclass(frozen=True, slots=True)
class Federation:
    """A relationship and its last good bundle (``authorities`` is empty before the first)."""

    trust_domain: TrustDomain
    url: str
    profile: Profile
    endpoint_spiffe_id: SpiffeId | None
    authorities: tuple[x509.Certificate, ...]
    sequence: int | None
    refresh_hint: int | None
    bundle_updated_at: dt.datetime | None
    last_success: dt.datetime | None
    last_attempt: dt.datetime | None
    last_error: str | None
    next_refresh: dt.datetime
    created_at: dt.datetime

    @property
    def has_bundle(self) -> bool:
        return bool(self.authorities)

    def jwks(self) -> dict[str, Any]:
        """The last good bundle as a SPIFFE JWK Set (sequence and hint as the partner sent)."""
        document: dict[str, Any] = {"keys": [jwk_for(cert) for cert in self.authorities]}
        if self.sequence is not None:
            document["spiffe_sequence"] = self.sequence
        if self.refresh_hint is not None:
            document["spiffe_refresh_hint"] = self.refresh_hint
        return document


def _view(row: FederatedBundleRow) -> Federation:
    return Federation(
        trust_domain=TrustDomain(row.trust_domain),
        url=row.url,
        profile=Profile(row.profile),
        endpoint_spiffe_id=SpiffeId.parse(row.endpoint_spiffe_id)
        if row.endpoint_spiffe_id
        else None,
        authorities=tuple(load_certs(row.bundle_pem.encode())) if row.bundle_pem else (),
        sequence=row.sequence,
        refresh_hint=row.refresh_hint,
        bundle_updated_at=row.bundle_updated_at,
        last_success=row.last_success,
        last_attempt=row.last_attempt,
        last_error=row.last_error,
        next_refresh=row.next_refresh,
        created_at=row.created_at,
    )


def _own_trust_domain(session: Session) -> TrustDomain:
    auth = session.get(AuthorityRow, MESH)
    if auth is None:
        raise NotInitialised("no trust domain yet: run 'trellis init' first")
    return TrustDomain(auth.trust_domain)


def add_federation(ctx: Context, params: FederationParams, *, actor: str = "local") -> Federation:
    """Record a relationship; the refresh job fetches its bundle at its next run."""
    td = params.trust_domain
    bootstrap = None
    if params.bootstrap_bundle is not None:
        bootstrap = certs_pem(_bootstrap(params.bootstrap_bundle, td)).decode()
    web_ca = _web_ca(params.web_ca).decode() if params.web_ca is not None else None
    now = ctx.clock.now()
    with Session(ctx.engine) as session:
        if td == _own_trust_domain(session):
            raise InvalidInput(f"{td} is this Trellis's own trust domain: federate with others")
        if session.get(FederatedBundleRow, td.name) is not None:
            raise Conflict(f"trust domain {td} is already federated: remove it first")
        row = FederatedBundleRow(
            trust_domain=td.name,
            url=params.url,
            profile=params.profile.value,
            endpoint_spiffe_id=str(params.endpoint_spiffe_id)
            if params.endpoint_spiffe_id
            else None,
            bootstrap_pem=bootstrap,
            web_ca_pem=web_ca,
            next_refresh=now,
            created_at=now,
        )
        session.add(row)
        audit.record(
            session,
            "federation.added",
            str(td.id()),
            actor=actor,
            at=now,
            detail={"url": params.url, "profile": params.profile.value},
        )
        try:
            session.commit()
        except sa.exc.IntegrityError:
            raise Conflict(f"trust domain {td} is already federated: remove it first") from None
        session.refresh(row)
        return _view(row)


def list_federations(ctx: Context) -> list[Federation]:
    with Session(ctx.engine) as session:
        rows = session.exec(
            select(FederatedBundleRow).order_by(col(FederatedBundleRow.trust_domain))
        )
        return [_view(row) for row in rows.all()]


def get_federation(ctx: Context, trust_domain: TrustDomain) -> Federation:
    with Session(ctx.engine) as session:
        row = session.get(FederatedBundleRow, trust_domain.name)
        if row is None:
            raise NotFound(f"trust domain {trust_domain} is not federated")
        return _view(row)


def remove_federation(
    ctx: Context, trust_domain: TrustDomain, *, actor: str = "local"
) -> Federation:
    """§6.3: forget the bundle and stop polling; validators drop it at their next read.

    Once: a second removal, even one made at the same moment, is a ``NotFound``. The row is
    read with the write lock taken (SQLite) or locked (PostgreSQL): read before, two removals
    both found it, and both were answered 200 and recorded."""
    with Session(ctx.engine) as session:
        locks.begin_write(session.connection())
        row = session.get(FederatedBundleRow, trust_domain.name, with_for_update=True)
        if row is None:
            raise NotFound(f"trust domain {trust_domain} is not federated")
        removed = _view(row)
        session.delete(row)
        audit.record(
            session, "federation.removed", str(trust_domain.id()), actor=actor, at=ctx.clock.now()
        )
        session.commit()
    return removed


# --- fetching ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """What one fetch needs: where, how to authenticate the server, and whom to expect."""

    trust_domain: TrustDomain
    url: str
    profile: Profile
    endpoint_spiffe_id: SpiffeId | None
    trust_pem: bytes | None  # https_spiffe: last good (else bootstrap) bundle; https_web: CA file


Fetch = Callable[[Endpoint], bytes]


def _tls_context(endpoint: Endpoint) -> ssl.SSLContext:
    if endpoint.profile is Profile.HTTPS_WEB:
        # Hostname checking on (RFC 6125, §5.2.1.4); a CA file replaces the system store.
        cadata = endpoint.trust_pem.decode() if endpoint.trust_pem else None
        context = ssl.create_default_context(cadata=cadata)
    else:
        if not endpoint.trust_pem:
            raise InvalidInput(f"no bundle to authenticate {endpoint.trust_domain}'s endpoint")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        # §5.2.2.4: the server is identified by its SPIFFE ID (checked after the handshake),
        # not by a host name; its chain must verify to the trust domain's bundle.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_REQUIRED
        context.verify_flags |= ssl.VERIFY_X509_STRICT
        context.load_verify_locations(cadata=endpoint.trust_pem.decode())
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _check_peer(response: httpx.Response, expected: SpiffeId) -> None:
    """§5.2.2.4: the server certificate is an X509-SVID for exactly the endpoint SPIFFE ID."""
    stream = response.extensions.get("network_stream")
    ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
    der = ssl_object.getpeercert(True) if ssl_object is not None else None
    if not der:
        raise Unavailable("could not read the bundle endpoint's certificate")
    cert = x509.load_der_x509_certificate(der)
    uris = uri_sans(cert)
    if _is_ca(cert) or uris != [str(expected)]:
        raise Unavailable(
            f"the bundle endpoint presented {', '.join(uris) or 'no SPIFFE ID'}, "
            f"not an X509-SVID for {expected}"
        )


async def _read_body(response: httpx.Response) -> bytes:
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BUNDLE_BYTES:
        raise InvalidInput("invalid SPIFFE bundle: larger than 1 MiB")
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > MAX_BUNDLE_BYTES:
            raise InvalidInput("invalid SPIFFE bundle: larger than 1 MiB")
    return bytes(body)


async def _get(endpoint: Endpoint, context: ssl.SSLContext) -> bytes:
    import httpx

    url = endpoint.url
    timeout = httpx.Timeout(TIMEOUT[0], connect=TIMEOUT[1])
    try:
        async with httpx.AsyncClient(
            verify=context, timeout=timeout, follow_redirects=False
        ) as client:
            for _ in range(MAX_REDIRECTS + 1):
                request = client.stream("GET", url, headers={"Accept": "application/json"})
                async with request as response:
                    if endpoint.endpoint_spiffe_id is not None:
                        _check_peer(response, endpoint.endpoint_spiffe_id)
                    status = response.status_code
                    if status in _REDIRECTS:  # httpx's is_redirect takes 300 and 304 too
                        location = response.headers.get("location")
                        if not location:
                            raise Unavailable(f"{url} answered HTTP {status} without Location")
                        target = str(response.url.join(location))
                        try:
                            url = _endpoint_url(target)
                        except InvalidInput as refused:  # the target's fault, not the URL's
                            raise Unavailable(
                                f"{url} redirected to {masked_url(target)[0][:200]}, which is"
                                f" refused: {refused.detail}"
                            ) from None
                        continue
                    if status != 200:
                        raise Unavailable(f"{url} answered HTTP {status}")
                    return await _read_body(response)
    except UnicodeError:
        # idna.IDNAError: httpx reads a redirect's Location (to offer it as next_request) even
        # when it follows none, and decodes its host there, before _endpoint_url can refuse it
        raise Unavailable(f"{url} redirected to an invalid host name") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        # httpx's timeouts can carry no message: name the exception then, never leave it blank
        raise Unavailable(f"cannot fetch {url}: {str(exc) or type(exc).__name__}") from None
    raise Unavailable(f"more than {MAX_REDIRECTS} redirects from {endpoint.url}")


def fetch_bundle(endpoint: Endpoint) -> bytes:
    """GET the bundle over HTTPS as the profile demands; redirects are followed (at most 3)
    only to URLs valid for the profile, with the same TLS checks (§5.2.1.4, §5.2.2.4).

    httpx's timeouts bound each connect and each read, not the whole: a server answering one
    byte at a time, headers included, would hold the refresh (and with it every other
    relationship's) for as long as it liked. The fetch runs on its own event loop under
    ``DEADLINE``, which cancels it wherever it is."""
    import asyncio

    context = _tls_context(endpoint)
    deadline = DEADLINE
    try:
        return asyncio.run(asyncio.wait_for(_get(endpoint, context), deadline))
    except TimeoutError:
        raise Unavailable(f"{endpoint.url} took longer than {deadline:g} s to answer") from None


def _endpoint(row: FederatedBundleRow) -> Endpoint:
    profile = Profile(row.profile)
    if profile is Profile.HTTPS_SPIFFE:
        trust = row.bundle_pem or row.bootstrap_pem  # §5.2.2.4: the latest available bundle
    else:
        trust = row.web_ca_pem
    return Endpoint(
        trust_domain=TrustDomain(row.trust_domain),
        url=row.url,
        profile=profile,
        endpoint_spiffe_id=SpiffeId.parse(row.endpoint_spiffe_id)
        if row.endpoint_spiffe_id
        else None,
        trust_pem=trust.encode() if trust else None,
    )


# --- accepting a fetched bundle ----------------------------------------------------------------


def _digest(certs: Sequence[x509.Certificate]) -> str:
    """Of the set of authorities: order does not make a different bundle."""
    ders = sorted(cert.public_bytes(serialization.Encoding.DER) for cert in certs)
    return hashlib.sha256(b"".join(ders)).hexdigest()


def accept(row: FederatedBundleRow, bundle: JwksBundle) -> bool:
    """Whether ``bundle`` may replace the last good one of ``row`` (raises if not); returns
    whether its authorities or sequence differ from what is stored."""
    certs = _authorities(bundle.certificates, TrustDomain(row.trust_domain), "the fetched bundle")
    digest = _digest(certs)
    if row.bundle_pem is not None and row.sequence is not None:
        if bundle.sequence is None:
            raise InvalidInput(
                f"the bundle has no spiffe_sequence; the last good had {row.sequence}"
            )
        if bundle.sequence < row.sequence:
            raise InvalidInput(
                f"spiffe_sequence went backwards ({bundle.sequence} < {row.sequence})"
            )
        if bundle.sequence == row.sequence and digest != row.digest:
            raise InvalidInput(
                f"spiffe_sequence {bundle.sequence} is unchanged but the authorities changed"
            )
    return digest != row.digest or bundle.sequence != row.sequence


def _roots_changed(row: FederatedBundleRow, bundle: JwksBundle) -> dict[str, Any] | None:
    """The audit detail of an accepted bundle whose authorities differ from the last good
    one's (the first bundle of a relationship included): which roots we trust for the partner
    is a security-relevant change, made by the partner's endpoint, not by an operator. None
    when the set is the same (a new ``spiffe_sequence`` or refresh hint alone, or the same
    roots in another order): a refresh every few minutes that changes nothing records
    nothing. Fingerprints: SHA-256 of each certificate's DER, as ``openssl x509 -fingerprint
    -sha256`` shows it (without colons)."""
    old = (
        {fingerprint(cert) for cert in load_certs(row.bundle_pem.encode())}
        if row.bundle_pem
        else set()
    )
    new = {fingerprint(cert) for cert in bundle.certificates}
    if old == new:
        return None
    return {
        "old_sequence": row.sequence,
        "new_sequence": bundle.sequence,
        "old_roots": len(old),
        "new_roots": len(new),
        "added": sorted(new - old),
        "removed": sorted(old - new),
    }


def _interval(hint: int | None) -> int:
    return min(MAX_REFRESH, max(MIN_REFRESH, DEFAULT_REFRESH_HINT if hint is None else hint))


@dataclass(frozen=True, slots=True)
class RefreshResult:
    trust_domain: TrustDomain
    ok: bool
    changed: bool
    sequence: int | None  # of the last good bundle after this attempt
    error: str | None
    # Removed (or removed and added again) while the refresh ran: nothing was applied, and
    # nothing failed either; the operator's own removal is no partner's fault.
    dropped: bool = False


@dataclass(frozen=True, slots=True)
class _Relationship:
    """The relationship a fetch was made for. The fetch runs with no transaction open, for up to
    ``DEADLINE``; meanwhile the relationship may be removed and another added for the same
    trust domain (the way to change one: there is no update). The result belongs to the
    relationship whose endpoint it came from and whose bundle authenticated that endpoint, and
    to no other: what decides whom we trust (§7.1: URL, profile, endpoint ID, bootstrap or CA
    file) and the moment it was added identify it, since a trust domain name does not."""

    trust_domain: str
    created_at: dt.datetime
    url: str
    profile: str
    endpoint_spiffe_id: str | None
    bootstrap_pem: str | None
    web_ca_pem: str | None

    @classmethod
    def of(cls, row: FederatedBundleRow) -> _Relationship:
        return cls(
            row.trust_domain,
            row.created_at,
            row.url,
            row.profile,
            row.endpoint_spiffe_id,
            row.bootstrap_pem,
            row.web_ca_pem,
        )

    def lock(self, session: Session, attempt: dt.datetime) -> FederatedBundleRow | None:
        """The row, write-locked, if it is still this relationship; else None. The identity is
        compared in the UPDATE that takes the lock, so that no remove and re-add can come
        between the check and the write (PostgreSQL re-checks the condition on the row it
        waited for). Taking the lock first also makes concurrent refreshers (replicas, the CLI)
        apply their results one after the other, each against the other's outcome."""
        table = FederatedBundleRow
        taken = session.execute(
            sa.update(table)
            .where(
                col(table.trust_domain) == self.trust_domain,
                col(table.created_at) == self.created_at,
                col(table.url) == self.url,
                col(table.profile) == self.profile,
                col(table.endpoint_spiffe_id).is_not_distinct_from(self.endpoint_spiffe_id),
                col(table.bootstrap_pem).is_not_distinct_from(self.bootstrap_pem),
                col(table.web_ca_pem).is_not_distinct_from(self.web_ca_pem),
            )
            .values(last_attempt=attempt)
        )
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            return None
        return session.get(table, self.trust_domain)


def refresh_federation(
    ctx: Context, trust_domain: TrustDomain, *, fetch: Fetch = fetch_bundle, actor: str = "local"
) -> RefreshResult:
    """Fetch and validate one trust domain's bundle now. A failure never raises: it is recorded,
    the last good bundle kept, and the next attempt waits for the usual interval (§6.2). That
    holds for a failure nobody foresaw as well (a bug, a value the database refuses): it is
    logged with its traceback and recorded like any other, so that one relationship can never
    be retried in a loop ahead of the others. No database transaction is open during the fetch;
    its result is applied only to the relationship it was fetched for (``_Relationship``).
    A bundle that changes the partner's roots is recorded in the audit trail under ``actor``
    (``_roots_changed``): ``scheduler`` for the refresh job, ``cli`` or the admin token.
    """
    with Session(ctx.engine) as session:
        row = session.get(FederatedBundleRow, trust_domain.name)
        if row is None:
            raise NotFound(f"trust domain {trust_domain} is not federated")
        endpoint = _endpoint(row)
        relationship = _Relationship.of(row)
    attempt = ctx.clock.now()
    try:
        return _attempt(ctx, relationship, endpoint, attempt, fetch, actor)
    except Exception as exc:
        log.exception("federation %s: the refresh failed unexpectedly", trust_domain)
        error = f"unexpected {type(exc).__name__} (logged with its traceback): {exc}"
        return _record_failure(ctx, relationship, attempt, error)


def _dropped(trust_domain: TrustDomain, *, fetched: bool = True) -> RefreshResult:
    error = (
        "the relationship was removed or replaced during the refresh: its result was dropped"
        if fetched
        else "the relationship was removed before its refresh: skipped"
    )
    # At info: every caller tells whoever asked (the CLI's 'warning:' line, REST's 404 or
    # 409), and it is an operator's removal, nobody's fault.
    log.info("federation %s: %s", trust_domain, error)
    return RefreshResult(trust_domain, False, False, None, error, dropped=True)


def _record_failure(
    ctx: Context, relationship: _Relationship, attempt: dt.datetime, error: str
) -> RefreshResult:
    """Record a failed attempt and nothing else, in a transaction of its own."""
    trust_domain = TrustDomain(relationship.trust_domain)
    with Session(ctx.engine) as session:
        row = relationship.lock(session, attempt)
        if row is None:
            return _dropped(trust_domain)
        row.last_error = error[:512]
        row.last_attempt = attempt
        row.next_refresh = attempt + dt.timedelta(seconds=_interval(row.refresh_hint))
        session.add(row)
        session.commit()
        sequence = row.sequence
    return RefreshResult(trust_domain, False, False, sequence, error)


def _attempt(
    ctx: Context,
    relationship: _Relationship,
    endpoint: Endpoint,
    attempt: dt.datetime,
    fetch: Fetch,
    actor: str,
) -> RefreshResult:
    trust_domain = endpoint.trust_domain
    bundle: JwksBundle | None = None
    error: str | None = None
    try:
        bundle = parse_jwks(fetch(endpoint))
    except TrellisError as exc:
        error = exc.detail
    except (ssl.SSLError, OSError) as exc:  # e.g. an unusable stored trust bundle
        error = f"{type(exc).__name__}: {exc}"
    with Session(ctx.engine) as session:
        row = relationship.lock(session, attempt)
        if row is None:
            return _dropped(trust_domain)
        changed = False
        if bundle is not None:
            try:
                changed = accept(row, bundle)
            except InvalidInput as exc:
                error = exc.detail
            else:
                roots = _roots_changed(row, bundle)
                if roots is not None:
                    audit.record(
                        session,
                        "federation.roots-changed",
                        str(trust_domain.id()),
                        actor=actor,
                        at=attempt,
                        detail=roots,
                    )
                if changed:
                    row.bundle_pem = bundle.pem.decode()
                    row.digest = _digest(bundle.certificates)
                    row.sequence = bundle.sequence
                    row.bundle_updated_at = attempt
                hint = bundle.refresh_hint
                # Bounded as Trellis polls (``_refresh_seconds``), and so published: a hint of
                # 0 was passed on to every reader of the bundle map as "poll at once, always".
                row.refresh_hint = (
                    None if hint is None else min(max(hint, MIN_REFRESH), MAX_REFRESH)
                )
                row.last_success = attempt
        row.last_error = error[:512] if error else None
        row.last_attempt = attempt
        row.next_refresh = attempt + dt.timedelta(seconds=_interval(row.refresh_hint))
        session.add(row)
        session.commit()
        sequence = row.sequence
    if error:
        # At info: the caller reports it (the CLI's FAILED line and exit 8, REST's 503), and in
        # a server the failing job logs it as a warning, once while it lasts (ca.scheduler). A
        # warning here was the same news again on a command's stderr.
        log.info("federation %s: kept the last good bundle: %s", trust_domain, error)
    elif changed:
        log.info("federation %s: new bundle, sequence %s", trust_domain, sequence)
    return RefreshResult(trust_domain, error is None, changed, sequence, error)


def refresh_federations(
    ctx: Context,
    trust_domains: Sequence[TrustDomain] = (),
    *,
    fetch: Fetch = fetch_bundle,
    actor: str = "local",
) -> list[RefreshResult]:
    """Refresh the named trust domains (every federated one if none is named), due or not. A
    name that is not federated is refused (``NotFound``) before anything is fetched; one
    removed once the refresh has begun (it fetches one relationship after the other, each for
    up to ``DEADLINE``) is a ``dropped`` result, as one removed during its own fetch is."""
    names = list(trust_domains)
    for name in names:
        get_federation(ctx, name)
    results = []
    for name in names or [f.trust_domain for f in list_federations(ctx)]:
        try:
            results.append(refresh_federation(ctx, name, fetch=fetch, actor=actor))
        except NotFound:
            results.append(_dropped(name, fetched=False))
    return results


def refreshed_federation(
    ctx: Context, trust_domain: TrustDomain, *, fetch: Fetch = fetch_bundle, actor: str = "local"
) -> Federation:
    """``refresh_federation`` for a caller who named one trust domain and waits for it
    (``POST /v1/federation/{td}/refresh``): the relationship as the refresh left it, or why
    not. A relationship removed during its fetch is ``NotFound``, as one removed before it:
    the operator's removal is nobody's outage (``trellis federation refresh`` skips it). One
    removed and added again meanwhile is ``Conflict``: the result was dropped, and the new
    relationship, which exists, was not refreshed. A fetch that failed is ``Unavailable``."""
    result = refresh_federation(ctx, trust_domain, fetch=fetch, actor=actor)
    if result.dropped:
        try:
            get_federation(ctx, trust_domain)
        except NotFound:
            raise NotFound(
                f"trust domain {trust_domain} is not federated: the relationship was removed"
                " during its refresh"
            ) from None
        raise Conflict(
            f"the relationship with {trust_domain} was replaced during its refresh: the result"
            " was dropped, and the new relationship was not refreshed (refresh it again)"
        )
    if not result.ok:
        kept = (
            "the last good bundle is kept"
            if get_federation(ctx, trust_domain).has_bundle
            else "no bundle fetched yet"
        )
        raise Unavailable(f"refreshing {trust_domain} failed, {kept}: {result.error}")
    return get_federation(ctx, trust_domain)


def refresh_due(ctx: Context, *, fetch: Fetch = fetch_bundle) -> list[RefreshResult]:
    """The scheduler's job: refresh every relationship whose refresh hint has elapsed."""
    with Session(ctx.engine) as session:
        names = session.exec(
            select(FederatedBundleRow.trust_domain).where(
                col(FederatedBundleRow.next_refresh) <= ctx.clock.now()
            )
        ).all()
    results = []
    for name in names:
        try:
            results.append(
                refresh_federation(ctx, TrustDomain(name), fetch=fetch, actor="scheduler")
            )
        except NotFound:
            continue  # removed since the query
    return results


# --- publishing --------------------------------------------------------------------------------


def bundle_map(ctx: Context) -> dict[str, dict[str, Any]]:
    """``{"spiffe://<td>": JWK Set}``: our own bundle and every federated trust domain's last
    good bundle, each under its own trust domain (never merged)."""
    with Session(ctx.engine) as session:
        own = _own_trust_domain(session)
        rows = session.exec(
            select(FederatedBundleRow)
            .where(col(FederatedBundleRow.bundle_pem).is_not(None))
            .order_by(col(FederatedBundleRow.trust_domain))
        ).all()
        federated = [_view(row) for row in rows]
    bundle = read_bundle(ctx, MESH)
    result = {
        str(own.id()): bundle_jwks(
            x509.load_pem_x509_certificates(bundle.pem),
            bundle.sequence,
            ctx.settings.bundle_refresh_hint,
        )
    }
    for federation in federated:
        if federation.trust_domain != own:
            result[str(federation.trust_domain.id())] = federation.jwks()
    return result
