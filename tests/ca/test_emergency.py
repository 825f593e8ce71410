"""Emergency revocation of the issuing intermediate (``ca.emergency.revoke_intermediate``): one
transaction switches to a fresh intermediate under the same root, or nothing changes at all."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509 import ocsp
from sqlmodel import Session, select

import ca.emergency
from ca.authority import active_issuer, bundle_pem
from ca.certs import CertStatus, get_certificate, revoke_certificate, revoke_identity
from ca.clock import FixedClock
from ca.config import Context
from ca.crl import CRL_LIFETIME, Crl, current_crl, refresh_stale_crls
from ca.durations import Ttl
from ca.emergency import revoke_intermediate
from ca.errors import AuthenticationFailed, Conflict, InternalError, NotFound, Unavailable
from ca.identity import SpiffeId
from ca.profiles import BACKDATE
from ca.revocation import RevocationReason
from ca.serial import Serial
from ca.store.models import CaRow
from tests.ca.svidkit import SQLITE_ONLY, count_rows, enrol
from tests.ca.test_crl import crl_of, listed, needs_openssl, openssl_verify_with_crls
from tests.ca.test_issue import renew
from tests.ca.test_ocsp import ask, request_der
from tests.certassert import assert_is_ca, assert_is_svid_leaf

TD = "example.org"


def intermediates(ctx: Context) -> dict[str, CaRow]:
    with Session(ctx.engine) as session:
        rows = session.exec(select(CaRow).where(CaRow.role == "intermediate")).all()
    return {row.serial: row for row in rows}


def key_files(ctx: Context) -> list[str]:
    return sorted(path.name for path in (ctx.settings.data_dir / "keys").iterdir())


def test_revoke_intermediate_switches_to_a_new_one_under_the_same_root(
    ctx: Context, clock: FixedClock
) -> None:
    before = active_issuer(ctx)
    old, root = before.certificate, before.roots[0]
    bundle = bundle_pem(ctx)
    live = [enrol(ctx, f"spiffe://{TD}/live-{i}") for i in range(2)]
    gone = enrol(ctx, f"spiffe://{TD}/revoked")
    revoke_certificate(ctx, Serial(gone.cert.serial_number), RevocationReason.SUPERSEDED, "t")
    expired = enrol(ctx, f"spiffe://{TD}/expired", ttl=Ttl(60))
    clock.advance(dt.timedelta(minutes=5))

    result = revoke_intermediate(ctx, actor="test")

    assert result.revoked_serial == Serial(old.serial_number)
    assert result.new_serial != result.revoked_serial
    assert {i.serial.value for i in result.to_reissue} == {w.cert.serial_number for w in live}
    assert expired.cert.serial_number not in {i.serial.value for i in result.to_reissue}
    rows = intermediates(ctx)
    assert len(rows) == 2
    old_row, new_row = rows[result.revoked_serial.hex], rows[result.new_serial.hex]
    assert (old_row.state, old_row.revoked_at) == ("revoked", clock.now())
    assert old_row.revocation_reason == RevocationReason.CA_COMPROMISE.value
    assert (new_row.state, new_row.revoked_at, new_row.parent_id) == (
        "active",
        None,
        old_row.parent_id,
    )

    after = active_issuer(ctx)
    new = after.certificate
    assert new.serial_number == result.new_serial.value
    assert_is_ca(new, trust_domain=TD, path_length=0, issuer=root)
    assert new.public_key() != old.public_key()
    assert after.roots == before.roots and bundle_pem(ctx) == bundle  # relying parties: no change
    assert new.not_valid_before_utc <= clock.now() < new.not_valid_after_utc

    fresh = enrol(ctx, f"spiffe://{TD}/fresh")
    assert fresh.svid.issuer.certificate == new
    assert_is_svid_leaf(fresh.cert, spiffe_id=f"spiffe://{TD}/fresh", issuer=new)
    assert x509.load_pem_x509_certificates(fresh.full_chain_pem)[1] == new


@SQLITE_ONLY
def test_a_second_emergency_revokes_the_replacement_too(ctx: Context) -> None:
    first = revoke_intermediate(ctx, actor="test", reason=RevocationReason.KEY_COMPROMISE)
    second = revoke_intermediate(ctx, actor="test")
    assert second.revoked_serial == first.new_serial
    assert listed(crl_of(ctx, "root")) == {first.revoked_serial.value, second.revoked_serial.value}
    states = sorted(row.state for row in intermediates(ctx).values())
    assert states == ["active", "revoked", "revoked"]


@SQLITE_ONLY
def test_an_authority_initialised_again_meanwhile_is_not_revoked(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The serial the caller saw issuing is gone once the rotation lock is held (an init
    --force replaced the authority while the request waited): revoking whatever issues now
    would withdraw a CA nobody suspected. Refused, nothing changed."""
    before = intermediates(ctx)
    keys = key_files(ctx)
    monkeypatch.setattr(ca.emergency, "_active_serial", lambda _ctx, _a: "4001" + "0" * 34)
    with pytest.raises(Conflict, match="initialised again while this request waited"):
        revoke_intermediate(ctx, actor="test")
    assert intermediates(ctx) == before
    assert key_files(ctx) == keys


def test_an_intermediate_whose_key_is_gone_is_still_revoked_onto_the_roots_crl(
    ctx: Context, clock: FixedClock
) -> None:
    """The compromised key deleted first (the file removed): only the root's key is needed. The
    old CA's own final CRL is skipped, saying why, and the CRL job goes on for the others."""
    old_row = next(row for row in intermediates(ctx).values() if row.state == "active")
    old_crl = current_crl(ctx, "mesh", old_row.serial)
    (ctx.settings.data_dir / "keys" / f"{old_row.key_ref}.pem").unlink()
    ctx.cache.clear()

    result = revoke_intermediate(ctx, actor="test")

    assert result.revoked_serial == Serial.parse(old_row.serial)
    assert result.final_crl_skipped is not None
    assert "missing from the file key store" in result.final_crl_skipped
    assert result.revoked_serial.value in listed(crl_of(ctx, "root"))
    assert current_crl(ctx, "mesh", old_row.serial).der == old_crl.der  # not re-signed
    assert enrol(ctx, f"spiffe://{TD}/fresh").svid.issuer.certificate.serial_number == (
        result.new_serial.value
    )
    clock.advance(CRL_LIFETIME)  # every CRL due: the job skips the keyless one, signs the rest
    refreshed = {crl.ca_serial for crl in refresh_stale_crls(ctx)}
    assert old_row.serial not in refreshed
    assert result.new_serial.hex in refreshed


def _revoked_without_its_key(ctx: Context) -> tuple[CaRow, Crl]:
    """The active intermediate, its key file removed, then revoked in an emergency; and the
    last CRL it signed (read before)."""
    old_row = next(row for row in intermediates(ctx).values() if row.state == "active")
    last = current_crl(ctx, "mesh", old_row.serial)
    (ctx.settings.data_dir / "keys" / f"{old_row.key_ref}.pem").unlink()
    ctx.cache.clear()
    assert revoke_intermediate(ctx, actor="test").final_crl_skipped is not None
    return intermediates(ctx)[old_row.serial], last


@SQLITE_ONLY
def test_what_an_intermediate_revoked_without_its_key_issued_can_be_revoked(
    ctx: Context, clock: FixedClock
) -> None:
    """Regression: the revocation failed ("CA key ... is missing", exit 8, 503), so the leaf
    stayed active and its renewal went on working. Only its issuer's CRL, which the root's CRL
    makes moot, cannot be signed: the leaf is revoked, OCSP says so, renewal is refused."""
    one, two = enrol(ctx, f"spiffe://{TD}/one"), enrol(ctx, f"spiffe://{TD}/two")
    issuer, root = active_issuer(ctx).certificate, active_issuer(ctx).roots[0]
    assert ask(ctx, request_der(one.cert, issuer)).certificate_status is ocsp.OCSPCertStatus.GOOD
    old, old_crl = _revoked_without_its_key(ctx)

    info = revoke_certificate(
        ctx, Serial(one.cert.serial_number), RevocationReason.KEY_COMPROMISE, "test"
    )
    assert info.status is CertStatus.REVOKED
    assert info.crl_skipped is not None and "missing from the file key store" in info.crl_skipped
    (by_id,) = revoke_identity(
        ctx, SpiffeId.parse(f"spiffe://{TD}/two"), RevocationReason.SUPERSEDED, "t"
    )
    assert by_id.status is CertStatus.REVOKED and by_id.crl_skipped == info.crl_skipped
    assert current_crl(ctx, "mesh", old.serial).der == old_crl.der  # nothing half-signed
    # the responder, made while the key was there, has its own key: OCSP says revoked
    answer = ask(ctx, request_der(one.cert, issuer))
    assert answer.certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert answer.revocation_reason is x509.ReasonFlags.key_compromise
    assert Serial.parse(old.serial).value in listed(crl_of(ctx, "root"))
    assert root == active_issuer(ctx).roots[0]
    for workload in (one, two):
        with pytest.raises(AuthenticationFailed, match="revoked: it cannot be renewed"):
            renew(ctx, workload)
    # An issuer that is not revoked keeps the rule: no revocation it cannot publish.
    fresh = enrol(ctx, f"spiffe://{TD}/fresh")
    active = next(row for row in intermediates(ctx).values() if row.state == "active")
    (ctx.settings.data_dir / "keys" / f"{active.key_ref}.pem").unlink()
    ctx.cache.clear()
    with pytest.raises(Unavailable, match="missing from the file key store"):
        revoke_certificate(ctx, Serial(fresh.cert.serial_number), RevocationReason.SUPERSEDED, "t")
    assert get_certificate(ctx, Serial(fresh.cert.serial_number)).status is CertStatus.ACTIVE


@SQLITE_ONLY
def test_the_last_crl_of_a_ca_revoked_without_its_key_is_served_until_it_expires(
    ctx: Context, clock: FixedClock
) -> None:
    """Regression: once due for re-signing (16 h before nextUpdate) every read tried to sign,
    failed, and answered 503 though the stored CRL was still valid (docs/revocation.md)."""
    old, last = _revoked_without_its_key(ctx)
    clock.advance(CRL_LIFETIME - dt.timedelta(hours=15))  # due, 15 hours of validity left
    assert current_crl(ctx, "mesh", old.serial) == last
    # The others: re-signed (thisUpdate is backdated, as certificates' notBefore is).
    assert current_crl(ctx, "mesh", "root").this_update == clock.now() - BACKDATE
    clock.current = last.next_update
    with pytest.raises(Unavailable, match="missing from the file key store"):
        current_crl(ctx, "mesh", old.serial)


@SQLITE_ONLY
def test_an_unknown_authority_is_not_found_and_creates_no_key(ctx: Context) -> None:
    """Regression: this used to be NotInitialised (a retryable 503 over REST)."""
    files = key_files(ctx)
    with pytest.raises(NotFound, match="no authority"):
        revoke_intermediate(ctx, actor="test", authority="nope")
    assert key_files(ctx) == files


@SQLITE_ONLY
@needs_openssl
def test_openssl_refuses_old_svids_and_accepts_new_ones(ctx: Context, tmp_path: Path) -> None:
    before = active_issuer(ctx)
    old, root = before.certificate, before.roots[0]
    old_svid = enrol(ctx, f"spiffe://{TD}/old").cert

    result = revoke_intermediate(ctx, actor="test")
    new = active_issuer(ctx).certificate
    new_svid = enrol(ctx, f"spiffe://{TD}/new").cert
    root_crl = crl_of(ctx, "root")
    old_crl, new_crl = crl_of(ctx, result.revoked_serial.hex), crl_of(ctx, "intermediate")

    refused = openssl_verify_with_crls(
        tmp_path, old_svid, root=root, intermediate=old, crls=[root_crl, old_crl]
    )
    assert refused.returncode != 0, refused.stdout
    output = refused.stdout + refused.stderr
    # error 23 (X509_V_ERR_CERT_REVOKED) at depth 1: the intermediate, not the leaf.
    assert "error 23 at 1 depth lookup: certificate revoked" in output, output
    # The leaf CRL alone says nothing against it: the root's CRL is what refuses it.
    leaf_only = openssl_verify_with_crls(
        tmp_path, old_svid, root=root, intermediate=old, crls=[old_crl], check_all=False
    )
    assert leaf_only.returncode == 0, leaf_only.stdout + leaf_only.stderr

    accepted = openssl_verify_with_crls(
        tmp_path, new_svid, root=root, intermediate=new, crls=[root_crl, new_crl]
    )
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr


def _fail_after(
    real: Callable[..., object], calls: list[int], on_call: int
) -> Callable[..., object]:
    """Wrap ``real``: run it, then raise on the ``on_call``-th call (after its side effects)."""

    def wrapper(*args: object, **kwargs: object) -> object:
        value = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == on_call:
            raise InternalError("injected failure")
        return value

    return wrapper


# Where the failure is injected: (function in ca.emergency, which call fails).
FAILURES = {
    "after-signing-the-new-intermediate": ("sign_new_ca", 1),
    "after-re-signing-the-root-crl": ("refresh_crl", 1),
    "after-re-signing-the-old-intermediate-crl": ("refresh_crl_if_signable", 1),
}


@pytest.mark.parametrize("where", list(FAILURES), ids=[f"fail/{w}" for w in FAILURES])
def test_a_failure_midway_changes_nothing_and_leaves_no_key_behind(
    ctx: Context, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    before = active_issuer(ctx)
    live = enrol(ctx, f"spiffe://{TD}/web")
    root_crl_before = current_crl(ctx, "mesh", "root")
    files, ca_rows = key_files(ctx), count_rows(ctx, "ca")
    name, on_call = FAILURES[where]
    monkeypatch.setattr(ca.emergency, name, _fail_after(getattr(ca.emergency, name), [], on_call))

    with pytest.raises(InternalError, match="injected"):
        revoke_intermediate(ctx, actor="test")
    monkeypatch.undo()

    assert key_files(ctx) == files, "a key was left behind"
    assert count_rows(ctx, "ca") == ca_rows
    (row,) = intermediates(ctx).values()
    assert (row.serial, row.state, row.revoked_at) == (
        format(before.certificate.serial_number, "x"),
        "active",
        None,
    )
    root_crl = current_crl(ctx, "mesh", "root")
    assert (root_crl.number, root_crl.der) == (root_crl_before.number, root_crl_before.der)
    # Still issuing from the old intermediate, and a retry goes through.
    assert enrol(ctx, f"spiffe://{TD}/after").svid.issuer.certificate == before.certificate
    result = revoke_intermediate(ctx, actor="test")
    assert live.cert.serial_number in {i.serial.value for i in result.to_reissue}
    assert len(key_files(ctx)) == len(files) + 1
