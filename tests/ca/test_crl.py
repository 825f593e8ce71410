"""Per-CA v2 CRLs (``ca.crl``) and certificate revocation (``ca.certs``): every CRL field checked
with cryptography against the FixedClock, then real openssl verifying CRLs and refusing revoked
SVIDs. Revocation-path properties (CRL numbers, conflicts, revoke-by-identity) run on SQLite and
PostgreSQL; the content checks on SQLite only (the database never changes the signed bytes).

Also here: the CRL Distribution Points / Authority Information Access pointers Trellis puts in
certificates when ``Settings.public_url`` is set, and ``tests.certassert``'s checks of them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlmodel import Session, select

import ca.crl
from ca.authority import AuthorityParams, Issuer, active_issuer, init_authority
from ca.certs import CertStatus, get_certificate, revoke_certificate, revoke_identity
from ca.clock import FixedClock
from ca.config import Context, Settings, build_context
from ca.crl import CRL_LIFETIME, current_crl, refresh_stale_crls
from ca.durations import Ttl
from ca.emergency import revoke_intermediate
from ca.errors import Conflict, NotFound
from ca.identity import SpiffeId, TrustDomain
from ca.jobs import renew_server_certificate, resign_crls
from ca.keys import KeyHandle, KeyType, Signer
from ca.logs import REQUEST_ID
from ca.profiles import BACKDATE, LeafSpec, RevocationUrls, leaf_builder, sign
from ca.revocation import RevocationReason
from ca.root_rotation import rotate_root
from ca.rotation import rotate
from ca.serial import Serial
from ca.serving import ensure_server_certificate
from ca.store.models import CaRow, CrlRow
from tests.ca.svidkit import SQLITE_ONLY, add_entry, count_rows, enrol, join_secret, new_key
from tests.certassert import ExpectedUrls, assert_is_ca, assert_is_crl, assert_is_svid_leaf

TD = "example.org"
MESH = "mesh"

needs_openssl = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="the openssl binary is not installed"
)


# --- helpers shared with test_emergency.py ---------------------------------------------------


def serial_of(cert: x509.Certificate) -> Serial:
    return Serial(cert.serial_number)


def crl_of(ctx: Context, selector: str = "intermediate") -> x509.CertificateRevocationList:
    return x509.load_der_x509_crl(current_crl(ctx, MESH, selector).der)


def listed(crl: x509.CertificateRevocationList) -> set[int]:
    return {entry.serial_number for entry in crl}


def crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def root_of(issuer: Issuer) -> x509.Certificate:
    (root,) = issuer.roots
    return root


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def crl_pem(*crls: x509.CertificateRevocationList) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls)


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *args], capture_output=True, text=True, timeout=30, check=False
    )


def openssl_verify_with_crls(
    tmp: Path,
    leaf: x509.Certificate,
    *,
    root: x509.Certificate,
    intermediate: x509.Certificate,
    crls: list[x509.CertificateRevocationList],
    check_all: bool = True,
    attime: dt.datetime | None = None,
) -> subprocess.CompletedProcess[str]:
    """``openssl verify`` of ``leaf`` to ``root`` through ``intermediate`` with CRL checking:
    ``-crl_check_all`` checks every certificate in the chain, ``-crl_check`` the leaf only;
    ``attime``: the verifier's clock, if not the host's."""
    tag = format(leaf.serial_number, "x")[:12]
    at = ["-attime", str(int(attime.timestamp()))] if attime is not None else []
    args = [
        "verify",
        *at,
        "-crl_check_all" if check_all else "-crl_check",
        "-CAfile", write(tmp / f"root-{tag}.pem", pem(root)),
        "-untrusted", write(tmp / f"int-{tag}.pem", pem(intermediate)),
        "-CRLfile", write(tmp / f"crls-{tag}.pem", crl_pem(*crls)),
        write(tmp / f"leaf-{tag}.pem", pem(leaf)),
    ]  # fmt: skip
    return openssl(*args)


# --- the CRL itself --------------------------------------------------------------------------


@SQLITE_ONLY
def test_a_fresh_crl_is_v2_signed_by_its_ca_with_exact_times(
    ctx: Context, clock: FixedClock
) -> None:
    issuer = active_issuer(ctx)
    now = clock.now()
    for selector, ca_cert in (("intermediate", issuer.certificate), ("root", root_of(issuer))):
        crl = current_crl(ctx, MESH, selector)
        assert (crl.number, crl.this_update, crl.next_update) == (
            1,
            now - BACKDATE,
            now + CRL_LIFETIME,
        )
        assert crl.ca_serial == serial_of(ca_cert).hex
        parsed = x509.load_der_x509_crl(crl.der)
        assert_is_crl(parsed, issuer=ca_cert, number=1, signed_at=now, lifetime=CRL_LIFETIME)
        assert len(parsed) == 0
        # The PEM form is the same CRL.
        assert x509.load_pem_x509_crl(crl.pem) == parsed
        # Addressed by serial it is the same stored CRL, not a new one.
        by_serial = current_crl(ctx, MESH, serial_of(ca_cert).hex.upper())
        assert (by_serial.number, by_serial.der) == (1, crl.der)


@SQLITE_ONLY
def test_the_crl_signature_fails_for_any_other_key(ctx: Context) -> None:
    issuer = active_issuer(ctx)
    crl = crl_of(ctx)
    assert not crl.is_signature_valid(root_of(issuer).public_key())
    assert not crl.is_signature_valid(ec.generate_private_key(ec.SECP256R1()).public_key())


def test_crl_number_grows_by_one_per_revocation_and_reads_do_not_bump_it(
    ctx: Context, clock: FixedClock
) -> None:
    issuer = active_issuer(ctx)
    workloads = [enrol(ctx, f"spiffe://{TD}/w{i}") for i in range(3)]
    assert count_rows(ctx, "crl") == 0
    for number, workload in enumerate(workloads, start=1):
        clock.advance(dt.timedelta(minutes=1))
        revoke_certificate(ctx, serial_of(workload.cert), RevocationReason.SUPERSEDED, "test")
        # Re-signed inside the revoking transaction: the stored CRL already lists it.
        assert count_rows(ctx, "crl") == 1
        for _ in range(2):
            crl = crl_of(ctx)
            assert_is_crl(
                crl,
                issuer=issuer.certificate,
                number=number,
                signed_at=clock.now(),
                lifetime=CRL_LIFETIME,
            )
        assert listed(crl) == {w.cert.serial_number for w in workloads[:number]}


@SQLITE_ONLY
def test_every_reason_but_unspecified_is_stated_and_invalidity_dates_are_kept(
    ctx: Context, clock: FixedClock
) -> None:
    now = clock.now()
    # A zone other than UTC: the CRL must carry the same instant (GeneralizedTime is UTC). Not
    # before the certificates were valid (notBefore is backdated 30 s; RFC 5280 §5.3.2).
    compromised_at = (now - dt.timedelta(seconds=20)).astimezone(dt.timezone(dt.timedelta(hours=2)))
    revoked: dict[int, tuple[RevocationReason, dt.datetime | None]] = {}
    for i, reason in enumerate(RevocationReason):
        workload = enrol(ctx, f"spiffe://{TD}/reason-{i}")
        invalidity = compromised_at if i % 2 == 0 else None
        info = revoke_certificate(
            ctx, serial_of(workload.cert), reason, "test", invalidity_date=invalidity
        )
        assert info.status is CertStatus.REVOKED and info.revocation_reason is reason
        assert info.invalidity_date == invalidity
        revoked[workload.cert.serial_number] = (reason, invalidity)

    crl = crl_of(ctx)
    assert listed(crl) == set(revoked)
    for entry in crl:
        reason, invalidity = revoked[entry.serial_number]
        assert entry.revocation_date_utc == now
        oids = {ext.oid for ext in entry.extensions}
        if reason is RevocationReason.UNSPECIFIED:
            # RFC 5280 §5.3.1: the reason code unspecified SHOULD be absent.
            assert x509.CRLReason.oid not in oids
        else:
            ext = entry.extensions.get_extension_for_class(x509.CRLReason)
            assert not ext.critical, "RFC 5280 §5.3.1: reasonCode MUST be non-critical"
            assert ext.value.reason is reason.flag
        if invalidity is None:
            assert x509.InvalidityDate.oid not in oids
        else:
            ext_date = entry.extensions.get_extension_for_class(x509.InvalidityDate)
            assert not ext_date.critical, "RFC 5280 §5.3.2: invalidityDate MUST be non-critical"
            assert ext_date.value.invalidity_date_utc == invalidity
        assert oids <= {x509.CRLReason.oid, x509.InvalidityDate.oid}


@SQLITE_ONLY
def test_revoked_certificates_drop_off_once_they_expire(ctx: Context, clock: FixedClock) -> None:
    short = enrol(ctx, f"spiffe://{TD}/short")  # the authority default: 1h
    long = enrol(ctx, f"spiffe://{TD}/long", ttl=Ttl(12 * 3600))
    for workload in (short, long):
        revoke_certificate(ctx, serial_of(workload.cert), RevocationReason.KEY_COMPROMISE, "t")
    assert listed(crl_of(ctx)) == {short.cert.serial_number, long.cert.serial_number}

    clock.advance(dt.timedelta(hours=9))  # the CRL is due (15h left): reading re-signs it
    crl = crl_of(ctx)
    assert crl.last_update_utc == clock.now() - BACKDATE
    assert listed(crl) == {long.cert.serial_number}

    clock.advance(dt.timedelta(hours=4))  # the long one expired too; the next revocation re-signs
    late = enrol(ctx, f"spiffe://{TD}/late")
    revoke_certificate(ctx, serial_of(late.cert), RevocationReason.KEY_COMPROMISE, "t")
    assert listed(crl_of(ctx)) == {late.cert.serial_number}
    # Dropped from the CRL, still revoked in the store.
    assert get_certificate(ctx, serial_of(long.cert)).status is CertStatus.REVOKED


@SQLITE_ONLY
def test_the_root_crl_lists_a_revoked_intermediate(ctx: Context, clock: FixedClock) -> None:
    issuer = active_issuer(ctx)
    root = root_of(issuer)
    before = crl_of(ctx, "root")
    assert len(before) == 0
    clock.advance(dt.timedelta(minutes=5))
    result = revoke_intermediate(ctx, actor="test")

    crl = crl_of(ctx, "root")
    assert_is_crl(crl, issuer=root, number=crl_number(before) + 1, signed_at=clock.now())
    assert listed(crl) == {issuer.certificate.serial_number}
    (entry,) = list(crl)
    assert entry.revocation_date_utc == clock.now()
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason is x509.ReasonFlags.ca_compromise
    assert result.new_serial.value not in listed(crl)
    # The revoked intermediate keeps publishing its own CRL, by serial.
    assert_is_crl(crl_of(ctx, result.revoked_serial.hex), issuer=issuer.certificate)


def test_refresh_stale_crls_resigns_only_the_due_ones(ctx: Context, clock: FixedClock) -> None:
    issuer = active_issuer(ctx)
    t0 = clock.now()
    first = refresh_stale_crls(ctx)  # nothing stored yet: both CAs get a CRL
    assert sorted(c.ca_serial for c in first) == sorted(
        serial_of(c).hex for c in (issuer.certificate, root_of(issuer))
    )
    assert all(c.number == 1 and c.this_update == t0 - BACKDATE for c in first)
    assert refresh_stale_crls(ctx) == []
    assert resign_crls(ctx) == "re-signed 0 CRL(s)"

    clock.advance(dt.timedelta(hours=4))
    workload = enrol(ctx, f"spiffe://{TD}/web")
    revoke_certificate(ctx, serial_of(workload.cert), RevocationReason.UNSPECIFIED, "t")  # int #2

    clock.current = t0 + CRL_LIFETIME / 3 - dt.timedelta(seconds=1)  # root has > 16h left
    assert refresh_stale_crls(ctx) == []

    clock.current = t0 + CRL_LIFETIME / 3  # root: exactly 16h left, due; intermediate: 20h
    (root_crl,) = refresh_stale_crls(ctx)
    assert root_crl.ca_serial == serial_of(root_of(issuer)).hex
    assert root_crl.number == 2 and root_crl.this_update == clock.now() - BACKDATE
    assert_is_crl(
        x509.load_der_x509_crl(root_crl.der),
        issuer=root_of(issuer),
        number=2,
        signed_at=clock.now(),
        lifetime=CRL_LIFETIME,
    )
    int_crl = current_crl(ctx, MESH, "intermediate")
    assert int_crl.number == 2 and int_crl.this_update == t0 + dt.timedelta(hours=4) - BACKDATE
    assert listed(x509.load_der_x509_crl(int_crl.der)) == {workload.cert.serial_number}


# --- revocation errors -----------------------------------------------------------------------


def test_revoking_twice_is_a_conflict_and_leaves_the_crl_alone(
    ctx: Context, clock: FixedClock
) -> None:
    workload = enrol(ctx, f"spiffe://{TD}/web")
    serial = serial_of(workload.cert)
    first = revoke_certificate(ctx, serial, RevocationReason.KEY_COMPROMISE, "first")
    crl_before = current_crl(ctx, MESH, "intermediate")
    clock.advance(dt.timedelta(minutes=1))
    with pytest.raises(Conflict, match="already revoked"):
        revoke_certificate(ctx, serial, RevocationReason.SUPERSEDED, "second")
    after = get_certificate(ctx, serial)
    assert (after.revoked_at, after.revocation_reason, after.revoked_by) == (
        first.revoked_at,
        RevocationReason.KEY_COMPROMISE,
        "first",
    )
    crl_after = current_crl(ctx, MESH, "intermediate")
    assert (crl_after.number, crl_after.der) == (crl_before.number, crl_before.der)


@SQLITE_ONLY
def test_an_unknown_serial_is_not_found_and_signs_nothing(ctx: Context) -> None:
    with pytest.raises(NotFound, match="no certificate"):
        revoke_certificate(ctx, Serial.generate(), RevocationReason.KEY_COMPROMISE, "t")
    assert count_rows(ctx, "crl") == 0


@SQLITE_ONLY
def test_a_revoked_serving_certificate_is_replaced_with_a_new_key(ctx: Context) -> None:
    """Regression: the server kept presenting a certificate an admin revoked (keyCompromise),
    even after a restart, as only its lifetime, issuer and names were checked. Start-up and the
    ``server-certificate`` job (``ensure_server_certificate`` both) replace it, with a new key;
    a certificate that is still good is kept."""
    tls = ensure_server_certificate(ctx)
    first = x509.load_pem_x509_certificates(tls.cert_path.read_bytes())[0]
    key = tls.key_path.read_bytes()
    ensure_server_certificate(ctx)
    assert tls.key_path.read_bytes() == key  # unchanged while good

    revoke_certificate(ctx, serial_of(first), RevocationReason.KEY_COMPROMISE, "t")
    renew_server_certificate(ctx)  # the job
    second = x509.load_pem_x509_certificates(tls.cert_path.read_bytes())[0]
    assert second.serial_number != first.serial_number
    assert tls.key_path.read_bytes() != key
    assert second.public_key() != first.public_key()
    assert get_certificate(ctx, serial_of(second)).status is CertStatus.ACTIVE


def test_the_serving_certificate_asks_for_no_more_than_its_issuer_lives(
    ctx: Context, caplog: pytest.LogCaptureFixture
) -> None:
    """It lives as long as its issuer (7 days by default, under its 30); asking for 30 days
    had every start warn "lifetime 30d cut to the issuing CA's notAfter", a warning meant for
    workloads whose entries ask for more than the CA can give."""
    with caplog.at_level(logging.WARNING, logger="trellis.issue"):
        tls = ensure_server_certificate(ctx)
    assert not [r for r in caplog.records if r.name == "trellis.issue"], caplog.records
    served = x509.load_pem_x509_certificates(tls.cert_path.read_bytes())
    assert served[0].not_valid_after_utc <= served[1].not_valid_after_utc


def test_revoke_identity_revokes_every_live_certificate_in_one_step(
    ctx: Context, clock: FixedClock
) -> None:
    from ca.grants import join_grant
    from ca.issue import issue_svid
    from tests.ca.svidkit import make_csr

    web = f"spiffe://{TD}/web"
    entry = add_entry(ctx, web)
    _, secret = join_secret(ctx, entry, uses=4)

    def issue(ttl: Ttl | None = None) -> x509.Certificate:
        csr = make_csr(new_key(KeyType.EC_P256), uris=[web])
        return issue_svid(ctx, join_grant(ctx, secret), csr, ttl).certificate

    expired = issue(Ttl(60))
    superseded, live_a, live_b = issue(), issue(), issue()
    other = enrol(ctx, f"spiffe://{TD}/db").cert
    revoke_certificate(ctx, serial_of(superseded), RevocationReason.SUPERSEDED, "earlier")
    number_before = current_crl(ctx, MESH, "intermediate").number
    clock.advance(dt.timedelta(minutes=2))  # ``expired`` is past its notAfter now

    request = REQUEST_ID.set("req-1")  # as api.requestid sets it for a REST request
    try:
        revoked = revoke_identity(ctx, SpiffeId.parse(web), RevocationReason.KEY_COMPROMISE, "ops")
    finally:
        REQUEST_ID.reset(request)

    assert {i.serial.value for i in revoked} == {live_a.serial_number, live_b.serial_number}
    for info in revoked:
        assert info.status is CertStatus.REVOKED
        assert info.revoked_at == clock.now()
        assert info.revocation_reason is RevocationReason.KEY_COMPROMISE
        assert (info.revoked_by, info.revocation_request_id) == ("ops", "req-1")
    # Untouched: the one revoked earlier keeps its record, the expired and the other ID stay.
    earlier = get_certificate(ctx, serial_of(superseded))
    assert (earlier.revocation_reason, earlier.revoked_by) == (
        RevocationReason.SUPERSEDED,
        "earlier",
    )
    assert get_certificate(ctx, serial_of(expired)).status is CertStatus.EXPIRED
    assert get_certificate(ctx, serial_of(other)).status is CertStatus.ACTIVE
    # One step: a single re-signing lists all of them.
    crl = crl_of(ctx)
    assert crl_number(crl) == number_before + 1
    assert listed(crl) == {c.serial_number for c in (superseded, live_a, live_b)}

    with pytest.raises(NotFound, match="no live certificates"):
        revoke_identity(ctx, SpiffeId.parse(web), RevocationReason.KEY_COMPROMISE, "ops")
    with pytest.raises(NotFound):
        revoke_identity(
            ctx, SpiffeId.parse(f"spiffe://{TD}/nobody"), RevocationReason.UNSPECIFIED, "ops"
        )
    assert current_crl(ctx, MESH, "intermediate").number == number_before + 1


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
@pytest.mark.postgres
def test_concurrent_first_revocations_under_one_ca_both_succeed(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: ``refresh_crl`` used to lock the CRL row with SELECT ... FOR UPDATE, which
    locks nothing while a CA has no CRL yet, so two first revocations both inserted number 1 and
    the second died on the primary key (a failed revocation, a 500 over REST)."""
    first, second = enrol(ctx, f"spiffe://{TD}/a"), enrol(ctx, f"spiffe://{TD}/b")
    # Hold both transactions just after taking their lock, so the unsafe interleaving happens
    # every time; where the lock works the second one blocks earlier and the barrier times out.
    barrier = threading.Barrier(2)
    original = ca.crl._revoked

    def revoked_after_barrier(*args: object, **kwargs: object) -> list[x509.RevokedCertificate]:
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ca.crl, "_revoked", revoked_after_barrier)
    errors: list[BaseException] = []

    def revoke(cert: x509.Certificate) -> None:
        try:
            revoke_certificate(ctx, serial_of(cert), RevocationReason.KEY_COMPROMISE, "race")
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=revoke, args=(w.cert,)) for w in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    crl = crl_of(ctx)
    assert crl_number(crl) == 2
    assert listed(crl) == {first.cert.serial_number, second.cert.serial_number}


# --- real openssl ----------------------------------------------------------------------------


@SQLITE_ONLY
@needs_openssl
def test_openssl_verifies_every_crl_and_only_with_its_own_ca(
    ctx: Context, clock: FixedClock, tmp_path: Path
) -> None:
    issuer = active_issuer(ctx)
    root = root_of(issuer)
    victim = enrol(ctx, f"spiffe://{TD}/web")
    revoke_certificate(ctx, serial_of(victim.cert), RevocationReason.KEY_COMPROMISE, "t")
    old = issuer.certificate
    result = revoke_intermediate(ctx, actor="test")  # so the root CRL has an entry as well
    new = active_issuer(ctx).certificate
    assert serial_of(new) == result.new_serial

    cases = [
        ("root", root),
        (serial_of(old).hex, old),
        ("intermediate", new),
    ]
    for selector, ca_cert in cases:
        crl_file = write(tmp_path / f"{selector}.crl", current_crl(ctx, MESH, selector).der)
        # Only the CA's own certificate: the old and new intermediates share one subject name,
        # so a CAfile holding both would let openssl pick either.
        ca_file = write(tmp_path / f"{selector}-ca.pem", pem(ca_cert))
        ok = openssl(
            "crl", "-verify", "-inform", "DER", "-in", crl_file, "-CAfile", ca_file, "-noout"
        )
        assert ok.returncode == 0 and "verify OK" in ok.stderr, ok.stdout + ok.stderr
        text = openssl("crl", "-inform", "DER", "-in", crl_file, "-noout", "-text").stdout
        assert "Version 2 (0x1)" in text and "X509v3 CRL Number" in text, text
        assert "X509v3 Authority Key Identifier" in text, text

    # The old intermediate has the new one's subject name but another key: openssl finds it as
    # the issuer by name and must refuse the signature.
    crl_file = write(tmp_path / "new.crl", current_crl(ctx, MESH, "intermediate").der)
    impostor = write(tmp_path / "impostor.pem", pem(old))
    bad = openssl(
        "crl", "-verify", "-inform", "DER", "-in", crl_file, "-CAfile", impostor, "-noout"
    )
    # (openssl 3.0's ``crl`` exits 0 even then: only its verdict line tells.)
    assert "verify failure" in bad.stderr and "verify OK" not in bad.stderr, bad.stderr


@SQLITE_ONLY
@needs_openssl
def test_openssl_crl_check_refuses_a_revoked_svid_and_accepts_a_good_one(
    ctx: Context, tmp_path: Path
) -> None:
    issuer = active_issuer(ctx)
    good = enrol(ctx, f"spiffe://{TD}/good")
    bad = enrol(ctx, f"spiffe://{TD}/bad")
    revoke_certificate(ctx, serial_of(bad.cert), RevocationReason.KEY_COMPROMISE, "t")
    chain = {"root": root_of(issuer), "intermediate": issuer.certificate}
    crls = [crl_of(ctx)]

    ok = openssl_verify_with_crls(tmp_path, good.cert, **chain, crls=crls, check_all=False)
    assert ok.returncode == 0 and ": OK" in ok.stdout, ok.stdout + ok.stderr
    refused = openssl_verify_with_crls(tmp_path, bad.cert, **chain, crls=crls, check_all=False)
    assert refused.returncode != 0
    assert "certificate revoked" in refused.stdout + refused.stderr

    # The whole chain, with the root's CRL too.
    both = [*crls, crl_of(ctx, "root")]
    assert openssl_verify_with_crls(tmp_path, good.cert, **chain, crls=both).returncode == 0
    assert openssl_verify_with_crls(tmp_path, bad.cert, **chain, crls=both).returncode != 0


@SQLITE_ONLY
@needs_openssl
def test_openssl_a_few_seconds_behind_accepts_a_crl_signed_just_now(
    ctx: Context, clock: FixedClock, tmp_path: Path
) -> None:
    """Regression: a CRL's thisUpdate was the second it was signed, and a CRL is re-signed on
    every revocation, so OpenVPN's ``crl-verify`` or nginx's ``ssl_crl`` on a host 3 s behind
    (OpenSSL, no leeway) refused every client with "CRL is not yet valid" after each one. It
    is backdated as certificates are; the revoked client is still refused."""
    issuer = active_issuer(ctx)
    good = enrol(ctx, f"spiffe://{TD}/good")
    bad = enrol(ctx, f"spiffe://{TD}/bad")
    clock.advance(dt.timedelta(minutes=5))
    revoke_certificate(ctx, serial_of(bad.cert), RevocationReason.KEY_COMPROMISE, "t")
    chain = {"root": root_of(issuer), "intermediate": issuer.certificate}
    crls = [crl_of(ctx), crl_of(ctx, "root")]  # both signed at clock.now()
    behind = clock.now() - dt.timedelta(seconds=3)

    ok = openssl_verify_with_crls(tmp_path, good.cert, **chain, crls=crls, attime=behind)
    assert ok.returncode == 0 and ": OK" in ok.stdout, ok.stdout + ok.stderr
    refused = openssl_verify_with_crls(tmp_path, bad.cert, **chain, crls=crls, attime=behind)
    assert refused.returncode != 0
    assert "certificate revoked" in refused.stdout + refused.stderr, refused.stdout
    # A clock further behind than the backdating is still refused: the CRL is not stale-dated.
    too_far = clock.now() - BACKDATE - dt.timedelta(seconds=5)
    early = openssl_verify_with_crls(tmp_path, good.cert, **chain, crls=crls, attime=too_far)
    assert early.returncode != 0 and "CRL is not yet valid" in early.stdout + early.stderr


# --- CRL numbers under one issuer name (RFC 5280 §5.2.3, §5.2.1) ------------------------------


def revoke_new(ctx: Context, name: str) -> None:
    """Enrol a workload and revoke its SVID: its issuer signs a CRL."""
    cert = enrol(ctx, f"spiffe://{TD}/{name}").cert
    revoke_certificate(ctx, serial_of(cert), RevocationReason.UNSPECIFIED, "t")


def test_a_rotated_intermediate_numbers_its_crls_above_its_predecessor_s(
    ctx: Context, clock: FixedClock
) -> None:
    """Regression: every CA counted its CRL numbers from 1, and a rotated intermediate bears
    its predecessor's name, so its first CRLs reused numbers signed under that name. The
    numbers under one name only grow, whichever CA signs: the retired intermediate goes on
    signing CRLs (its certificates live on) and numbers them above its successor's."""
    old = active_issuer(ctx).certificate
    workloads = [enrol(ctx, f"spiffe://{TD}/w{i}") for i in range(3)]
    for workload in workloads[:2]:
        revoke_certificate(ctx, serial_of(workload.cert), RevocationReason.SUPERSEDED, "t")
    old_number = crl_number(crl_of(ctx))
    assert old_number == 2

    clock.advance(dt.timedelta(minutes=1))
    rotate(ctx, force=True)  # prepare
    rotate(ctx, force=True)  # activate
    new = active_issuer(ctx).certificate
    assert new.subject == old.subject and new.serial_number != old.serial_number
    first = crl_of(ctx)
    assert_is_crl(first, issuer=new, number=old_number + 1, signed_at=clock.now())

    revoke_certificate(ctx, serial_of(workloads[2].cert), RevocationReason.SUPERSEDED, "t")
    retired = crl_of(ctx, serial_of(old).hex)
    assert_is_crl(retired, issuer=old, number=old_number + 2)
    assert listed(retired) == {w.cert.serial_number for w in workloads}
    revoke_new(ctx, "n")
    assert crl_number(crl_of(ctx)) == old_number + 3


def test_an_emergency_replacement_numbers_its_crls_above_the_revoked_one_s(ctx: Context) -> None:
    revoke_new(ctx, "w")
    result = revoke_intermediate(ctx, actor="test")  # re-signs the old one's CRL: its 2nd
    assert crl_number(crl_of(ctx, result.revoked_serial.hex)) == 2
    assert crl_number(crl_of(ctx)) == 3


def test_init_force_numbers_the_new_cas_crls_above_the_old_ones(ctx: Context) -> None:
    """``init --force`` deletes the old CAs and their CRLs, but its new root and intermediate
    bear the old names: their numbers go on from the highest ever signed under each."""
    revoke_new(ctx, "w")
    before = {selector: crl_number(crl_of(ctx, selector)) for selector in ("root", "intermediate")}
    assert before == {"root": 1, "intermediate": 1}
    init_authority(ctx, AuthorityParams(TrustDomain.parse(TD), force=True))
    issuer = active_issuer(ctx)
    assert_is_crl(crl_of(ctx, "root"), issuer=root_of(issuer), number=before["root"] + 1)
    assert_is_crl(crl_of(ctx), issuer=issuer.certificate, number=before["intermediate"] + 1)


def test_a_crl_numbered_by_an_outdated_server_is_never_numbered_again(ctx: Context) -> None:
    """A Trellis from before the per-name counter (schema 0018), still serving after ``trellis
    migrate`` as docs/operations.md allows, numbers a CA's CRLs on from the CA's own row and
    leaves the counter behind: the next CRL signed here reused its number, for a CRL with
    other entries (seen upgrading from 9bca5a4). It is numbered above every stored one."""
    revoke_new(ctx, "w")
    issuer = active_issuer(ctx)
    assert crl_number(crl_of(ctx)) == 1
    with Session(ctx.engine) as session:  # what the outdated server wrote: its CRL number 2
        row = session.get(CrlRow, issuer.ca_id)
        assert row is not None and row.number == 1
        row.number = 2
        session.add(row)
        session.commit()
    revoke_new(ctx, "v")
    assert crl_number(crl_of(ctx)) == 3
    revoke_new(ctx, "u")
    assert crl_number(crl_of(ctx)) == 4


@SQLITE_ONLY
def test_the_restore_floor_numbers_a_name_s_first_crl_and_the_next_goes_on_by_one(
    settings: Settings, clock: FixedClock
) -> None:
    floor = 1_700_000_000_000_000
    ctx = build_context(settings, clock=clock)
    ctx.crl_floor = floor  # as restored.json sets it (ca.restored.read_marker)
    try:
        init_authority(ctx, AuthorityParams(TrustDomain.parse(TD)))
        assert crl_number(crl_of(ctx)) == floor
        revoke_new(ctx, "w")
        assert crl_number(crl_of(ctx)) == floor + 1
    finally:
        ctx.close()


# --- revocation pointers in issued certificates (Settings.public_url) ------------------------

PUBLIC_URL = "https://ca.example.test:8443"


@pytest.fixture
def public_ctx(settings: Settings, clock: FixedClock) -> Iterator[Context]:
    """An authority created while ``public_url`` is set (with a trailing slash to strip)."""
    configured = settings.model_copy(update={"public_url": PUBLIC_URL + "/"})
    ctx = build_context(configured, clock=clock)
    init_authority(ctx, AuthorityParams(TrustDomain.parse(TD)))
    yield ctx
    ctx.close()


def expected_urls(issuer: x509.Certificate) -> ExpectedUrls:
    serial = format(issuer.serial_number, "x")
    return ExpectedUrls(
        crl=f"{PUBLIC_URL}/v1/crl/{MESH}/{serial}.crl",
        ocsp=f"{PUBLIC_URL}/v1/ocsp",
        ca_issuers=f"{PUBLIC_URL}/v1/ca/{MESH}/{serial}.crt",
    )


@SQLITE_ONLY
def test_with_a_public_url_certificates_point_at_their_issuers_revocation_data(
    public_ctx: Context,
) -> None:
    issuer = active_issuer(public_ctx)
    root = root_of(issuer)
    workload = enrol(public_ctx, f"spiffe://{TD}/web", dns_names=["web.example.org"])
    assert_is_svid_leaf(
        workload.cert,
        spiffe_id=f"spiffe://{TD}/web",
        issuer=issuer.certificate,
        dns_names=["web.example.org"],
        urls=expected_urls(issuer.certificate),
    )
    # The intermediate points at the root's CRL; the root has no issuer to point at.
    assert_is_ca(
        issuer.certificate, trust_domain=TD, path_length=0, issuer=root, urls=expected_urls(root)
    )
    assert_is_ca(root, trust_domain=TD, path_length=None)
    # The CRL URL names a CRL that exists.
    assert current_crl(public_ctx, MESH, serial_of(issuer.certificate).hex).number >= 1

    # A new intermediate (emergency) points its leaves at its own CRL.
    revoke_intermediate(public_ctx, actor="test")
    new = active_issuer(public_ctx).certificate
    fresh = enrol(public_ctx, f"spiffe://{TD}/api")
    assert_is_svid_leaf(
        fresh.cert, spiffe_id=f"spiffe://{TD}/api", issuer=new, urls=expected_urls(new)
    )
    assert_is_ca(new, trust_domain=TD, path_length=0, issuer=root, urls=expected_urls(root))


@SQLITE_ONLY
def test_cross_certificates_point_at_the_signing_roots_revocation_data(
    public_ctx: Context, tmp_path: Path
) -> None:
    """Regression: a root rotation's cross certificates carried no CRL Distribution Points and
    no AIA, though the signing root's CRL lists them once retired and its OCSP responder
    answers for them, and every other CA certificate points there. Read with openssl."""
    rotate_root(public_ctx)  # publish: the new root, cross-signed both ways
    with Session(public_ctx.engine) as session:
        crosses = session.exec(select(CaRow).where(CaRow.role == "cross")).all()
        signers = {row.id: row for row in session.exec(select(CaRow)).all()}
    assert len(crosses) == 2
    for row in crosses:
        assert row.parent_id is not None
        signer = x509.load_pem_x509_certificate(signers[row.parent_id].cert_pem.encode())
        cert = x509.load_pem_x509_certificate(row.cert_pem.encode())
        assert cert.issuer == signer.subject
        assert_is_ca(
            cert, trust_domain=TD, path_length=None, issuer=signer, urls=expected_urls(signer)
        )
        pem = tmp_path / f"{row.serial}.pem"
        pem.write_text(row.cert_pem)
        shown = subprocess.run(
            [
                "openssl",
                "x509",
                "-in",
                str(pem),
                "-noout",
                "-ext",
                "crlDistributionPoints,authorityInfoAccess",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        urls = expected_urls(signer)
        assert f"URI:{urls.crl}" in shown, shown
        assert f"OCSP - URI:{urls.ocsp}" in shown, shown
        assert f"CA Issuers - URI:{urls.ca_issuers}" in shown, shown
        # the URL names a CRL that exists
        assert current_crl(public_ctx, MESH, serial_of(signer).hex).number >= 1


@pytest.mark.parametrize(
    "given",
    ["HTTPS://CA.Example.TEST:8443", "Https://ca.EXAMPLE.test:8443/"],
    ids=["ok/upper-case", "ok/mixed-case-trailing-slash"],
)
@SQLITE_ONLY
def test_a_public_url_is_written_with_its_scheme_and_host_in_lower_case(
    settings: Settings, clock: FixedClock, given: str
) -> None:
    """Scheme and host are case-insensitive (RFC 3986 §6.2.2.1) but not to every client
    (istiod's spiffeBundleUrl check is case-sensitive): certificates carry the normal form."""
    configured = Settings.model_validate({**settings.model_dump(), "public_url": given})
    assert configured.public_url is not None
    assert configured.public_url.rstrip("/") == PUBLIC_URL
    ctx = build_context(configured, clock=clock)
    try:
        init_authority(ctx, AuthorityParams(TrustDomain.parse(TD)))
        issuer = active_issuer(ctx)
        workload = enrol(ctx, f"spiffe://{TD}/web")
        assert_is_svid_leaf(
            workload.cert,
            spiffe_id=f"spiffe://{TD}/web",
            issuer=issuer.certificate,
            urls=expected_urls(issuer.certificate),
        )
    finally:
        ctx.close()


@pytest.mark.parametrize(
    ("given", "kept"),
    [("https://ca.example.test/PKI/Trellis", "https://ca.example.test/PKI/Trellis"),
     ("HTTP://[2001:DB8::1]:8080/Pki", "http://[2001:db8::1]:8080/Pki")],
    ids=["ok/path-case-kept", "ok/ipv6-host"],
)  # fmt: skip
@SQLITE_ONLY
def test_a_public_url_keeps_the_case_of_its_path(settings: Settings, given: str, kept: str) -> None:
    """The path is case-sensitive (RFC 3986 §6.2.2.1): only scheme and host are folded."""
    assert (
        Settings.model_validate({**settings.model_dump(), "public_url": given}).public_url == kept
    )


@SQLITE_ONLY
def test_without_a_public_url_certificates_carry_no_pointers(ctx: Context) -> None:
    issuer = active_issuer(ctx)
    workload = enrol(ctx, f"spiffe://{TD}/web")
    assert_is_svid_leaf(workload.cert, spiffe_id=f"spiffe://{TD}/web", issuer=issuer.certificate)
    assert_is_ca(issuer.certificate, trust_domain=TD, path_length=0, issuer=root_of(issuer))


# certassert's pointer checks must not weaken the default, and must catch wrong pointers.

_KEY = ec.generate_private_key(ec.SECP256R1())
_SIGNER = Signer(KeyHandle("test", "k", KeyType.EC_P256), _KEY)
_WEB = f"spiffe://{TD}/web"
_URLS = ExpectedUrls("https://a.test/crl", "https://a.test/ocsp", "https://a.test/ca.crt")


def _leaf(
    issuer: x509.Certificate, urls: RevocationUrls | None, **swap: object
) -> x509.Certificate:
    """A profile leaf signed by ``issuer``'s key, optionally with extensions swapped in."""
    now = issuer.not_valid_before_utc + dt.timedelta(minutes=1)
    spec = LeafSpec(
        _KEY.public_key(), SpiffeId.parse(_WEB), Serial.generate(), now,
        now + dt.timedelta(minutes=5), issuer, urls=urls,
    )  # fmt: skip
    builder = leaf_builder(spec)
    if swap:
        built = sign(builder, _SIGNER)
        builder = x509.CertificateBuilder(
            issuer_name=built.issuer,
            subject_name=built.subject,
            public_key=built.public_key(),
            serial_number=built.serial_number,
            not_valid_before=built.not_valid_before_utc,
            not_valid_after=built.not_valid_after_utc,
        )
        for ext in built.extensions:
            replacement = swap.get(type(ext.value).__name__, (ext.value, ext.critical))
            if replacement is not None:
                builder = builder.add_extension(*replacement)  # type: ignore[misc]
    return sign(builder, _SIGNER)


@pytest.fixture(scope="module")
def _self_issuer() -> x509.Certificate:
    from ca.profiles import CaSpec, ca_builder, ca_subject

    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    spec = CaSpec(
        ca_subject("Trellis", f"{TD} root"), _KEY.public_key(), TrustDomain(TD).id(),
        Serial.generate(), now - dt.timedelta(hours=1), now + dt.timedelta(days=1), None,
    )  # fmt: skip
    return sign(ca_builder(spec), _SIGNER)


_PROFILE_URLS = RevocationUrls(_URLS.crl, _URLS.ocsp, _URLS.ca_issuers)
_CDP = x509.CRLDistributionPoints
_AIA = x509.AuthorityInformationAccess
_URI = x509.UniformResourceIdentifier


def _cdp(*uris: str) -> _CDP:
    return _CDP([x509.DistributionPoint([_URI(u) for u in uris], None, None, None)])


def _aia(ocsp_url: str | None, ca_issuers: str | None) -> _AIA:
    oid = x509.oid.AuthorityInformationAccessOID
    items = [(oid.OCSP, ocsp_url), (oid.CA_ISSUERS, ca_issuers)]
    return _AIA([x509.AccessDescription(m, _URI(u)) for m, u in items if u])


URL_DEFECTS: dict[str, tuple[dict[str, object], str]] = {
    "cdp/wrong-url": ({"CRLDistributionPoints": (_cdp("https://b.test/crl"), False)}, "CRL dist"),
    "cdp/two-urls": ({"CRLDistributionPoints": (_cdp(_URLS.crl, _URLS.ocsp), False)}, "CRL dist"),
    "cdp/critical": ({"CRLDistributionPoints": (_cdp(_URLS.crl), True)}, "SHOULD be non-crit"),
    "cdp/missing": ({"CRLDistributionPoints": None}, "unexpected extension set"),
    "aia/missing": ({"AuthorityInformationAccess": None}, "unexpected extension set"),
    "aia/no-ocsp": (
        {"AuthorityInformationAccess": (_aia(None, _URLS.ca_issuers), False)},
        "authority information access",
    ),
    "aia/wrong-ocsp": (
        {"AuthorityInformationAccess": (_aia("https://b.test/ocsp", _URLS.ca_issuers), False)},
        "authority information access",
    ),
    "aia/critical": (
        {"AuthorityInformationAccess": (_aia(_URLS.ocsp, _URLS.ca_issuers), True)},
        "AIA MUST be non-critical",
    ),
}


def test_certassert_accepts_exactly_the_expected_pointers(_self_issuer: x509.Certificate) -> None:
    with_urls = _leaf(_self_issuer, _PROFILE_URLS)
    assert_is_svid_leaf(with_urls, spiffe_id=_WEB, issuer=_self_issuer, urls=_URLS)
    # The default still refuses pointers nobody asked for, and asking requires them.
    with pytest.raises(AssertionError, match="unexpected extension set"):
        assert_is_svid_leaf(with_urls, spiffe_id=_WEB, issuer=_self_issuer)
    without = _leaf(_self_issuer, None)
    with pytest.raises(AssertionError, match="unexpected extension set"):
        assert_is_svid_leaf(without, spiffe_id=_WEB, issuer=_self_issuer, urls=_URLS)


@pytest.mark.parametrize("defect", URL_DEFECTS, ids=[f"fail/{k}" for k in URL_DEFECTS])
def test_certassert_catches_wrong_pointers(defect: str, _self_issuer: x509.Certificate) -> None:
    swap, reason = URL_DEFECTS[defect]
    cert = _leaf(_self_issuer, _PROFILE_URLS, **swap)
    with pytest.raises(AssertionError, match=reason):
        assert_is_svid_leaf(cert, spiffe_id=_WEB, issuer=_self_issuer, urls=_URLS)
