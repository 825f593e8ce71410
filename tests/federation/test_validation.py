"""Federation rules without a network: what a relationship may be, which fetched bundles are
accepted, that a rejected one never replaces the last good bundle, and when bundles are due.
Every test runs on SQLite and PostgreSQL (the ``ctx`` fixture)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from ca import audit
from ca.authority import active_issuer
from ca.clock import FixedClock
from ca.config import Context
from ca.errors import Conflict, InvalidInput, NotFound, NotInitialised, Unavailable
from ca.federation import (
    MAX_REFRESH,
    Endpoint,
    FederationParams,
    Profile,
    add_federation,
    bundle_map,
    get_federation,
    list_federations,
    refresh_due,
    refresh_federation,
    remove_federation,
)
from ca.identity import SpiffeId, TrustDomain
from ca.jobs import job_named
from ca.jwks import bundle_jwks
from ca.pem import certs_pem, fingerprint
from ca.root_rotation import rotate_root
from tests.federation.fedkit import (
    PARTNER,
    PARTNER_SERVER,
    FakeFetch,
    Partner,
    make_partner,
    malformed_ca,
    nested,
)

URL = "https://bundle.b.test/v1/bundle.jwks"
# What is stored and kept across refreshes (the sequence rules, progress, removal, the job) is
# tested on both databases; rules that do not depend on the store run on SQLite only.
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
# "--endpoint-spiffe-id", not the "--" inside an A-label such as xn--a.
CLI_FLAG = re.compile(r"(?<![\w-])--[a-z]")


def web(ctx: Context) -> None:
    add_federation(ctx, FederationParams(PARTNER, URL, Profile.HTTPS_WEB))


def roots_of(ctx: Context, td: TrustDomain = PARTNER) -> list[x509.Certificate]:
    return list(get_federation(ctx, td).authorities)


# --- what a relationship may be ------------------------------------------------------------

Params = Callable[[Partner, Context], FederationParams]


def _spiffe(**changes: object) -> Params:
    def build(partner: Partner, ctx: Context) -> FederationParams:
        values: dict[str, object] = {
            "trust_domain": PARTNER,
            "url": URL,
            "profile": Profile.HTTPS_SPIFFE,
            "endpoint_spiffe_id": PARTNER_SERVER,
            "bootstrap_bundle": certs_pem(partner.roots),
        }
        values.update(changes)
        return FederationParams(**values)  # type: ignore[arg-type]

    return build


def _leaf_pem(partner: Partner, ctx: Context) -> bytes:
    return partner.mint().certificate_pem


REFUSED: dict[str, tuple[Params, str]] = {
    "fail/own-trust-domain": (
        lambda p, c: FederationParams(TrustDomain("example.org"), URL, Profile.HTTPS_WEB),
        "own trust domain",
    ),
    "fail/url/http": (_spiffe(url="http://bundle.b.test/"), "must be https://"),
    "fail/url/userinfo": (_spiffe(url="https://user:pw@bundle.b.test/"), "userinfo"),
    "fail/url/not-a-url": (_spiffe(url="https://[::1/"), "not a URL"),
    "fail/url/idna-xn--a": (_spiffe(url="https://xn--a.org/b"), "not a URL"),
    "fail/url/idna-xn--zz": (_spiffe(url="https://xn--zz.org/b"), "not a URL"),
    "fail/url/port-99999": (_spiffe(url="https://127.0.0.1:99999/b"), "port 99999 is not in"),
    "fail/url/port-0": (_spiffe(url="https://127.0.0.1:0/b"), "port 0 is not in 1..65535"),
    "fail/url/host-space": (_spiffe(url="https://exa mple.org/b"), "is not a host name"),
    "fail/url/host-empty-label": (_spiffe(url="https://a..b/b"), "is not a host name"),
    "fail/url/host-underscore": (_spiffe(url="https://exa_mple.org/b"), "is not a host name"),
    "fail/spiffe/no-endpoint-id": (
        _spiffe(endpoint_spiffe_id=None),
        "https_spiffe needs an endpoint SPIFFE ID and a bootstrap bundle",
    ),
    "fail/spiffe/no-bootstrap": (_spiffe(bootstrap_bundle=None), "and a bootstrap bundle"),
    "fail/spiffe/endpoint-in-other-td": (
        _spiffe(endpoint_spiffe_id=SpiffeId.parse("spiffe://c.test/server")),
        "must be a workload ID in b.test",
    ),
    "fail/spiffe/endpoint-is-td-id": (
        _spiffe(endpoint_spiffe_id=PARTNER.id()),
        "must be a workload ID",
    ),
    "fail/spiffe/ca-file": (_spiffe(web_ca=b"x"), "TLS is for https_web only"),
    "fail/web/endpoint-id": (
        lambda p, c: FederationParams(
            PARTNER, URL, Profile.HTTPS_WEB, endpoint_spiffe_id=PARTNER_SERVER
        ),
        "an endpoint SPIFFE ID and a bootstrap bundle are for https_spiffe only",
    ),
    "fail/web/ca-file-garbage": (
        lambda p, c: FederationParams(PARTNER, URL, Profile.HTTPS_WEB, web_ca=b"garbage"),
        "not a PEM certificate bundle",
    ),
    "fail/bootstrap/garbage": (_spiffe(bootstrap_bundle=b"garbage"), "neither PEM nor"),
    "fail/bootstrap/not-json": (_spiffe(bootstrap_bundle=b"{nope"), "not JSON"),
    "fail/bootstrap/nested-jwks": (_spiffe(bootstrap_bundle=nested(20000)), "nested too deep"),
    "fail/bootstrap/ca-with-garbage-san": (
        _spiffe(bootstrap_bundle=certs_pem([malformed_ca("bad-san")])),
        "the certificate is malformed",
    ),
    "fail/bootstrap/basic-constraints-twice": (
        _spiffe(bootstrap_bundle=certs_pem([malformed_ca("basic-constraints-twice")])),
        "the certificate is malformed",
    ),
    "fail/bootstrap/leaf": (
        lambda p, c: _spiffe(bootstrap_bundle=_leaf_pem(p, c))(p, c),
        "is not a CA",
    ),
    "fail/bootstrap/other-trust-domain": (
        lambda p, c: _spiffe(bootstrap_bundle=active_issuer(c).bundle_pem)(p, c),
        "names spiffe://example.org",
    ),
}


@SQLITE_ONLY
@pytest.mark.parametrize("case", list(REFUSED), ids=list(REFUSED))
def test_refused_relationships(ctx: Context, partner: Partner, case: str) -> None:
    build, reason = REFUSED[case]
    with pytest.raises(InvalidInput) as caught:
        add_federation(ctx, build(partner, ctx))
    assert reason in caught.value.detail
    # The REST API gives the same reason: it names what is wrong, never a CLI flag.
    assert not CLI_FLAG.search(caught.value.detail), caught.value.detail
    assert list_federations(ctx) == []


def test_profile_names_are_checked() -> None:
    assert Profile.parse("https_spiffe") is Profile.HTTPS_SPIFFE
    with pytest.raises(InvalidInput, match="https_web or https_spiffe"):
        Profile.parse("http")


@SQLITE_ONLY
@pytest.mark.parametrize("form", ["pem", "jwks"])
def test_https_spiffe_relationship(ctx: Context, partner: Partner, form: str) -> None:
    bootstrap = certs_pem(partner.roots) if form == "pem" else partner.jwks(7)
    added = add_federation(ctx, _spiffe(bootstrap_bundle=bootstrap)(partner, ctx))
    assert added.profile is Profile.HTTPS_SPIFFE
    assert added.endpoint_spiffe_id == PARTNER_SERVER
    # The bootstrap bundle only authenticates the first fetch: nothing is published yet.
    assert not added.has_bundle and added.sequence is None
    assert list(bundle_map(ctx)) == ["spiffe://example.org"]
    with pytest.raises(Conflict):
        add_federation(ctx, _spiffe()(partner, ctx))


def test_remove(ctx: Context, partner: Partner) -> None:
    web(ctx)
    refresh_federation(ctx, PARTNER, fetch=FakeFetch([partner.jwks(1)]))
    assert "spiffe://b.test" in bundle_map(ctx)
    assert remove_federation(ctx, PARTNER).trust_domain == PARTNER
    assert list(bundle_map(ctx)) == ["spiffe://example.org"]
    for operation in (remove_federation, get_federation):
        with pytest.raises(NotFound):
            operation(ctx, PARTNER)
    with pytest.raises(NotFound):
        refresh_federation(ctx, PARTNER, fetch=FakeFetch())


@SQLITE_ONLY
def test_nothing_without_our_own_authority(bare_ctx: Context) -> None:
    with pytest.raises(NotInitialised):
        add_federation(bare_ctx, FederationParams(PARTNER, URL, Profile.HTTPS_WEB))


# --- fetched bundles: accepted, or rejected with the last good one kept ----------------------


def _mismatched_jwk(partner: Partner) -> bytes:
    document = json.loads(partner.jwks(6))
    other = partner.mint().certificate.public_key().public_numbers()  # type: ignore[union-attr]
    document["keys"][0]["x"] = base64.urlsafe_b64encode(other.x.to_bytes(48, "big")).decode()
    return json.dumps(document).encode()


def _non_ca(partner: Partner) -> bytes:
    return json.dumps(bundle_jwks([partner.mint().certificate], 6, 300)).encode()


def _intermediate(partner: Partner) -> x509.Certificate:
    """A CA certificate of b.test that is not in its bundle: "other content"."""
    return partner.issuer.certificate


BROKEN: dict[str, tuple[Callable[[Partner, Context], bytes], str]] = {
    "fail/not-json": (lambda p, c: b"<html>hello</html>", "not JSON"),
    "fail/no-keys-array": (lambda p, c: b'{"spiffe_sequence": 6}', "no 'keys' array"),
    "fail/non-ca-certificate": (lambda p, c: _non_ca(p), "not a CA"),
    "fail/jwk-does-not-match-x5c": (lambda p, c: _mismatched_jwk(p), "do not match"),
    "fail/lower-sequence": (lambda p, c: p.jwks(4), "went backwards (4 < 5)"),
    "fail/equal-sequence-other-content": (
        lambda p, c: p.jwks(5, [*p.roots, _intermediate(p)]),
        "unchanged but the authorities changed",
    ),
    "fail/sequence-dropped": (lambda p, c: p.jwks(None), "no spiffe_sequence"),
    "fail/no-authority": (lambda p, c: b'{"keys": [], "spiffe_sequence": 6}', "no X.509"),
    "fail/other-trust-domains-root": (
        lambda p, c: json.dumps(bundle_jwks(list(active_issuer(c).roots), 6, 300)).encode(),
        "names spiffe://example.org",
    ),
    "fail/larger-than-1-MiB": (lambda p, c: b" " * (1024 * 1024 + 1), "larger than 1 MiB"),
    "fail/nested-too-deeply": (lambda p, c: nested(100_000), "nested too deeply"),
    "fail/ca-with-garbage-san": (
        lambda p, c: json.dumps(bundle_jwks([malformed_ca("bad-san")], 6, 300)).encode(),
        "key 0: the certificate is malformed",
    ),
    "fail/ca-with-basic-constraints-twice": (
        lambda p, c: json.dumps(
            bundle_jwks([malformed_ca("basic-constraints-twice")], 6, 300)
        ).encode(),
        "key 0: the certificate is malformed",
    ),
    # the store holds signed 64-bit integers
    "fail/sequence-2^63": (lambda p, c: p.jwks(2**63), "larger than 9223372036854775807"),
    "fail/sequence-2^70": (lambda p, c: p.jwks(2**70), "larger than 9223372036854775807"),
}


# Parsing does not depend on the store: those cases run on SQLite; the sequence rules, which
# compare with what is stored, run on both databases.
STORE_SENSITIVE = {"fail/lower-sequence", "fail/equal-sequence-other-content"}
BROKEN_CASES = [pytest.param("sqlite", case, id=f"sqlite-{case}") for case in BROKEN] + [
    pytest.param("postgres", case, id=f"postgres-{case}", marks=pytest.mark.postgres)
    for case in sorted(STORE_SENSITIVE)
]


@pytest.mark.parametrize(("database_url", "case"), BROKEN_CASES, indirect=["database_url"])
def test_rejected_bundle_keeps_the_last_good_one(
    ctx: Context, clock: FixedClock, partner: Partner, case: str
) -> None:
    make, reason = BROKEN[case]
    web(ctx)
    first = clock.now()
    good = refresh_federation(ctx, PARTNER, fetch=FakeFetch([partner.jwks(5)]))
    assert good.ok and good.changed and good.sequence == 5
    good_map = bundle_map(ctx)["spiffe://b.test"]

    clock.advance(dt.timedelta(seconds=301))
    bad = refresh_federation(ctx, PARTNER, fetch=FakeFetch([make(partner, ctx)]))

    assert not bad.ok and not bad.changed
    assert bad.error is not None and reason in bad.error
    kept = get_federation(ctx, PARTNER)
    assert kept.authorities == tuple(partner.roots) and kept.sequence == 5
    assert kept.last_error == bad.error
    assert kept.last_success == first and kept.last_attempt == clock.now()
    assert bundle_map(ctx)["spiffe://b.test"] == good_map


@SQLITE_ONLY
def test_network_failure_keeps_the_last_good_one(
    ctx: Context, clock: FixedClock, partner: Partner
) -> None:
    def down(_endpoint: object) -> bytes:
        raise Unavailable("cannot fetch https://bundle.b.test: connection refused")

    web(ctx)
    refresh_federation(ctx, PARTNER, fetch=FakeFetch([partner.jwks(2)]))
    result = refresh_federation(ctx, PARTNER, fetch=down)
    assert not result.ok and "connection refused" in (result.error or "")
    assert roots_of(ctx) == partner.roots


def test_progress_is_accepted_and_clears_the_error(
    ctx: Context, clock: FixedClock, partner: Partner
) -> None:
    web(ctx)
    fetch = FakeFetch([partner.jwks(5), b"junk", partner.jwks(5), partner.jwks(6)])
    assert refresh_federation(ctx, PARTNER, fetch=fetch).changed
    assert not refresh_federation(ctx, PARTNER, fetch=fetch).ok
    same = refresh_federation(ctx, PARTNER, fetch=fetch)
    assert same.ok and not same.changed and get_federation(ctx, PARTNER).last_error is None
    newer = refresh_federation(ctx, PARTNER, fetch=fetch)
    assert newer.ok and newer.changed and newer.sequence == 6
    assert bundle_map(ctx)["spiffe://b.test"]["spiffe_sequence"] == 6


def _root_changes(ctx: Context) -> list[audit.AuditEntry]:
    return list(reversed(audit.list_audit(ctx, event="federation.roots-changed")))


def test_a_refresh_that_changes_the_partner_s_roots_is_audited(
    ctx: Context, clock: FixedClock, partner: Partner
) -> None:
    """Which roots we trust for a partner is decided by what its endpoint serves: each change
    (the first bundle too) is recorded, with who refreshed and the roots added and removed;
    a refresh that changes nothing, or only the sequence, records nothing."""
    web(ctx)
    first = [fingerprint(root) for root in partner.roots]
    rotate_root(partner.ctx)  # the partner publishes a second root
    both = list(active_issuer(partner.ctx).roots)
    second = sorted({fingerprint(root) for root in both} - set(first))
    fetch = FakeFetch([partner.jwks(1), partner.jwks(1), partner.jwks(2), partner.jwks(3, both)])
    refresh_federation(ctx, PARTNER, fetch=fetch, actor="cli")
    refresh_federation(ctx, PARTNER, fetch=fetch, actor="cli")  # the same bundle
    assert refresh_federation(ctx, PARTNER, fetch=fetch).changed  # a new sequence, same roots
    refresh_due(ctx, fetch=FakeFetch())  # not due: nothing fetched
    clock.advance(dt.timedelta(days=1))
    assert [r.changed for r in refresh_due(ctx, fetch=fetch)] == [True]
    changes = _root_changes(ctx)
    assert [(c.subject, c.actor) for c in changes] == [
        ("spiffe://b.test", "cli"),
        ("spiffe://b.test", "scheduler"),
    ]
    assert changes[0].detail == {
        "old_sequence": None,
        "new_sequence": 1,
        "old_roots": 0,
        "new_roots": 1,
        "added": first,
        "removed": [],
    }
    assert changes[1].detail == {
        "old_sequence": 2,
        "new_sequence": 3,
        "old_roots": 1,
        "new_roots": 2,
        "added": second,
        "removed": [],
    }
    # A rejected bundle changes nothing, so records nothing.
    refresh_federation(ctx, PARTNER, fetch=FakeFetch([partner.jwks(2)]))  # sequence backwards
    assert len(_root_changes(ctx)) == 2


@SQLITE_ONLY
def test_a_bundle_without_sequence_is_accepted_until_one_has_one(
    ctx: Context, partner: Partner
) -> None:
    """Federation §4.2: without a sequence the most recently retrieved bundle is current."""
    web(ctx)
    fetch = FakeFetch([partner.jwks(None), partner.jwks(None), partner.jwks(1)])
    assert refresh_federation(ctx, PARTNER, fetch=fetch).sequence is None
    assert refresh_federation(ctx, PARTNER, fetch=fetch).ok
    assert refresh_federation(ctx, PARTNER, fetch=fetch).sequence == 1
    assert "spiffe_sequence" in bundle_map(ctx)["spiffe://b.test"]


@SQLITE_ONLY
def test_https_spiffe_trusts_the_bootstrap_then_the_last_good_bundle(
    ctx: Context, partner: Partner
) -> None:
    add_federation(ctx, _spiffe()(partner, ctx))
    rotate_root(partner.ctx)  # the partner publishes a second root
    rotated = partner.jwks(2, list(active_issuer(partner.ctx).roots))
    fetch = FakeFetch([rotated, b"junk", rotated])
    refresh_federation(ctx, PARTNER, fetch=fetch)
    refresh_federation(ctx, PARTNER, fetch=fetch)
    refresh_federation(ctx, PARTNER, fetch=fetch)
    first, after_good, after_bad = (e.trust_pem for e in fetch.seen)
    assert first == certs_pem(partner.roots)
    assert after_good == after_bad == certs_pem(active_issuer(partner.ctx).roots)
    assert len(roots_of(ctx)) == 2
    assert all(e.endpoint_spiffe_id == PARTNER_SERVER for e in fetch.seen)


def test_a_fetch_lands_only_in_the_relationship_it_was_made_for(
    ctx: Context, clock: FixedClock, partner: Partner, tmp_path: Path
) -> None:
    """Removed and added again while a fetch is in flight: the fetch was made from the old
    endpoint and authenticated with the old relationship's bundle, so its result is dropped,
    even when the new relationship has the same parameters (the old last good bundle may be
    why the operator started over). Both databases: the check is in the locking UPDATE."""
    hostile = make_partner(tmp_path / "hostile", clock)
    try:
        web(ctx)
        assert refresh_federation(ctx, PARTNER, fetch=FakeFetch([partner.jwks(5)])).ok

        def fetch(_endpoint: Endpoint) -> bytes:
            remove_federation(ctx, PARTNER)
            clock.advance(dt.timedelta(seconds=1))
            web(ctx)
            return partner.jwks(40, [*partner.roots, *hostile.roots])

        clock.advance(dt.timedelta(seconds=301))
        result = refresh_federation(ctx, PARTNER, fetch=fetch)
        assert not result.ok and not result.changed
        assert "removed or replaced during the refresh" in (result.error or "")
        fresh = get_federation(ctx, PARTNER)
        assert not fresh.has_bundle and fresh.sequence is None
        assert fresh.last_attempt is None and fresh.last_error is None
        assert fresh.next_refresh == clock.now()  # still due at once, for its own first fetch
        assert list(bundle_map(ctx)) == ["spiffe://example.org"]

        def unexpected(_endpoint: Endpoint) -> bytes:  # the same for a failure nobody foresaw
            remove_federation(ctx, PARTNER)
            clock.advance(dt.timedelta(seconds=1))
            web(ctx)
            raise RuntimeError("a bug")

        result = refresh_federation(ctx, PARTNER, fetch=unexpected)
        assert "removed or replaced" in (result.error or "")
        assert get_federation(ctx, PARTNER).last_error is None
    finally:
        hostile.ctx.close()


# --- publication: one bundle per trust domain, never merged -----------------------------------


@SQLITE_ONLY
def test_bundle_map_keeps_trust_domains_apart(ctx: Context, partner: Partner) -> None:
    web(ctx)
    refresh_federation(ctx, PARTNER, fetch=FakeFetch([partner.jwks(3)]))
    published = bundle_map(ctx)
    assert list(published) == ["spiffe://example.org", "spiffe://b.test"]
    own = active_issuer(ctx)
    assert published["spiffe://example.org"]["spiffe_sequence"] == own.bundle_sequence
    own_x5c = [k["x5c"] for k in published["spiffe://example.org"]["keys"]]
    partner_x5c = [k["x5c"] for k in published["spiffe://b.test"]["keys"]]
    assert len(own_x5c) == len(own.roots) and len(partner_x5c) == len(partner.roots)
    assert not {x[0] for x in own_x5c} & {x[0] for x in partner_x5c}
    assert published["spiffe://b.test"]["spiffe_refresh_hint"] == 300


# --- when bundles are fetched ------------------------------------------------------------------


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("hint", "interval"),
    [
        (300, 300),
        (3600, 3600),
        (1, 10),
        (0, 10),
        (None, 300),
        (MAX_REFRESH, MAX_REFRESH),
        (10**12, MAX_REFRESH),
        (2**63 - 1, MAX_REFRESH),
        (10**20, MAX_REFRESH),
    ],
)
def test_refresh_is_due_after_the_hint_with_a_floor(
    ctx: Context, clock: FixedClock, partner: Partner, hint: int | None, interval: int
) -> None:
    web(ctx)
    document = json.loads(partner.jwks(1))
    if hint is None:
        del document["spiffe_refresh_hint"]
    else:
        document["spiffe_refresh_hint"] = hint
    body = json.dumps(document).encode()
    assert [r.trust_domain for r in refresh_due(ctx, fetch=FakeFetch([body]))] == [PARTNER]
    assert get_federation(ctx, PARTNER).next_refresh == clock.now() + dt.timedelta(seconds=interval)
    # a hint outside the bounds is clamped: stored and republished as the interval polled at
    # (0 was republished as 0, "poll at once, always", to every reader of the bundle map)
    published = None if hint is None else interval
    assert get_federation(ctx, PARTNER).refresh_hint == published
    assert bundle_map(ctx)["spiffe://b.test"].get("spiffe_refresh_hint") == published
    clock.advance(dt.timedelta(seconds=interval - 1))
    assert refresh_due(ctx, fetch=FakeFetch()) == []
    clock.advance(dt.timedelta(seconds=1))
    assert len(refresh_due(ctx, fetch=FakeFetch([body]))) == 1


@SQLITE_ONLY
def test_a_bundle_listing_a_root_twice_holds_it_once(ctx: Context, partner: Partner) -> None:
    """Certificates are compared by DER: a repeated one is one authority, and a bundle that
    repeats one with the same sequence is the same bundle, not "authorities changed"."""
    web(ctx)
    twice = [*partner.roots, *partner.roots]
    first = refresh_federation(ctx, PARTNER, fetch=FakeFetch([partner.jwks(5, twice)]))
    assert first.ok and first.changed, first.error
    assert roots_of(ctx) == partner.roots
    assert len(bundle_map(ctx)["spiffe://b.test"]["keys"]) == len(partner.roots)
    again = refresh_federation(ctx, PARTNER, fetch=FakeFetch([partner.jwks(5, twice)]))
    assert again.ok and not again.changed, again.error
    plain = refresh_federation(ctx, PARTNER, fetch=FakeFetch([partner.jwks(5)]))
    assert plain.ok and not plain.changed, plain.error


@SQLITE_ONLY
def test_a_bootstrap_bundle_listing_a_root_twice_holds_it_once(
    ctx: Context, partner: Partner
) -> None:
    twice = certs_pem([*partner.roots, *partner.roots])
    add_federation(ctx, _spiffe(bootstrap_bundle=twice)(partner, ctx))
    fetch = FakeFetch([b"junk"])
    refresh_federation(ctx, PARTNER, fetch=fetch)
    assert fetch.seen[0].trust_pem == certs_pem(partner.roots)


@SQLITE_ONLY
def test_a_failed_refresh_waits_for_the_next_interval(
    ctx: Context, clock: FixedClock, partner: Partner
) -> None:
    """Federation §6.2: retry at the next polling interval, not aggressively."""
    web(ctx)
    refresh_due(ctx, fetch=FakeFetch([b"junk"]))
    clock.advance(dt.timedelta(seconds=299))
    assert refresh_due(ctx, fetch=FakeFetch()) == []


def test_the_job_reports_failing_relationships(
    ctx: Context, clock: FixedClock, partner: Partner
) -> None:
    job = job_named("federation-refresh")
    assert job.every_seconds == 10
    assert job.run(ctx) == "nothing due"
    web(ctx)
    refresh_federation(ctx, PARTNER, fetch=FakeFetch([b"junk"]))
    with pytest.raises(Unavailable, match=r"b\.test: invalid SPIFFE bundle: not JSON"):
        job.run(ctx)


def test_an_unexpected_failure_is_recorded_and_starves_no_one(
    ctx: Context, clock: FixedClock, partner: Partner, tmp_path: Path
) -> None:
    """A refresh that fails in a way nobody foresaw (here the fetch raises a bug) is recorded
    like any failure and waits for the next interval; the job goes on to the next relationship
    instead of retrying the broken one every run."""
    third = TrustDomain.parse("c.test")
    other = make_partner(tmp_path / "c", clock, third)
    try:
        web(ctx)
        add_federation(ctx, FederationParams(third, URL, Profile.HTTPS_WEB))

        def fetch(endpoint: Endpoint) -> bytes:
            if endpoint.trust_domain == PARTNER:
                raise RuntimeError("a bug")
            return other.jwks(1)

        results = {r.trust_domain: r for r in refresh_due(ctx, fetch=fetch)}
        assert set(results) == {PARTNER, third}
        assert results[third].ok
        broken = get_federation(ctx, PARTNER)
        assert broken.last_error == "unexpected RuntimeError (logged with its traceback): a bug"
        assert broken.last_attempt == clock.now()
        assert broken.next_refresh == clock.now() + dt.timedelta(seconds=300)
        assert not broken.has_bundle
        assert get_federation(ctx, third).sequence == 1

        clock.advance(dt.timedelta(seconds=10))
        assert refresh_due(ctx, fetch=fetch) == []
        with pytest.raises(Unavailable, match=r"b\.test: unexpected RuntimeError"):
            job_named("federation-refresh").run(ctx)
    finally:
        other.ctx.close()


def test_a_failing_relationship_is_news_once_in_the_log(
    ctx: Context,
    clock: FixedClock,
    partner: Partner,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The job fails on every run (every 10 s) while a relationship's last fetch failed, which
    can last a day: one warning when it starts and an info line when it recovers, repeats at
    debug, never a traceback; and no back-off retry next to the regular run (it is every 10 s:
    the two ran within milliseconds of each other)."""
    from ca import scheduler
    from tests.rotation.test_jobs import RecordingScheduler

    monkeypatch.setattr(scheduler, "_LAST_LOGGED", {})
    job = job_named("federation-refresh")
    web(ctx)
    refresh_federation(ctx, PARTNER, fetch=FakeFetch([b"junk"]))
    recorder = RecordingScheduler()
    caplog.set_level(logging.DEBUG, logger="trellis.scheduler")
    every = dt.timedelta(seconds=job.every_seconds)  # each tick finds the job due again
    for _ in range(3):
        scheduler._tick(ctx, recorder, job)  # type: ignore[arg-type]
        clock.advance(every)
    refresh_federation(ctx, PARTNER, fetch=FakeFetch([partner.jwks(1)]))
    scheduler._tick(ctx, recorder, job)  # type: ignore[arg-type]

    logged = [r for r in caplog.records if r.getMessage().startswith("job federation-refresh")]
    assert [r.levelno for r in logged] == [
        logging.WARNING,
        logging.DEBUG,
        logging.DEBUG,
        logging.INFO,
    ]
    assert "b.test: invalid SPIFFE bundle: not JSON" in logged[0].getMessage()
    assert all(r.exc_info is None for r in caplog.records)
    assert recorder.calls == []
