"""Fetching over real HTTPS (a local ``BundleServer``): how each profile authenticates the
endpoint, and the limits on what it may answer. The store plays no part here: SQLite only."""

from __future__ import annotations

import datetime as dt
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ca import federation
from ca.clock import FixedClock
from ca.config import Context
from ca.federation import (
    Endpoint,
    FederationParams,
    Profile,
    RefreshResult,
    add_federation,
    fetch_bundle,
    get_federation,
    refresh_federation,
    remove_federation,
)
from ca.identity import SpiffeId
from ca.pem import certs_pem
from tests.federation.fedkit import (
    PARTNER,
    PARTNER_SERVER,
    Answer,
    BundleServer,
    Partner,
    make_partner,
)

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def endpoint(partner: Partner) -> Iterator[BundleServer]:
    """The partner's bundle endpoint, served with its own serving certificate (IP 127.0.0.1)."""
    tls = partner.server_tls()
    server = BundleServer(tls.cert_path, tls.key_path)
    server.answer = Answer(body=partner.jwks(1))
    yield server
    server.close()


def spiffe(
    ctx: Context,
    partner: Partner,
    url: str,
    *,
    endpoint_id: SpiffeId = PARTNER_SERVER,
    bootstrap: bytes | None = None,
) -> None:
    params = FederationParams(
        PARTNER,
        url,
        Profile.HTTPS_SPIFFE,
        endpoint_spiffe_id=endpoint_id,
        bootstrap_bundle=bootstrap or certs_pem(partner.roots),
    )
    add_federation(ctx, params)


def web(ctx: Context, url: str, ca: bytes | None) -> None:
    add_federation(ctx, FederationParams(PARTNER, url, Profile.HTTPS_WEB, web_ca=ca))


def error_of(ctx: Context) -> str:
    result = refresh_federation(ctx, PARTNER)
    assert not result.ok and result.error
    assert not get_federation(ctx, PARTNER).has_bundle
    return result.error


def test_https_spiffe(ctx: Context, partner: Partner, endpoint: BundleServer) -> None:
    spiffe(ctx, partner, endpoint.url)
    result = refresh_federation(ctx, PARTNER)
    assert result.ok, result.error
    assert get_federation(ctx, PARTNER).authorities == tuple(partner.roots)


def test_https_spiffe_wants_exactly_the_endpoint_spiffe_id(
    ctx: Context, partner: Partner, endpoint: BundleServer
) -> None:
    other = SpiffeId.parse("spiffe://b.test/bundle-server")
    spiffe(ctx, partner, endpoint.url, endpoint_id=other)
    error = error_of(ctx)
    assert "presented spiffe://b.test/trellis/server" in error
    assert "not an X509-SVID for spiffe://b.test/bundle-server" in error


def test_https_spiffe_verifies_the_chain_to_the_bundle(
    ctx: Context, partner: Partner, endpoint: BundleServer, tmp_path: Path, clock: FixedClock
) -> None:
    """An impostor CA for the same trust domain name: same names, other keys."""
    impostor = make_partner(tmp_path / "impostor", clock)
    try:
        spiffe(ctx, partner, endpoint.url, bootstrap=certs_pem(impostor.roots))
        assert "certificate verify failed" in error_of(ctx)
    finally:
        impostor.ctx.close()


def test_https_spiffe_checks_no_host_name_https_web_does(
    ctx: Context, partner: Partner, tmp_path: Path
) -> None:
    """A certificate for other.test only, served on 127.0.0.1: fine for https_spiffe (the
    server is identified by its SPIFFE ID), refused for https_web (RFC 6125)."""
    cert, key = partner.server_cert(tmp_path / "tls", ["other.test"])
    server = BundleServer(cert, key)
    server.answer = Answer(body=partner.jwks(1))
    try:
        spiffe_endpoint = Endpoint(
            PARTNER, server.url, Profile.HTTPS_SPIFFE, PARTNER_SERVER, certs_pem(partner.roots)
        )
        assert fetch_bundle(spiffe_endpoint) == partner.jwks(1)
        web(ctx, server.url, certs_pem(partner.roots))
        assert "IP address mismatch" in error_of(ctx)
    finally:
        server.close()


def test_https_web_with_a_ca_file(ctx: Context, partner: Partner, endpoint: BundleServer) -> None:
    web(ctx, endpoint.url, certs_pem(partner.roots))
    assert refresh_federation(ctx, PARTNER).ok


def test_https_web_trusts_the_system_store_by_default(
    ctx: Context, partner: Partner, endpoint: BundleServer
) -> None:
    web(ctx, endpoint.url, None)
    assert "certificate verify failed" in error_of(ctx)


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        pytest.param(Answer(status=500, body=b"oops"), "answered HTTP 500", id="fail/http-500"),
        pytest.param(Answer(status=404), "answered HTTP 404", id="fail/http-404"),
        pytest.param(
            Answer(body=b"[" * (1024 * 1024 + 1)), "larger than 1 MiB", id="fail/over-1-MiB"
        ),
        pytest.param(
            Answer(status=302, headers={"Location": "http://127.0.0.1/plain"}),
            "must be https://",
            id="fail/redirect-to-http",
        ),
        pytest.param(
            Answer(status=307, headers={"Location": "/again"}),
            "more than 3 redirects",
            id="fail/redirect-loop",
        ),
        pytest.param(
            Answer(status=302), "answered HTTP 302 without Location", id="fail/redirect-nowhere"
        ),
        pytest.param(  # httpx decodes the host before Trellis sees the URL
            Answer(status=301, headers={"Location": "https://xn--a.org/x"}),
            "/bundle redirected to an invalid host name",
            id="fail/redirect-to-bad-idna",
        ),
    ],
)
def test_what_the_endpoint_may_answer(
    ctx: Context, partner: Partner, endpoint: BundleServer, answer: Answer, reason: str
) -> None:
    endpoint.answer = answer
    spiffe(ctx, partner, endpoint.url)
    error = error_of(ctx)
    assert reason in error and "unexpected" not in error


def test_redirects_are_followed_with_the_same_checks(
    ctx: Context, partner: Partner, endpoint: BundleServer
) -> None:
    """Federation §5.2.2.4: the target of a redirect must present the same SPIFFE ID (it is
    checked on every hop; here the same server answers both)."""
    endpoint.answer = Answer(status=307, headers={"Location": "/moved"})
    endpoint.routes["/moved"] = Answer(body=partner.jwks(2))
    spiffe(ctx, partner, endpoint.url)
    result = refresh_federation(ctx, PARTNER)
    assert result.ok and result.sequence == 2, result.error
    assert endpoint.requests == 2


def test_nothing_listens(ctx: Context, partner: Partner) -> None:
    from tests.conftest import free_port

    spiffe(ctx, partner, f"https://127.0.0.1:{free_port()}/bundle")
    assert "cannot fetch" in error_of(ctx)


def test_the_deadline_covers_the_headers(
    ctx: Context, partner: Partner, endpoint: BundleServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server sending its status line and headers one byte at a time, each within the read
    timeout, is cut off at the deadline for the whole fetch (30 s; 1 s here) like one dripping
    its body: otherwise it holds the refresh job, and every other relationship, for as long as
    it likes."""
    monkeypatch.setattr(federation, "DEADLINE", 1.0)
    endpoint.answer = Answer(body=partner.jwks(1), drip=0.05)  # ~5 s of headers
    spiffe(ctx, partner, endpoint.url)
    started = time.monotonic()
    error = error_of(ctx)
    assert time.monotonic() - started < 3
    assert error == f"{endpoint.url} took longer than 1 s to answer"


def test_a_handshake_that_never_ends_is_named(
    ctx: Context, partner: Partner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that accepts the connection and never answers the TLS handshake runs into the
    connect timeout, whose exception carries no message: the recorded reason still says what
    happened (it ended in "cannot fetch <url>: ", nothing after the colon)."""
    monkeypatch.setattr(federation, "TIMEOUT", (federation.TIMEOUT[0], 0.3))
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"https://127.0.0.1:{silent.getsockname()[1]}/bundle"
        spiffe(ctx, partner, url)
        error = error_of(ctx)
    assert error == f"cannot fetch {url}: ConnectTimeout"


def test_a_fetch_in_flight_lands_in_no_relationship_added_since(
    ctx: Context, partner: Partner, endpoint: BundleServer, tmp_path: Path, clock: FixedClock
) -> None:
    """A refresh fetches with no transaction open. An operator who removes a suspicious
    relationship and adds the right one meanwhile must not find the bundle fetched from the
    old endpoint (authenticated with the old bootstrap bundle) in the new relationship: an
    attacker's CA, published at /v1/bundles, with a sequence the partner cannot reach."""
    hostile = make_partner(tmp_path / "hostile", clock)  # any CA: its roots in the bundle
    try:
        released = threading.Event()
        endpoint.routes["/evil"] = Answer(
            body=partner.jwks(40, [*partner.roots, *hostile.roots]), hold=released
        )
        spiffe(ctx, partner, endpoint.url.replace("/bundle", "/evil"))
        results: list[RefreshResult] = []
        slow = threading.Thread(target=lambda: results.append(refresh_federation(ctx, PARTNER)))
        slow.start()
        try:
            deadline = time.monotonic() + 5
            while endpoint.requests == 0:  # the fetch is in flight
                assert time.monotonic() < deadline
                time.sleep(0.01)
            remove_federation(ctx, PARTNER)
            clock.advance(dt.timedelta(seconds=1))
            spiffe(ctx, partner, endpoint.url)
        finally:
            released.set()
            slow.join(10)
        (result,) = results
        assert not result.ok and "removed or replaced during the refresh" in (result.error or "")
        fresh = get_federation(ctx, PARTNER)
        assert fresh.url == endpoint.url
        assert not fresh.has_bundle and fresh.sequence is None
        assert fresh.last_attempt is None and fresh.last_error is None
        # the new relationship's own fetch is not held back by the stale one
        assert refresh_federation(ctx, PARTNER).sequence == 1
        assert get_federation(ctx, PARTNER).authorities == tuple(partner.roots)
    finally:
        hostile.ctx.close()
