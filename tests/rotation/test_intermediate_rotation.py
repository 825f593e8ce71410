"""Intermediate rotation on SPIRE's schedule (docs/rotation.md), driven by a ``FixedClock``.

The drill authority: L = 3 min + 30 s backdating = 210 s, so the next intermediate is prepared at
notAfter - 105 s and activated at notAfter - 35 s; SVIDs live 20 s (≤ L/6). Moments are
computed here from the documented formulas, never through ``RotationPolicy``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from sqlmodel import Session

from ca import rotation
from ca.authority import AuthorityParams, active_issuer, init_authority, load_authority
from ca.bundle import read_bundle
from ca.clock import FixedClock
from ca.config import Context, Settings, build_context
from ca.durations import Ttl
from ca.errors import Conflict, InternalError, InvalidInput, NotInitialised, Unavailable
from ca.grants import join_grant
from ca.issue import IssuedSvid, issue_svid_async
from ca.jobs import rotate_cas
from ca.keys import KeyType
from ca.rotation import authority_status, rotate
from ca.serving import ensure_server_certificate
from ca.store import db
from cli.common import STATE
from cli.main import main
from tests.ca.svidkit import add_entry, enrol, join_secret, make_csr, new_key
from tests.certassert import assert_is_ca, assert_is_svid_leaf
from tests.cli.test_walkthrough import Trellis
from tests.conftest import TRUST_DOMAIN
from tests.rotation.rotkit import (
    BOTH_DATABASES,
    CA_TTL,
    DRILL,
    POSTGRES_ROTATION,
    SQLITE_ONLY,
    SVID_TTL,
    activate_moment,
    assert_rejected,
    assert_verifies,
    ca_rows,
    cert_of,
    events,
    needs_openssl,
    only,
    prepare_moment,
)

SECOND = dt.timedelta(seconds=1)
# One second before, at, and one second after a moment (on PostgreSQL only "at", to stay short).
BOUNDARY = pytest.mark.parametrize(
    ("database_url", "offset"),
    [
        ("sqlite", -1),
        ("sqlite", 0),
        ("sqlite", 1),
        pytest.param("postgres", 0, marks=POSTGRES_ROTATION),
    ],
    indirect=["database_url"],
)
_ids = iter(range(10**6))


def svid(ctx: Context, spiffe_id: str | None = None) -> IssuedSvid:
    """A fresh SVID through the real pipeline (entry → join token → issue)."""
    return enrol(ctx, spiffe_id or f"spiffe://example.org/w/{next(_ids)}").svid


def transitions(done: list[rotation.Transition]) -> list[tuple[str, str]]:
    return [(t.event, t.serial) for t in done]


@SQLITE_ONLY
def test_drill_timeline_is_what_the_docs_say(drill_ctx: Context, clock: FixedClock) -> None:
    first = only(drill_ctx, "intermediate", "active")
    cert = cert_of(first)
    assert cert.not_valid_after_utc == clock.now() + CA_TTL.delta
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(seconds=210)
    assert prepare_moment(first) == cert.not_valid_after_utc - dt.timedelta(seconds=105)
    assert activate_moment(first) == cert.not_valid_after_utc - dt.timedelta(seconds=35)


@BOTH_DATABASES
def test_nothing_is_due_before_the_prepare_moment(drill_ctx: Context, clock: FixedClock) -> None:
    first = only(drill_ctx, "intermediate", "active")
    before = events(drill_ctx)
    moment = clock.now()
    while moment < prepare_moment(first):
        clock.current = moment
        assert rotate(drill_ctx) == [], f"a transition at {moment}"
        moment += dt.timedelta(seconds=5)
    clock.current = prepare_moment(first) - SECOND
    assert rotate(drill_ctx) == []
    assert rotate_cas(drill_ctx) == "nothing due"
    assert [r.serial for r in ca_rows(drill_ctx)] == [first.serial]
    assert events(drill_ctx) == before


@BOUNDARY
def test_prepare_boundary(drill_ctx: Context, clock: FixedClock, offset: int) -> None:
    first = only(drill_ctx, "intermediate", "active")
    root = only(drill_ctx, "root", "active")
    clock.current = prepare_moment(first) + offset * SECOND
    done = rotate(drill_ctx)
    if offset < 0:
        assert done == []
        assert ca_rows(drill_ctx, state="prepared") == []
        return
    prepared = only(drill_ctx, "intermediate", "prepared")
    assert transitions(done) == [("prepared", prepared.serial)]
    assert all(t.at == clock.now() for t in done)
    assert prepared.parent_id == root.id
    # preparing changes nothing for issuance
    assert only(drill_ctx, "intermediate", "active").serial == first.serial
    assert active_issuer(drill_ctx).certificate == cert_of(first)
    assert rotate(drill_ctx) == [], "a second call prepared again"


@BOUNDARY
def test_activate_boundary(drill_ctx: Context, clock: FixedClock, offset: int) -> None:
    first = only(drill_ctx, "intermediate", "active")
    clock.current = prepare_moment(first)
    rotate(drill_ctx)
    prepared = only(drill_ctx, "intermediate", "prepared")
    clock.current = activate_moment(first) + offset * SECOND
    done = rotate(drill_ctx)
    if offset < 0:
        assert done == []
        assert only(drill_ctx, "intermediate", "prepared").serial == prepared.serial
        assert only(drill_ctx, "intermediate", "active").serial == first.serial
        return
    assert transitions(done) == [("retired", first.serial), ("activated", prepared.serial)]
    assert only(drill_ctx, "intermediate", "active").serial == prepared.serial
    assert only(drill_ctx, "intermediate", "retired").serial == first.serial
    assert ca_rows(drill_ctx, state="prepared") == []
    assert active_issuer(drill_ctx).certificate == cert_of(prepared)
    assert rotate(drill_ctx) == [], "a second call activated again"


@SQLITE_ONLY
def test_prepared_ca_is_a_valid_intermediate(drill_ctx: Context, clock: FixedClock) -> None:
    first = cert_of(only(drill_ctx, "intermediate", "active"))
    root = cert_of(only(drill_ctx, "root", "active"))
    clock.current = prepare_moment(first)
    rotate(drill_ctx)
    prepared = cert_of(only(drill_ctx, "intermediate", "prepared"))
    assert_is_ca(prepared, trust_domain=str(TRUST_DOMAIN), path_length=0, issuer=root)
    assert prepared.not_valid_before_utc == clock.now() - dt.timedelta(seconds=30)
    assert prepared.not_valid_after_utc == clock.now() + CA_TTL.delta
    assert prepared.public_key() != first.public_key(), "the new intermediate reuses the old key"
    assert prepared.serial_number != first.serial_number


def _key_files(ctx: Context) -> set[str]:
    return {p.name for p in (ctx.settings.data_dir / "keys").iterdir()}


def _sign_with_a_stranger(monkeypatch: pytest.MonkeyPatch) -> None:
    """The validation probe leaf gets signed by an unrelated key: the new CA must be refused."""
    stranger = ec.generate_private_key(ec.SECP256R1())
    monkeypatch.setattr(
        rotation, "sign", lambda builder, _signer: builder.sign(stranger, hashes.SHA256())
    )


@SQLITE_ONLY
def test_a_ca_that_fails_validation_is_not_prepared(
    drill_ctx: Context, clock: FixedClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = only(drill_ctx, "intermediate", "active")
    keys, before = _key_files(drill_ctx), events(drill_ctx)
    _sign_with_a_stranger(monkeypatch)
    clock.current = prepare_moment(first)
    with pytest.raises(Exception):  # the type: see the next test
        rotate(drill_ctx)
    assert ca_rows(drill_ctx, state="prepared") == []
    assert events(drill_ctx) == before
    assert _key_files(drill_ctx) == keys, "the rejected CA's key was left behind"
    monkeypatch.undo()
    assert [t.event for t in rotate(drill_ctx)] == ["prepared"]


@SQLITE_ONLY
def test_failed_validation_is_reported_as_such(
    drill_ctx: Context, clock: FixedClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    _sign_with_a_stranger(monkeypatch)
    clock.current = prepare_moment(only(drill_ctx, "intermediate", "active"))
    with pytest.raises(InternalError, match="failed validation"):
        rotate(drill_ctx)


@SQLITE_ONLY
@needs_openssl
def test_old_and_new_svids_both_verify_during_the_overlap(
    drill_ctx: Context, clock: FixedClock
) -> None:
    first = only(drill_ctx, "intermediate", "active")
    bundle = read_bundle(drill_ctx, "mesh")
    clock.current = prepare_moment(first)
    rotate(drill_ctx)
    prepared = only(drill_ctx, "intermediate", "prepared")
    during_prepare = svid(drill_ctx)  # still from the old intermediate
    assert during_prepare.issuer.certificate == cert_of(first)

    clock.current = activate_moment(first) - SECOND
    last_old = svid(drill_ctx)
    assert last_old.issuer.certificate == cert_of(first)
    # the L/6 rule: the last SVID of the old intermediate expires before the intermediate does
    assert last_old.expires_at == clock.now() + SVID_TTL.delta < cert_of(first).not_valid_after_utc

    clock.current = activate_moment(first)
    rotate(drill_ctx)
    first_new = svid(drill_ctx)
    assert first_new.issuer.certificate == cert_of(prepared)
    assert read_bundle(drill_ctx, "mesh").pem == bundle.pem

    published = read_bundle(drill_ctx, "mesh").pem
    for moment in (clock.now(), clock.now() + 10 * SECOND, last_old.expires_at - SECOND):
        assert_verifies(published, last_old.certificate, last_old.issuer.chain, moment)
        assert_verifies(published, first_new.certificate, first_new.issuer.chain, moment)
    assert_verifies(
        published,
        during_prepare.certificate,
        during_prepare.issuer.chain,
        during_prepare.expires_at - SECOND,
    )
    # controls: the checker does fail on a wrong chain and on an expired SVID
    assert_rejected(published, first_new.certificate, last_old.issuer.chain, clock.now())
    assert "expired" in assert_rejected(
        published, last_old.certificate, last_old.issuer.chain, last_old.expires_at + SECOND
    )


@SQLITE_ONLY
@needs_openssl
def test_after_activation_svids_come_only_from_the_new_intermediate(
    drill_ctx: Context, clock: FixedClock
) -> None:
    first = only(drill_ctx, "intermediate", "active")
    rotate(drill_ctx, force=True)
    rotate(drill_ctx, force=True)
    new = cert_of(only(drill_ctx, "intermediate", "active"))
    assert new != cert_of(first)
    bundle = read_bundle(drill_ctx, "mesh").pem
    for n in range(3):
        spiffe_id = f"spiffe://example.org/after/{n}"
        issued = svid(drill_ctx, spiffe_id)
        assert_is_svid_leaf(issued.certificate, spiffe_id=spiffe_id, issuer=new)
        assert issued.issuer.chain == (new,), "the chain still carries the old intermediate"
        assert_verifies(bundle, issued.certificate, issued.issuer.chain, clock.now())
        assert_rejected(bundle, issued.certificate, (cert_of(first),), clock.now())
        clock.advance(5 * SECOND)


@SQLITE_ONLY
def test_an_svid_never_outlives_its_issuer(drill_ctx: Context, clock: FixedClock) -> None:
    first = cert_of(only(drill_ctx, "intermediate", "active"))
    # without a rotation the issuer's end clamps the SVID...
    clock.current = first.not_valid_after_utc - 10 * SECOND
    clamped = svid(drill_ctx)
    assert clamped.issuer.certificate == first
    assert clamped.expires_at == first.not_valid_after_utc
    # ...and at its end nothing can be issued until it rotates
    clock.current = first.not_valid_after_utc
    with pytest.raises(Unavailable, match="rotates"):
        svid(drill_ctx)


@SQLITE_ONLY
def test_three_lifetimes_of_scheduled_rotation(drill_ctx: Context, clock: FixedClock) -> None:
    """The ca-rotation job every 10 s, an SVID every 5 s, for three intermediate lifetimes:
    there is always exactly one valid active intermediate, every SVID comes from it with its full
    TTL (the L/6 rule means no clamping is ever needed) and never outlives its issuer."""
    start, issuers = clock.now(), set()
    step = 0
    while clock.now() < start + 3 * CA_TTL.delta:
        if step % 2 == 0:
            rotate_cas(drill_ctx)
        active = only(drill_ctx, "intermediate", "active")
        assert len(ca_rows(drill_ctx, state="prepared")) <= 1
        issued = svid(drill_ctx)
        issuer = issued.issuer.certificate
        assert issuer == cert_of(active)
        assert issuer.not_valid_before_utc <= clock.now() < issuer.not_valid_after_utc
        assert issued.expires_at <= issuer.not_valid_after_utc, "outlives its issuer"
        assert issued.expires_at == clock.now() + SVID_TTL.delta, "clamped"
        issued.certificate.verify_directly_issued_by(issuer)
        issuers.add(issuer.serial_number)
        clock.advance(5 * SECOND)
        step += 1
    assert len(issuers) >= 4, "fewer rotations than three lifetimes need"
    activated = [ca for ca, _ in events(drill_ctx, "activated")]
    assert len(activated) == len(set(activated)) == len(issuers) - 1


@BOTH_DATABASES
def test_force_does_exactly_one_transition_per_call(drill_ctx: Context) -> None:
    current = only(drill_ctx, "intermediate", "active").serial
    for _ in range(2):
        done = rotate(drill_ctx, force=True)
        prepared = only(drill_ctx, "intermediate", "prepared").serial
        assert transitions(done) == [("prepared", prepared)]
        assert only(drill_ctx, "intermediate", "active").serial == current

        done = rotate(drill_ctx, force=True)
        assert transitions(done) == [("retired", current), ("activated", prepared)]
        assert ca_rows(drill_ctx, state="prepared") == []
        assert only(drill_ctx, "intermediate", "active").serial == prepared
        current = prepared
    assert len(ca_rows(drill_ctx)) == 3
    assert len(events(drill_ctx, "prepared")) == 2 and len(events(drill_ctx, "activated")) == 2


@BOTH_DATABASES
def test_a_rotation_that_cannot_take_the_lock_is_a_conflict(
    drill_ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds the authority's rotation lock (on SQLite, the database's write
    lock, given up after the busy timeout): the caller cannot know whether anything was due, so
    it is told to try again, not that nothing was; the scheduled job skips the authority for
    this run without failing (docs/rotation.md)."""
    # waited out twice below: 0.3 s instead of 10 s, in the connections made from here on
    monkeypatch.setattr(db, "BUSY_TIMEOUT_MS", 300)
    drill_ctx.engine.dispose()
    with Session(drill_ctx.engine) as holder:
        rotation.rotation_lock(holder, "mesh")
        with pytest.raises(rotation.RotationInProgress, match="another rotation") as raised:
            rotate(drill_ctx, force=True, actor="cli")
        assert isinstance(raised.value, Conflict)  # 409, exit 6
        assert rotate_cas(drill_ctx) == "mesh: skipped, another rotation is running"
        holder.rollback()
    assert ca_rows(drill_ctx, state="prepared") == [] and events(drill_ctx, "prepared") == []
    assert [t.event for t in rotate(drill_ctx, force=True)] == ["prepared"]


@pytest.mark.slow
def test_cli_rotate_while_the_database_is_locked_exits_6(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    database = tmp_path / "trellis.db"
    cli = Trellis(tmp_path / "var", f"sqlite:///{database}")
    cli.set_up("init", "--trust-domain", "example.org", "--ca-ttl", "3m", "--svid-ttl", "30s")
    # The refused command runs in this process (cli.main.main, which maps errors to exit
    # codes), where the busy timeout it waits out can be 0.3 s instead of 10 s.
    monkeypatch.setattr(db, "BUSY_TIMEOUT_MS", 300)
    for name in ("TRELLIS_DATA_DIR", "TRELLIS_DATABASE_URL", "TRELLIS_KEY_PASSPHRASE"):
        monkeypatch.setenv(name, cli.env[name])
    capsys.readouterr()
    holder = sqlite3.connect(database, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(SystemExit) as exited:
            main(["authority", "rotate", "--now"])
    finally:
        holder.close()
        STATE.close()
    out, err = capsys.readouterr()
    assert exited.value.code == 6, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "another rotation of authority 'mesh' is running" in lines[0]
    assert cli.run("authority", "rotate", "--now").stdout.startswith("prepared ")


@BOTH_DATABASES
def test_intermediate_rotation_leaves_the_bundle_alone(
    drill_ctx: Context, clock: FixedClock
) -> None:
    before = read_bundle(drill_ctx, "mesh")
    first = only(drill_ctx, "intermediate", "active")
    clock.current = prepare_moment(first)
    rotate_cas(drill_ctx)
    clock.current = activate_moment(first)
    rotate_cas(drill_ctx)
    rotate(drill_ctx, force=True)
    rotate(drill_ctx, force=True)
    assert len(ca_rows(drill_ctx)) == 3
    after = read_bundle(drill_ctx, "mesh")
    assert (after.sequence, after.pem) == (before.sequence, before.pem)
    assert authority_status(drill_ctx).bundle_sequence == before.sequence
    assert active_issuer(drill_ctx).bundle_sequence == before.sequence


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("ca_ttl", "svid_ttl", "ok"),
    [("6h", "2h", False), ("3m", "31s", False), ("3m", "30s", True), ("7d", "1h", True)],
)
def test_init_refuses_svids_longer_than_a_sixth(
    bare_ctx: Context, ca_ttl: str, svid_ttl: str, ok: bool
) -> None:
    params = AuthorityParams(TRUST_DOMAIN, ca_ttl=Ttl.parse(ca_ttl), svid_ttl=Ttl.parse(svid_ttl))
    if ok:
        init_authority(bare_ctx, params)
        assert load_authority(bare_ctx).svid_ttl_seconds == Ttl.parse(svid_ttl).seconds
        return
    with pytest.raises(InvalidInput, match="more than a sixth of the CA TTL") as refused:
        init_authority(bare_ctx, params)
    assert svid_ttl in refused.value.detail and ca_ttl in refused.value.detail
    with pytest.raises(NotInitialised):
        load_authority(bare_ctx)
    assert not (bare_ctx.settings.data_dir / "keys").exists() or not _key_files(bare_ctx)


@pytest.mark.slow
def test_cli_init_refuses_svid_ttl_over_a_sixth(tmp_path: Path) -> None:
    cli = Trellis(tmp_path / "var", f"sqlite:///{tmp_path / 'trellis.db'}")
    result = cli.run(
        "init", "--trust-domain", "example.org", "--svid-ttl", "2h", "--ca-ttl", "6h", ok=False
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "more than a sixth" in lines[0] and "lower the SVID TTL" in lines[0]
    assert not (tmp_path / "var" / "bundle.pem").exists()
    assert not (tmp_path / "var" / "admin-token").exists()


@BOTH_DATABASES
def test_catch_up_replaces_an_expired_intermediate_at_once(
    drill_ctx: Context, clock: FixedClock
) -> None:
    first = only(drill_ctx, "intermediate", "active")
    clock.current = cert_of(first).not_valid_after_utc + dt.timedelta(hours=1)
    with pytest.raises(Unavailable):
        svid(drill_ctx)  # the state a process finds after its downtime
    done = rotate(drill_ctx)
    new = only(drill_ctx, "intermediate", "active")
    assert transitions(done) == [
        ("prepared", new.serial),
        ("retired", first.serial),
        ("activated", new.serial),
    ]
    cert = cert_of(new)
    assert cert.not_valid_before_utc <= clock.now() < cert.not_valid_after_utc
    assert svid(drill_ctx).issuer.certificate == cert
    assert rotate(drill_ctx) == []


@SQLITE_ONLY
def test_catch_up_skips_a_prepared_intermediate_that_expired(
    drill_ctx: Context, clock: FixedClock
) -> None:
    first = only(drill_ctx, "intermediate", "active")
    clock.current = prepare_moment(first)
    rotate(drill_ctx)
    prepared = cert_of(only(drill_ctx, "intermediate", "prepared"))
    clock.current = prepared.not_valid_after_utc + dt.timedelta(hours=1)  # down for a while
    rotate(drill_ctx)
    cert = cert_of(only(drill_ctx, "intermediate", "active"))
    assert cert.not_valid_before_utc <= clock.now() < cert.not_valid_after_utc, (
        "the catch-up left an expired intermediate active"
    )
    assert svid(drill_ctx).issuer.certificate == cert


@BOTH_DATABASES
def test_a_restart_between_prepare_and_activate_activates_the_prepared_ca(
    settings: Settings, clock: FixedClock
) -> None:
    first_process = build_context(settings, clock=clock)
    try:
        init_authority(first_process, DRILL)
        first = only(first_process, "intermediate", "active")
        clock.current = prepare_moment(first)
        rotate(first_process)
        prepared = only(first_process, "intermediate", "prepared")
    finally:
        first_process.close()  # the process dies here

    restarted = build_context(settings, clock=FixedClock(clock.now() + SECOND))
    try:
        assert rotate(restarted) == [], "a restart before activation prepared again"
        assert isinstance(restarted.clock, FixedClock)
        restarted.clock.current = activate_moment(first)
        done = rotate(restarted)
        assert transitions(done) == [("retired", first.serial), ("activated", prepared.serial)]
        assert events(restarted, "prepared") == [(prepared.id, "prepared")]
        assert events(restarted, "activated") == [(prepared.id, "activated")]
        # the restarted process can sign with the key the first one created
        assert svid(restarted).issuer.certificate == cert_of(prepared)
    finally:
        restarted.close()


@SQLITE_ONLY
def test_status_shows_every_ca_and_its_next_transition(
    drill_ctx: Context, clock: FixedClock
) -> None:
    first = only(drill_ctx, "intermediate", "active")
    status = authority_status(drill_ctx)
    assert status.root_rotation is None
    (inter,) = [c for c in status.cas if c.role == "intermediate"]
    assert (inter.serial, inter.state) == (first.serial, "active")
    assert (inter.next_transition, inter.next_at) == ("successor prepared", prepare_moment(first))

    clock.current = prepare_moment(first)
    rotate(drill_ctx)
    by_state = {c.state: c for c in authority_status(drill_ctx).cas if c.role == "intermediate"}
    assert set(by_state) == {"active", "prepared"}
    assert by_state["active"].next_transition == "successor activates"
    assert by_state["active"].next_at == activate_moment(first)

    clock.current = activate_moment(first)
    rotate(drill_ctx)
    by_state = {c.state: c for c in authority_status(drill_ctx).cas if c.role == "intermediate"}
    assert set(by_state) == {"active", "retired"}
    assert by_state["retired"].serial == first.serial
    assert by_state["retired"].next_transition == "expires"
    assert by_state["retired"].next_at == cert_of(first).not_valid_after_utc
    assert by_state["active"].next_transition == "successor prepared"


@SQLITE_ONLY
def test_serving_certificate_follows_an_intermediate_rotation(drill_ctx: Context) -> None:
    before = ensure_server_certificate(drill_ctx)
    old = before.cert_path.read_bytes()
    rotate(drill_ctx, force=True)
    rotate(drill_ctx, force=True)
    after = ensure_server_certificate(drill_ctx)
    assert after.cert_path.read_bytes() != old
    leaf = x509.load_pem_x509_certificates(after.cert_path.read_bytes())[0]
    leaf.verify_directly_issued_by(active_issuer(drill_ctx).certificate)


@BOTH_DATABASES
def test_a_rotation_on_another_replica_is_caught_when_the_certificate_is_recorded(
    settings: Settings, clock: FixedClock
) -> None:
    """This process signs with the issuer its last commit found active, without asking first;
    the commit asks. So the first issuance after another replica activated a new intermediate
    is signed twice, and only the new intermediate's certificate is recorded and returned."""
    serving = build_context(settings, clock=clock)
    other = build_context(settings, clock=clock)
    try:
        init_authority(serving, DRILL)
        first = only(serving, "intermediate", "active")
        assert svid(serving).issuer.certificate == cert_of(first)  # cached by this process
        clock.current = prepare_moment(first)
        rotate(other)
        clock.current = activate_moment(first)
        rotate(other)
        second = only(other, "intermediate", "active")
        issuers_before = _recorded_issuers(serving)

        by_sync = svid(serving)
        spiffe_id = "spiffe://example.org/w/async-after-rotation"
        _, secret = join_secret(other, add_entry(other, spiffe_id))
        csr = make_csr(new_key(KeyType.EC_P256), uris=[spiffe_id])
        by_async = asyncio.run(issue_svid_async(serving, join_grant(serving, secret), csr))
        for issued in (by_sync, by_async):
            assert issued.issuer.ca_id == second.id
            assert issued.certificate.issuer == cert_of(second).subject
            issued.certificate.verify_directly_issued_by(cert_of(second))
        # one new row per issuance, both issued by the new intermediate: the certificates
        # signed by the old one were dropped
        added = _recorded_issuers(serving) - issuers_before
        assert added == Counter({second.id: 2})
    finally:
        other.close()
        serving.close()


def _recorded_issuers(ctx: Context) -> Counter[int]:
    with ctx.engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT issuer_ca_id FROM certificate")).all()
    return Counter(row[0] for row in rows)
