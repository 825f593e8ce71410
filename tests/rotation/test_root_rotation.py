"""Root rotation by explicit steps (docs/rotation.md): publish → switch → retire, with
cross-signing both ways so a relying party that trusts either root verifies SVIDs of either
hierarchy; checked with real ``openssl verify -x509_strict -attime``."""

from __future__ import annotations

import datetime as dt
import re
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.x509 import ocsp
from fastapi.testclient import TestClient

from api.app import create_app
from ca import audit
from ca.authority import AuthorityParams, active_issuer, init_authority
from ca.bundle import read_bundle
from ca.certs import revoke_certificate
from ca.clock import FixedClock
from ca.config import Context
from ca.crl import current_crl
from ca.durations import Ttl
from ca.errors import Conflict, NotFound, Unavailable
from ca.identity import SpiffeId
from ca.issue import IssuedSvid
from ca.istio import IstioParams, issue_istio_intermediate
from ca.jobs import rotate_cas
from ca.keys import KeyHandle, KeyType
from ca.profiles import LeafSpec, leaf_builder, sign
from ca.revocation import RevocationReason
from ca.root_rotation import RootRotation, rotate_root
from ca.rotation import authority_status, rotate
from ca.serial import Serial
from ca.store.models import CaRow
from tests.ca.svidkit import enrol, new_key
from tests.ca.test_crl import openssl_verify_with_crls
from tests.ca.test_ocsp import ask, request_der
from tests.certassert import assert_is_ca
from tests.conftest import TRUST_DOMAIN
from tests.rotation.rotkit import (
    BOTH_DATABASES,
    CA_TTL,
    SQLITE_ONLY,
    SVID_TTL,
    assert_rejected,
    assert_verifies,
    ca_rows,
    cert_of,
    events,
    needs_openssl,
    only,
)

SECOND = dt.timedelta(seconds=1)
OVERLAP = Ttl.parse("1m")
_ids = iter(range(10**6))


def svid(ctx: Context) -> IssuedSvid:
    return enrol(ctx, f"spiffe://example.org/r/{next(_ids)}").svid


def bundle_certs(ctx: Context) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(read_bundle(ctx, "mesh").pem)


def cross(ctx: Context, subject_id: int | None, issuer_id: int | None) -> x509.Certificate:
    rows = [
        r for r in ca_rows(ctx, "cross") if (r.cross_for_id, r.parent_id) == (subject_id, issuer_id)
    ]
    assert len(rows) == 1, f"expected one cross certificate {subject_id} by {issuer_id}"
    return cert_of(rows[0])


def publish(ctx: Context) -> RootRotation:
    return rotate_root(ctx, overlap=OVERLAP)


def switch_after(ctx: Context) -> dt.datetime:
    moment = authority_status(ctx).root_switch_after
    assert moment is not None
    return moment


def switch(ctx: Context, clock: FixedClock) -> RootRotation:
    clock.current = switch_after(ctx)
    return rotate_root(ctx, step=True)


def latest_old_expiry(ctx: Context, old_root_id: int | None) -> dt.datetime:
    with ctx.engine.connect() as connection:
        value = connection.execute(
            sa.text(
                "SELECT max(c.not_after) FROM certificate c JOIN ca i ON c.issuer_ca_id = i.id "
                "WHERE i.parent_id = :root AND c.status = 'active'"
            ),
            {"root": old_root_id},
        ).scalar_one()
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    assert isinstance(value, dt.datetime)
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


@BOTH_DATABASES
def test_publish_adds_a_cross_signed_root_to_the_bundle(
    drill_ctx: Context, clock: FixedClock
) -> None:
    old = only(drill_ctx, "root", "active")
    before = read_bundle(drill_ctx, "mesh")
    issuing = only(drill_ctx, "intermediate", "active")

    result = publish(drill_ctx)
    new = only(drill_ctx, "root", "prepared")
    assert (result.step, result.old_root, result.new_root) == ("published", old.serial, new.serial)
    assert result.switch_after == clock.now() + OVERLAP.delta
    assert [t.event for t in result.done] == ["root-published", "cross-signed", "cross-signed"]

    after = read_bundle(drill_ctx, "mesh")
    assert after.sequence == before.sequence + 1
    assert bundle_certs(drill_ctx) == [cert_of(old), cert_of(new)]
    assert_is_ca(cert_of(new), trust_domain=str(TRUST_DOMAIN), path_length=None)
    assert cert_of(new).public_key() != cert_of(old).public_key()

    # cross-signed both ways: each root's name and key, vouched for by the other root
    new_by_old = cross(drill_ctx, new.id, old.id)
    old_by_new = cross(drill_ctx, old.id, new.id)
    assert_is_ca(new_by_old, trust_domain=str(TRUST_DOMAIN), path_length=None, issuer=cert_of(old))
    assert_is_ca(old_by_new, trust_domain=str(TRUST_DOMAIN), path_length=None, issuer=cert_of(new))
    assert new_by_old.public_key() == cert_of(new).public_key()
    assert old_by_new.public_key() == cert_of(old).public_key()
    assert len(ca_rows(drill_ctx, "cross")) == 2

    # issuing is unchanged: the same intermediate under the old root
    assert only(drill_ctx, "intermediate", "active").serial == issuing.serial
    assert active_issuer(drill_ctx).certificate == cert_of(issuing)


@SQLITE_ONLY
@needs_openssl
def test_an_svid_issued_after_publish_verifies_with_either_root(
    drill_ctx: Context, clock: FixedClock
) -> None:
    old_root = cert_of(only(drill_ctx, "root", "active"))
    before = svid(drill_ctx)
    publish(drill_ctx)
    new_root = cert_of(only(drill_ctx, "root", "prepared"))
    clock.advance(5 * SECOND)
    issued = svid(drill_ctx)
    old_by_new = cross(
        drill_ctx, only(drill_ctx, "root", "active").id, only(drill_ctx, "root", "prepared").id
    )
    assert issued.issuer.chain == (cert_of(only(drill_ctx, "intermediate", "active")), old_by_new)

    now = clock.now()
    for anchors in ([old_root], [new_root], [old_root, new_root]):
        assert_verifies(anchors, issued.certificate, issued.issuer.chain, now)
    assert_verifies(
        read_bundle(drill_ctx, "mesh").pem, issued.certificate, issued.issuer.chain, now
    )
    # control: without the cross certificate a new-root-only relying party cannot build a path
    assert_rejected([new_root], before.certificate, before.issuer.chain, now)
    assert_rejected([new_root], issued.certificate, issued.issuer.chain[:1], now)


@BOTH_DATABASES
def test_switch_is_refused_before_the_overlap_and_allowed_after(
    drill_ctx: Context, clock: FixedClock
) -> None:
    publish(drill_ctx)
    switch_at = switch_after(drill_ctx)
    old_issuing = only(drill_ctx, "intermediate", "active")
    recorded = events(drill_ctx)

    clock.current = switch_at - SECOND
    with pytest.raises(Conflict, match="overlap lasts until"):
        rotate_root(drill_ctx, step=True)
    assert events(drill_ctx) == recorded
    assert authority_status(drill_ctx).root_rotation == "published"
    assert only(drill_ctx, "intermediate", "active").serial == old_issuing.serial

    sequence = read_bundle(drill_ctx, "mesh").sequence
    clock.current = switch_at
    result = rotate_root(drill_ctx, step=True)
    assert result.step == "switched"
    new_issuing = only(drill_ctx, "intermediate", "active")
    assert [(t.event, t.serial) for t in result.done] == [
        ("root-switched", result.new_root),
        ("prepared", new_issuing.serial),
        ("retired", old_issuing.serial),
        ("activated", new_issuing.serial),
    ]
    new_root = only(drill_ctx, "root", "active")
    assert new_root.serial == result.new_root
    assert new_issuing.parent_id == new_root.id
    assert only(drill_ctx, "root", "retiring").serial == result.old_root
    assert only(drill_ctx, "intermediate", "retired").serial == old_issuing.serial
    # both roots stay published: the switch does not change the bundle
    assert read_bundle(drill_ctx, "mesh").sequence == sequence
    assert len(bundle_certs(drill_ctx)) == 2


@SQLITE_ONLY
def test_switch_with_force_ignores_the_overlap(drill_ctx: Context) -> None:
    publish(drill_ctx)
    assert rotate_root(drill_ctx, step=True, force=True).step == "switched"


@SQLITE_ONLY
@needs_openssl
def test_after_the_switch_svids_chain_to_the_new_root_and_old_trust_still_works(
    drill_ctx: Context, clock: FixedClock
) -> None:
    old_root_row = only(drill_ctx, "root", "active")
    publish(drill_ctx)
    new_root_row = only(drill_ctx, "root", "prepared")
    clock.current = switch_after(drill_ctx) - 5 * SECOND
    from_old_hierarchy = svid(drill_ctx)
    switch(drill_ctx, clock)
    clock.advance(2 * SECOND)

    issued = svid(drill_ctx)
    new_issuing = cert_of(only(drill_ctx, "intermediate", "active"))
    new_by_old = cross(drill_ctx, new_root_row.id, old_root_row.id)
    assert issued.issuer.certificate == new_issuing
    issued.certificate.verify_directly_issued_by(new_issuing)
    new_issuing.verify_directly_issued_by(cert_of(new_root_row))
    assert issued.issuer.chain == (new_issuing, new_by_old), "the cross certificate is missing"

    old_root, new_root, now = cert_of(old_root_row), cert_of(new_root_row), clock.now()
    for anchors in ([old_root], [new_root], [old_root, new_root]):
        assert_verifies(anchors, issued.certificate, issued.issuer.chain, now)
    # control: an old-root-only relying party needs that cross certificate
    assert_rejected([old_root], issued.certificate, (new_issuing,), now)
    # SVIDs of the old hierarchy keep verifying against the published bundle
    published = read_bundle(drill_ctx, "mesh").pem
    assert_verifies(published, from_old_hierarchy.certificate, from_old_hierarchy.issuer.chain, now)


@BOTH_DATABASES
def test_retire_waits_for_the_old_hierarchy_to_expire(
    drill_ctx: Context, clock: FixedClock
) -> None:
    old_root = only(drill_ctx, "root", "active")
    publish(drill_ctx)
    published_sequence = read_bundle(drill_ctx, "mesh").sequence
    clock.advance(10 * SECOND)
    svid(drill_ctx)  # old hierarchy
    switch_at = switch_after(drill_ctx)
    clock.current = switch_at - SECOND
    last_old = svid(drill_ctx)  # the last SVID of the old hierarchy
    clock.current = switch_at
    rotate_root(drill_ctx, step=True)
    svid(drill_ctx)  # new hierarchy: does not hold the retirement up

    deadline = latest_old_expiry(drill_ctx, old_root.id)
    assert deadline == last_old.expires_at == switch_at - SECOND + SVID_TTL.delta
    recorded = events(drill_ctx)
    clock.current = deadline - SECOND
    with pytest.raises(Conflict, match="old hierarchy stay valid until"):
        rotate_root(drill_ctx, step=True)
    assert events(drill_ctx) == recorded
    assert read_bundle(drill_ctx, "mesh").sequence == published_sequence

    clock.current = deadline
    result = rotate_root(drill_ctx, step=True)
    assert result.step == "retired"
    new_root = only(drill_ctx, "root", "active")
    crosses = {r.serial for r in ca_rows(drill_ctx, "cross")}
    assert [t.event for t in result.done] == ["root-retired", "cross-revoked", "cross-revoked"]
    assert result.done[0].serial == old_root.serial
    assert {t.serial for t in result.done[1:]} == crosses
    assert only(drill_ctx, "root", "retired").serial == old_root.serial
    assert bundle_certs(drill_ctx) == [cert_of(new_root)]
    assert read_bundle(drill_ctx, "mesh").sequence == published_sequence + 1
    # the cross certificate is no longer needed (its issuer is not trusted any more)
    after = svid(drill_ctx)
    assert after.issuer.chain == (cert_of(only(drill_ctx, "intermediate", "active")),)
    assert authority_status(drill_ctx).root_rotation == "retired"


@SQLITE_ONLY
def test_retire_with_force_does_not_wait(drill_ctx: Context, clock: FixedClock) -> None:
    publish(drill_ctx)
    clock.current = switch_after(drill_ctx) - SECOND
    svid(drill_ctx)
    switch(drill_ctx, clock)
    with pytest.raises(Conflict):
        rotate_root(drill_ctx, step=True)
    assert rotate_root(drill_ctx, step=True, force=True).step == "retired"
    assert len(bundle_certs(drill_ctx)) == 1


def _step_record(ctx: Context, event: str) -> dict[str, object]:
    (record,) = audit.list_audit(ctx, event=f"ca.{event}")
    return record.detail


@BOTH_DATABASES
def test_a_step_only_force_allowed_says_so_in_its_audit_record(
    drill_ctx: Context, clock: FixedClock
) -> None:
    """``rotate-root --step --force`` skips a refusal that no record keeps: the step's own
    record says it was forced and what it overrode (the overlap's end, the certificates of the
    old hierarchy still valid), as ``revoke-intermediate``'s say it was an emergency."""
    publish(drill_ctx)
    until = switch_after(drill_ctx)
    svid(drill_ctx)  # old hierarchy, valid past the retirement below
    rotate_root(drill_ctx, step=True, force=True)
    switched = _step_record(drill_ctx, "root-switched")
    assert switched["forced"] is True and switched["overlap_until"] == until.isoformat()
    rotate_root(drill_ctx, step=True, force=True)
    retired = _step_record(drill_ctx, "root-retired")
    assert retired["forced"] is True and retired["still_valid"] == 1


@BOTH_DATABASES
def test_a_due_step_records_no_force_though_force_was_given(
    drill_ctx: Context, clock: FixedClock
) -> None:
    publish(drill_ctx)
    clock.current = switch_after(drill_ctx)
    rotate_root(drill_ctx, step=True, force=True)
    assert "forced" not in _step_record(drill_ctx, "root-switched")
    rotate_root(drill_ctx, step=True, force=True)  # nothing of the old hierarchy is valid
    assert "forced" not in _step_record(drill_ctx, "root-retired")


@BOTH_DATABASES
def test_rerunning_a_step_with_nothing_to_do_reports_the_state(
    drill_ctx: Context, clock: FixedClock
) -> None:
    first = publish(drill_ctx)

    def unchanged(expected_step: str) -> None:
        rows, recorded = len(ca_rows(drill_ctx, "root")), events(drill_ctx)
        sequence = read_bundle(drill_ctx, "mesh").sequence
        again = rotate_root(drill_ctx, overlap=Ttl.parse("1h"))
        assert (again.step, again.done) == (expected_step, ())
        assert (again.old_root, again.new_root) == (first.old_root, first.new_root)
        assert again.switch_after == first.switch_after, "a re-run moved the overlap"
        assert len(ca_rows(drill_ctx, "root")) == rows
        assert events(drill_ctx) == recorded
        assert read_bundle(drill_ctx, "mesh").sequence == sequence

    unchanged("published")
    clock.advance(10 * SECOND)
    unchanged("published")
    switch(drill_ctx, clock)
    unchanged("switched")


@SQLITE_ONLY
def test_rerunning_the_last_step_reports_retired(drill_ctx: Context, clock: FixedClock) -> None:
    publish(drill_ctx)
    switch(drill_ctx, clock)
    done = rotate_root(drill_ctx, step=True)
    assert done.step == "retired"
    recorded = events(drill_ctx)
    again = rotate_root(drill_ctx, step=True)
    assert (again.step, again.done) == ("retired", ())
    assert events(drill_ctx) == recorded


@SQLITE_ONLY
def test_step_without_a_rotation_is_refused(drill_ctx: Context) -> None:
    with pytest.raises(Conflict, match="no root rotation in progress"):
        rotate_root(drill_ctx, step=True)
    assert ca_rows(drill_ctx, "cross") == []


@SQLITE_ONLY
def test_status_shows_the_root_rotation_step(drill_ctx: Context, clock: FixedClock) -> None:
    assert authority_status(drill_ctx).root_rotation is None
    published = publish(drill_ctx)
    status = authority_status(drill_ctx)
    assert (status.root_rotation, status.root_switch_after) == ("published", published.switch_after)
    roots = {c.serial: c for c in status.cas if c.role == "root"}
    assert roots[published.new_root].state == "prepared"
    assert roots[published.new_root].next_transition is not None
    assert "switch" in roots[published.new_root].next_transition
    assert roots[published.new_root].next_at == published.switch_after
    assert status.bundle_sequence == read_bundle(drill_ctx, "mesh").sequence

    switch(drill_ctx, clock)
    status = authority_status(drill_ctx)
    roots = {c.serial: c for c in status.cas if c.role == "root"}
    assert status.root_rotation == "switched"
    assert (roots[published.old_root].state, roots[published.new_root].state) == (
        "retiring",
        "active",
    )
    assert "retire" in (roots[published.old_root].next_transition or "")

    rotate_root(drill_ctx, step=True, force=True)
    status = authority_status(drill_ctx)
    assert status.root_rotation == "retired"
    assert {c.serial: c.state for c in status.cas if c.role == "root"} == {
        published.old_root: "retired",
        published.new_root: "active",
    }


@SQLITE_ONLY
def test_intermediates_rotated_during_the_overlap_stay_under_the_old_root(
    drill_ctx: Context, clock: FixedClock
) -> None:
    old_root = only(drill_ctx, "root", "active")
    publish(drill_ctx)
    new_root = only(drill_ctx, "root", "prepared")
    rotate(drill_ctx, force=True)
    rotate(drill_ctx, force=True)
    issuing = only(drill_ctx, "intermediate", "active")
    assert issuing.parent_id == old_root.id
    issued = svid(drill_ctx)
    assert issued.issuer.chain[1:] == (cross(drill_ctx, old_root.id, new_root.id),)

    rotate(drill_ctx, force=True)  # prepared under the old root, then the switch happens
    stale = only(drill_ctx, "intermediate", "prepared")
    switch(drill_ctx, clock)
    assert ca_rows(drill_ctx, state="prepared") == []
    assert {r.serial for r in ca_rows(drill_ctx, state="retired")} >= {stale.serial}
    assert only(drill_ctx, "intermediate", "active").parent_id == new_root.id
    # and the scheduled rotation after the switch keeps to the new root
    rotate(drill_ctx, force=True)
    assert only(drill_ctx, "intermediate", "prepared").parent_id == new_root.id


@SQLITE_ONLY
def test_an_expired_root_leaves_the_bundle_an_hour_later(
    bare_ctx: Context, clock: FixedClock
) -> None:
    params = AuthorityParams(
        TRUST_DOMAIN, ca_ttl=CA_TTL, svid_ttl=SVID_TTL, root_ttl=Ttl.parse("1d")
    )
    init_authority(bare_ctx, params)
    old = cert_of(only(bare_ctx, "root", "active"))
    clock.advance(dt.timedelta(hours=2))
    publish(bare_ctx)
    new = cert_of(only(bare_ctx, "root", "prepared"))
    assert new.not_valid_after_utc > old.not_valid_after_utc + dt.timedelta(hours=1)
    switch(bare_ctx, clock)  # issuing under the new root; the old one is still published
    sequence = read_bundle(bare_ctx, "mesh").sequence
    assert len(bundle_certs(bare_ctx)) == 2

    clock.current = old.not_valid_after_utc + dt.timedelta(hours=1) - SECOND
    rotate_cas(bare_ctx)
    assert read_bundle(bare_ctx, "mesh").sequence == sequence
    assert len(bundle_certs(bare_ctx)) == 2

    clock.current = old.not_valid_after_utc + dt.timedelta(hours=1)
    rotate_cas(bare_ctx)
    assert bundle_certs(bare_ctx) == [new]
    assert read_bundle(bare_ctx, "mesh").sequence == sequence + 1
    rotate_cas(bare_ctx)
    assert read_bundle(bare_ctx, "mesh").sequence == sequence + 1


@SQLITE_ONLY
def test_a_cross_certificate_has_no_crl_of_its_own(drill_ctx: Context, clock: FixedClock) -> None:
    """Regression: ``GET /v1/crl/mesh/<cross serial>.pem`` (no authentication) made the issuing
    root sign an empty CRL under its own name and key identifier, numbered from 1 again: a
    genuine CRL of that root that hides the revocation of "old signed by new". A cross
    certificate is no CRL issuer: 404, and nothing is signed or stored, before and after the
    retire step revokes it."""
    publish(drill_ctx)
    new_row = only(drill_ctx, "root", "prepared")
    switch(drill_ctx, clock)
    rotate_root(drill_ctx, step=True, force=True)
    root_crl = current_crl(drill_ctx, "mesh", new_row.serial)
    crosses = ca_rows(drill_ctx, "cross")
    assert len(crosses) == 2

    with TestClient(create_app(drill_ctx), raise_server_exceptions=False) as client:
        for row in crosses:
            with pytest.raises(NotFound, match="cross certificate"):
                current_crl(drill_ctx, "mesh", row.serial)
            for form in ("crl", "pem"):
                response = client.get(f"/v1/crl/mesh/{row.serial}.{form}")
                assert response.status_code == 404, response.text
                assert "cross certificate" in response.json()["detail"]
            # the certificate itself is still served (caIssuers)
            assert client.get(f"/v1/ca/mesh/{row.serial}.crt").status_code == 200
    with drill_ctx.engine.connect() as connection:
        stored = connection.execute(
            sa.text("SELECT count(*) FROM crl JOIN ca ON crl.ca_id = ca.id WHERE ca.role = 'cross'")
        ).scalar_one()
    assert stored == 0
    assert current_crl(drill_ctx, "mesh", new_row.serial) == root_crl


def _handle(row: CaRow) -> KeyHandle:
    return KeyHandle(row.key_backend, row.key_ref, KeyType(row.key_type))


@SQLITE_ONLY
@needs_openssl
def test_retiring_the_old_root_ends_every_trust_path_through_it(
    drill_ctx: Context, clock: FixedClock, tmp_path: Path
) -> None:
    """Someone holding the retired root's key mints a leaf; "old signed by new" would make it
    verify against the new root alone (for years): it is revoked on the new root's CRL, and
    the old key is destroyed."""
    old_row = only(drill_ctx, "root", "active")
    old_key = drill_ctx.keys.load(_handle(old_row))  # what a thief would have kept
    publish(drill_ctx)
    new_row = only(drill_ctx, "root", "prepared")
    old_by_new = cross(drill_ctx, old_row.id, new_row.id)
    switch(drill_ctx, clock)
    rotate_root(drill_ctx, step=True, force=True)

    crosses = ca_rows(drill_ctx, "cross")
    assert {(r.state, r.revocation_reason) for r in crosses} == {
        ("revoked", RevocationReason.CESSATION_OF_OPERATION.value)
    }
    new_crl = x509.load_der_x509_crl(current_crl(drill_ctx, "mesh", new_row.serial).der)
    old_crl = x509.load_der_x509_crl(current_crl(drill_ctx, "mesh", old_row.serial).der)
    listed = new_crl.get_revoked_certificate_by_serial_number(old_by_new.serial_number)
    assert listed is not None
    assert listed.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.cessation_of_operation
    )
    # "new signed by old" is on the old root's last CRL, valid as long as the old root
    assert {r.serial_number for r in old_crl} == {cert_of(r).serial_number for r in crosses} - {
        old_by_new.serial_number
    }
    assert old_crl.next_update_utc == cert_of(old_row).not_valid_after_utc
    with pytest.raises(Unavailable, match="is missing from the file key store"):
        drill_ctx.keys.load(_handle(old_row))

    now = clock.now()
    spec = LeafSpec(
        new_key(KeyType.EC_P256).public_key(),
        SpiffeId.parse("spiffe://example.org/evil"),
        Serial.generate(),
        now - SECOND,
        now + dt.timedelta(minutes=5),
        cert_of(old_row),
    )
    evil = sign(leaf_builder(spec), old_key)
    result = openssl_verify_with_crls(
        tmp_path, evil, root=cert_of(new_row), intermediate=old_by_new, crls=[new_crl, old_crl]
    )
    assert result.returncode != 0, f"openssl accepted it: {result.stdout}"
    assert "certificate revoked" in result.stdout + result.stderr


@SQLITE_ONLY
def test_every_step_rewrites_the_data_dir_bundle_file(
    drill_ctx: Context, clock: FixedClock
) -> None:
    """``<data dir>/bundle.pem`` follows the stored bundle without a running server."""
    bundle_file = drill_ctx.settings.data_dir / "bundle.pem"

    def on_disk() -> list[x509.Certificate]:
        assert bundle_file.read_bytes() == read_bundle(drill_ctx, "mesh").pem
        return x509.load_pem_x509_certificates(bundle_file.read_bytes())

    old = cert_of(only(drill_ctx, "root", "active"))
    publish(drill_ctx)
    new = cert_of(only(drill_ctx, "root", "prepared"))
    assert on_disk() == [old, new]
    switch(drill_ctx, clock)
    assert on_disk() == [old, new]
    rotate_root(drill_ctx, step=True, force=True)
    assert on_disk() == [new]


def _race(
    ctx: Context, monkeypatch: pytest.MonkeyPatch, action: Callable[[], RootRotation]
) -> tuple[RootRotation, RootRotation]:
    """``action`` in two threads at once, overlapping the same way every time: the first holds
    the rotation lock while it creates a key, the second starts then and must still be waiting
    a second later; the first then goes on. (the first's result, the second's)"""
    inside, go = threading.Event(), threading.Event()
    create = ctx.keys.create

    def slow_create(*args: object, **kwargs: object) -> KeyHandle:
        if threading.current_thread().name == "first":
            inside.set()
            go.wait(10)
        return create(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ctx.keys, "create", slow_create)
    results: dict[str, RootRotation | BaseException] = {}

    def run(name: str) -> None:
        try:
            results[name] = action()
        except BaseException as exc:
            results[name] = exc

    first = threading.Thread(target=run, args=("first",), name="first")
    second = threading.Thread(target=run, args=("second",), name="second")
    first.start()
    assert inside.wait(10)  # the first holds the lock
    second.start()
    second.join(1.0)  # the second must not get past the state read while the first acts
    assert second.is_alive()
    go.set()
    first.join(30)
    second.join(30)
    done, waited = results["first"], results["second"]
    assert isinstance(done, RootRotation), done
    assert isinstance(waited, RootRotation), waited
    return done, waited


@SQLITE_ONLY
def test_a_concurrent_publish_waits_and_reports_the_state(
    drill_ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two publishes at once: the second waits for the first and reports the rotation it made
    (docs/rotation.md: a re-run "reports the state and changes nothing"); no key is left
    behind and no database error escapes."""
    keys_dir = drill_ctx.settings.data_dir / "keys"
    keys_before = set(keys_dir.iterdir())
    done, waited = _race(drill_ctx, monkeypatch, lambda: publish(drill_ctx))
    assert done.step == waited.step == "published"
    assert (waited.old_root, waited.new_root, waited.done) == (done.old_root, done.new_root, ())
    assert len(ca_rows(drill_ctx, "root")) == 2
    assert len(ca_rows(drill_ctx, "cross")) == 2
    assert len(set(keys_dir.iterdir()) - keys_before) == 1, "a key was left behind"


@SQLITE_ONLY
def test_two_concurrent_steps_take_one_step(
    drill_ctx: Context, clock: FixedClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ``--step`` runs at once, both having read "published": the first switches, the
    second waits for the lock, finds the state moved and reports it instead of retiring the
    old root (and destroying its key) right after the switch (docs/rotation.md)."""
    publish(drill_ctx)
    old_root = only(drill_ctx, "root", "active")
    clock.current = switch_after(drill_ctx)
    done, waited = _race(drill_ctx, monkeypatch, lambda: rotate_root(drill_ctx, step=True))
    assert (done.step, waited.step, waited.done) == ("switched", "switched", ())
    assert only(drill_ctx, "root", "retiring").serial == old_root.serial
    drill_ctx.keys.load(_handle(old_root))  # not destroyed
    assert authority_status(drill_ctx).root_rotation == "switched"


@SQLITE_ONLY
def test_retire_waits_for_istio_intermediates_signed_by_the_old_root(
    drill_ctx: Context, clock: FixedClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An Istio cluster's intermediate is signed by the root itself: retiring the old root while
    it is valid would leave istiod signing with a CA nothing trusts (and its root key gone)."""
    params = IstioParams(
        "east", ttl=Ttl.parse("30d"), output=tmp_path / "east", output_format="files"
    )
    under_old = issue_istio_intermediate(drill_ctx, params)
    publish(drill_ctx)
    old_root = only(drill_ctx, "root", "active")
    with caplog.at_level("WARNING", logger="trellis.authority"):
        switch(drill_ctx, clock)
    assert "Istio cluster(s) east still have an intermediate under the old root" in caplog.text
    recorded = events(drill_ctx)
    old_serial = format(under_old.certificate.serial_number, "x")
    named = f"signed by the old root itself: istio-intermediate {old_serial[:16]} "
    with pytest.raises(Conflict, match=re.escape(named + "(cli (istio cluster east))")):
        rotate_root(drill_ctx, step=True)
    assert events(drill_ctx) == recorded
    assert only(drill_ctx, "root", "retiring").serial == old_root.serial

    # re-issued under the new root, the replaced intermediate still holds the retirement up
    # until it is revoked (or expires)
    under_new = issue_istio_intermediate(drill_ctx, params)
    assert under_new.chain[1] == cert_of(only(drill_ctx, "root", "active"))
    with pytest.raises(Conflict, match="istio-intermediate"):
        rotate_root(drill_ctx, step=True)
    revoke_certificate(
        drill_ctx, Serial(under_old.certificate.serial_number), RevocationReason.SUPERSEDED, "t"
    )
    assert rotate_root(drill_ctx, step=True).step == "retired"


@SQLITE_ONLY
def test_ocsp_for_a_retired_root_whose_key_is_gone_is_unauthorized(
    drill_ctx: Context, clock: FixedClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The retired root's key is destroyed on purpose: no responder can be certified for it
    again, so OCSP for what it signed answers ``unauthorized`` (RFC 6960 §2.3), not
    ``tryLater`` with an error logged on every request. The retired intermediate under it
    keeps its key and goes on answering for its SVIDs."""
    old_row = only(drill_ctx, "root", "active")
    old_svid = svid(drill_ctx)
    publish(drill_ctx)
    new_row = only(drill_ctx, "root", "prepared")
    new_by_old = cross(drill_ctx, new_row.id, old_row.id)
    switch(drill_ctx, clock)
    rotate_root(drill_ctx, step=True, force=True)

    with caplog.at_level("DEBUG"):
        for _ in range(2):
            answer = ask(drill_ctx, request_der(new_by_old, cert_of(old_row)))
            assert answer.response_status is ocsp.OCSPResponseStatus.UNAUTHORIZED
    assert [r.levelname for r in caplog.records if r.levelno >= 30] == []
    retired_intermediate = old_svid.issuer.certificate
    answer = ask(drill_ctx, request_der(old_svid.certificate, retired_intermediate))
    assert answer.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    assert answer.certificate_status is ocsp.OCSPCertStatus.GOOD
