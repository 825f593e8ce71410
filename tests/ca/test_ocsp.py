"""The OCSP responder (``ca.ocsp.respond``): requests built with cryptography's
``OCSPRequestBuilder``, responses parsed with ``ocsp.load_der_ocsp_response`` and checked field by
field (RFC 6960 §4.2), including the delegated responder certificate (§4.2.2.2).

Status comes from the store, so the good → revoked flow runs on SQLite and PostgreSQL; the rest
is about bytes and runs on SQLite only.
"""

from __future__ import annotations

import datetime as dt
import os
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca.authority import active_issuer
from ca.certs import revoke_certificate
from ca.clock import FixedClock
from ca.config import Context
from ca.emergency import revoke_intermediate
from ca.ocsp import MAX_REQUEST, RESPONSE_VALIDITY, respond, responder_common_name
from ca.profiles import BACKDATE
from ca.revocation import RevocationReason
from ca.serial import Serial
from tests.ca.svidkit import SQLITE_ONLY, enrol

TD = "example.org"
HASHES = {"sha1": hashes.SHA1, "sha256": hashes.SHA256}
Status = ocsp.OCSPCertStatus
Outcome = ocsp.OCSPResponseStatus


def request_der(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    algorithm: hashes.HashAlgorithm | None = None,
    nonce: bytes | None = None,
) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, algorithm or hashes.SHA1())
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def request_for_serial(
    cert: x509.Certificate, issuer: x509.Certificate, serial: int, algorithm: hashes.HashAlgorithm
) -> bytes:
    """A CertID naming ``issuer`` (hashes computed by cryptography) but another serial."""
    template = ocsp.load_der_ocsp_request(request_der(cert, issuer, algorithm))
    builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        template.issuer_name_hash, template.issuer_key_hash, serial, algorithm
    )
    return builder.build().public_bytes(serialization.Encoding.DER)


def ask(ctx: Context, der: bytes) -> ocsp.OCSPResponse:
    raw = respond(ctx, der)
    assert isinstance(raw, bytes)
    return ocsp.load_der_ocsp_response(raw)


def assert_signed_by_delegate(response: ocsp.OCSPResponse, ca_cert: x509.Certificate) -> None:
    """RFC 6960 §4.2.2.2: signed by a certificate the CA issued with id-kp-OCSPSigning, which
    the response carries and names by key hash."""
    assert response.response_status is Outcome.SUCCESSFUL
    (responder,) = response.certificates
    responder.verify_directly_issued_by(ca_cert)
    assert responder.public_key() != ca_cert.public_key(), "the CA key must not sign responses"
    key = responder.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    algorithm = response.signature_hash_algorithm
    assert algorithm is not None
    key.verify(response.signature, response.tbs_response_bytes, ec.ECDSA(algorithm))
    assert response.responder_name is None
    assert response.responder_key_hash == x509.SubjectKeyIdentifier.from_public_key(key).digest


def assert_single(
    response: ocsp.OCSPResponse,
    *,
    request: bytes,
    status: ocsp.OCSPCertStatus,
    now: dt.datetime,
    this_update: dt.datetime | None = None,
) -> None:
    """The one SingleResponse echoes the CertID, is dated ``this_update``, by default
    ``BACKDATE`` before now (as certificates and CRLs are), and valid until RESPONSE_VALIDITY
    after now."""
    asked = ocsp.load_der_ocsp_request(request)
    assert response.response_status is Outcome.SUCCESSFUL
    assert len(list(response.responses)) == 1
    assert response.certificate_status is status
    assert response.serial_number == asked.serial_number
    assert response.issuer_name_hash == asked.issuer_name_hash
    assert response.issuer_key_hash == asked.issuer_key_hash
    assert type(response.hash_algorithm) is type(asked.hash_algorithm)
    assert response.this_update_utc == (now - BACKDATE if this_update is None else this_update)
    assert response.next_update_utc == now + RESPONSE_VALIDITY


@pytest.mark.parametrize("algorithm", list(HASHES), ids=[f"certid/{h}" for h in HASHES])
def test_status_is_good_then_revoked_and_unknown_for_strangers(
    ctx: Context, clock: FixedClock, algorithm: str
) -> None:
    issuer = active_issuer(ctx).certificate
    workload = enrol(ctx, f"spiffe://{TD}/web")
    der = request_der(workload.cert, issuer, HASHES[algorithm]())

    good = ask(ctx, der)
    assert_single(good, request=der, status=Status.GOOD, now=clock.now())
    assert good.revocation_time_utc is None and good.revocation_reason is None
    assert_signed_by_delegate(good, issuer)

    clock.advance(dt.timedelta(minutes=10))
    revoked_at = clock.now()
    revoke_certificate(
        ctx, Serial(workload.cert.serial_number), RevocationReason.KEY_COMPROMISE, "test"
    )
    clock.advance(dt.timedelta(minutes=1))
    revoked = ask(ctx, der)
    assert_single(revoked, request=der, status=Status.REVOKED, now=clock.now())
    assert revoked.revocation_time_utc == revoked_at
    assert revoked.revocation_reason is x509.ReasonFlags.key_compromise
    assert_signed_by_delegate(revoked, issuer)

    stranger = request_for_serial(
        workload.cert, issuer, Serial.generate().value, HASHES[algorithm]()
    )
    unknown = ask(ctx, stranger)
    assert_single(unknown, request=stranger, status=Status.UNKNOWN, now=clock.now())
    assert_signed_by_delegate(unknown, issuer)


@SQLITE_ONLY
def test_a_fresh_revocation_is_not_dated_before_it_happened(
    ctx: Context, clock: FixedClock
) -> None:
    """thisUpdate is backdated, but a revoked status was not yet true before the revocation
    (RFC 6960 §4.2.2.1: the latest time the status is known to have been correct)."""
    issuer = active_issuer(ctx).certificate
    workload = enrol(ctx, f"spiffe://{TD}/web")
    der = request_der(workload.cert, issuer)
    clock.advance(dt.timedelta(minutes=10))
    revoked_at = clock.now()
    revoke_certificate(
        ctx, Serial(workload.cert.serial_number), RevocationReason.KEY_COMPROMISE, "test"
    )
    clock.advance(dt.timedelta(seconds=10))
    response = ask(ctx, der)
    assert response.certificate_status is Status.REVOKED
    assert response.this_update_utc == revoked_at == clock.now() - dt.timedelta(seconds=10)
    assert response.next_update_utc == clock.now() + RESPONSE_VALIDITY


@SQLITE_ONLY
def test_the_responder_certificate_is_a_delegated_ocsp_signer(
    ctx: Context, clock: FixedClock
) -> None:
    issuer = active_issuer(ctx).certificate
    workload = enrol(ctx, f"spiffe://{TD}/web")
    response = ask(ctx, request_der(workload.cert, issuer))
    (responder,) = response.certificates
    extensions = responder.extensions

    eku = extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.OCSP_SIGNING]
    nocheck = extensions.get_extension_for_class(x509.OCSPNoCheck)
    assert not nocheck.critical
    basic = extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    usage = extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not (usage.value.key_cert_sign or usage.value.crl_sign)
    assert responder.issuer == issuer.subject
    aki = extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert responder.not_valid_before_utc <= clock.now() < responder.not_valid_after_utc
    assert responder.not_valid_after_utc <= issuer.not_valid_after_utc
    assert response.next_update_utc is not None
    assert response.next_update_utc <= responder.not_valid_after_utc

    # Reused while fresh, replaced once less than a third of its life is left.
    again = ask(ctx, request_der(workload.cert, issuer)).certificates[0]
    assert again.serial_number == responder.serial_number
    clock.advance(dt.timedelta(days=5))
    later = ask(ctx, request_der(workload.cert, issuer))
    assert later.certificates[0].serial_number != responder.serial_number
    assert_signed_by_delegate(later, issuer)


@SQLITE_ONLY
def test_a_nonce_is_echoed_when_sent_and_absent_otherwise(ctx: Context) -> None:
    issuer = active_issuer(ctx).certificate
    workload = enrol(ctx, f"spiffe://{TD}/web")
    nonce = os.urandom(16)
    with_nonce = ask(ctx, request_der(workload.cert, issuer, nonce=nonce))
    echoed = with_nonce.extensions.get_extension_for_class(x509.OCSPNonce)
    assert echoed.value.nonce == nonce and not echoed.critical
    without = ask(ctx, request_der(workload.cert, issuer))
    assert list(without.extensions) == []


def _der(tag: int, content: bytes) -> bytes:
    if len(content) < 0x80:
        return bytes([tag, len(content)]) + content
    size = len(content).to_bytes((len(content).bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def _contents(der: bytes) -> bytes:
    """The content octets of one DER TLV."""
    first = der[1]
    if first < 0x80:
        return der[2 : 2 + first]
    count = first & 0x7F
    length = int.from_bytes(der[2 : 2 + count], "big")
    return der[2 + count : 2 + count + length]


def _valid_request(ctx: Context) -> bytes:
    return request_der(enrol(ctx, f"spiffe://{TD}/web").cert, active_issuer(ctx).certificate)


MALFORMED = {
    "empty": lambda good: b"",
    "garbage": lambda good: b"this is not an OCSP request",
    "truncated-der": lambda good: good[:-7],
    "trailing-junk": lambda good: good + b"\x00\x00",
    "a-certificate-instead": None,  # filled in by the test: valid DER of the wrong type
    "oversized-junk": lambda good: b"\x30\x82\x23\x00" + b"\x00" * 9000,
    "oversized-well-formed": None,  # a real request with an 8 KiB nonce
}


@SQLITE_ONLY
@pytest.mark.parametrize("case", list(MALFORMED), ids=[f"malformed/{c}" for c in MALFORMED])
def test_malformed_requests_get_a_malformed_request_response(ctx: Context, case: str) -> None:
    good = _valid_request(ctx)
    if case == "a-certificate-instead":
        der = active_issuer(ctx).certificate.public_bytes(serialization.Encoding.DER)
    elif case == "oversized-well-formed":
        issuer = active_issuer(ctx).certificate
        der = request_der(enrol(ctx, f"spiffe://{TD}/big").cert, issuer, nonce=b"n" * MAX_REQUEST)
        assert ocsp.load_der_ocsp_request(der).serial_number  # it does parse
    else:
        make = MALFORMED[case]
        assert make is not None
        der = make(good)
    response = ask(ctx, der)
    assert response.response_status is Outcome.MALFORMED_REQUEST
    # An unsuccessful response has no body (RFC 6960 §4.2.1): nothing else to read.
    with pytest.raises(ValueError):
        _ = response.certificate_status


@SQLITE_ONLY
def test_the_responder_is_named_after_its_issuer_s_common_name(ctx: Context) -> None:
    """Regression: its CN was the issuer's whole RFC 4514 name cut to 40 characters inside an
    attribute ("CN=CN=example.org intermediate,O=Trellis OCSP responder")."""
    issuer = active_issuer(ctx).certificate
    workload = enrol(ctx, f"spiffe://{TD}/web")
    (responder,) = ask(ctx, request_der(workload.cert, issuer)).certificates
    assert responder.subject.rfc4514_string() == (
        "CN=example.org intermediate OCSP responder,O=Trellis"
    )
    long_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x" * 64)])
    stub = SimpleNamespace(subject=long_name, serial_number=1)
    name = responder_common_name(stub)  # type: ignore[arg-type]
    assert len(name) == 64 and name.endswith("x OCSP responder")


@SQLITE_ONLY
def test_a_request_for_two_certificates_is_answered_not_raised(ctx: Context) -> None:
    """Regression: a request listing two CertIDs (valid RFC 6960, what ``openssl ocsp -cert a
    -cert b`` sends) made cryptography raise NotImplementedError straight out of respond()."""
    single = _valid_request(ctx)
    request_list = _contents(_contents(single))  # OCSPRequest → TBSRequest → requestList
    one = _contents(request_list)  # the single Request TLV
    two = _der(0x30, _der(0x30, _der(0x30, one + one)))
    response = ask(ctx, two)
    # one CertID per request (docs/revocation.md): cryptography parses and answers only one
    assert response.response_status is Outcome.MALFORMED_REQUEST


@SQLITE_ONLY
def test_an_unknown_certid_hash_algorithm_is_malformed_not_raised(ctx: Context) -> None:
    """Regression: a CertID hash OID cryptography does not know raised UnsupportedAlgorithm
    straight out of respond()."""
    sha1_oid = bytes.fromhex("06052b0e03021a")  # 1.3.14.3.2.26
    good = _valid_request(ctx)
    assert good.count(sha1_oid) == 1
    odd = good.replace(sha1_oid, bytes.fromhex("06052b0e03021b"))  # 1.3.14.3.2.27: not a hash
    assert ask(ctx, odd).response_status is Outcome.MALFORMED_REQUEST


@SQLITE_ONLY
def test_a_foreign_ca_is_unauthorized(ctx: Context, foreign_ctx: Context) -> None:
    """The foreign authority has the same subject names, so only the key hash tells them apart."""
    foreign_issuer = active_issuer(foreign_ctx).certificate
    ours = active_issuer(ctx).certificate
    assert foreign_issuer.subject == ours.subject
    stranger = enrol(foreign_ctx, f"spiffe://{TD}/web")
    for issuer in (foreign_issuer, active_issuer(foreign_ctx).roots[0]):
        response = ask(ctx, request_der(stranger.cert, issuer))
        assert response.response_status is Outcome.UNAUTHORIZED
    # ... and the foreign authority does not answer for ours either.
    mine = enrol(ctx, f"spiffe://{TD}/web")
    assert ask(foreign_ctx, request_der(mine.cert, ours)).response_status is Outcome.UNAUTHORIZED


@SQLITE_ONLY
def test_the_root_responder_answers_for_intermediates(ctx: Context, clock: FixedClock) -> None:
    issuer = active_issuer(ctx)
    root, old = issuer.roots[0], issuer.certificate
    der = request_der(old, root, hashes.SHA256())
    good = ask(ctx, der)
    assert_single(good, request=der, status=Status.GOOD, now=clock.now())
    assert_signed_by_delegate(good, root)

    clock.advance(dt.timedelta(minutes=3))
    result = revoke_intermediate(ctx, actor="test")
    revoked = ask(ctx, der)
    # Revoked this very second: not dated before it.
    now = clock.now()
    assert_single(revoked, request=der, status=Status.REVOKED, now=now, this_update=now)
    assert revoked.revocation_time_utc == clock.now()
    assert revoked.revocation_reason is x509.ReasonFlags.ca_compromise
    assert_signed_by_delegate(revoked, root)

    new = active_issuer(ctx).certificate
    assert new.serial_number == result.new_serial.value
    fresh = ask(ctx, request_der(new, root, hashes.SHA256()))
    assert fresh.certificate_status is Status.GOOD
    # The new intermediate answers for its own leaves with its own delegated responder.
    leaf = enrol(ctx, f"spiffe://{TD}/after").cert
    answer = ask(ctx, request_der(leaf, new))
    assert answer.certificate_status is Status.GOOD
    assert_signed_by_delegate(answer, new)


@SQLITE_ONLY
@pytest.mark.parametrize("octets", [1, 16, 32, 128], ids=lambda n: f"ok/nonce-{n}")
def test_a_nonce_of_1_to_128_octets_is_echoed(ctx: Context, octets: int) -> None:
    nonce = os.urandom(octets)
    response = ask(ctx, request_der(enrol(ctx, f"spiffe://{TD}/web").cert,
                                    active_issuer(ctx).certificate, nonce=nonce))  # fmt: skip
    assert response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce


@SQLITE_ONLY
@pytest.mark.parametrize("octets", [0, 129, 200, 4000], ids=lambda n: f"fail/nonce-{n}")
def test_a_nonce_of_0_or_over_128_octets_is_malformed(ctx: Context, octets: int) -> None:
    """RFC 9654 §2.1 (obsoleting RFC 8954): a responder rejects a nonce of 0 octets or of
    more than 128 octets with malformedRequest."""
    der = request_der(enrol(ctx, f"spiffe://{TD}/web").cert, active_issuer(ctx).certificate,
                      nonce=b"n" * octets)  # fmt: skip
    assert ask(ctx, der).response_status is Outcome.MALFORMED_REQUEST


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("serial", "status"),
    [(0, Status.UNKNOWN), (2**159, Status.UNKNOWN), (2**160, Status.UNKNOWN), (-5, None)],
    ids=["unknown/zero", "unknown/20-octets", "unknown/21-octets", "malformed/negative"],
)
def test_serials_trellis_never_issues(
    ctx: Context, clock: FixedClock, serial: int, status: ocsp.OCSPCertStatus | None
) -> None:
    """RFC 5280 §4.1.2.2: serials are positive, at most 20 octets. Any other names no
    certificate of ours: ``unknown``. A negative one cannot be echoed in a response's CertID
    (cryptography refuses to encode it), so it is ``malformedRequest``."""
    issuer = active_issuer(ctx).certificate
    cert = enrol(ctx, f"spiffe://{TD}/web").cert
    if status is not None:
        der = request_for_serial(cert, issuer, serial, hashes.SHA1())
        assert_single(ask(ctx, der), request=der, status=status, now=clock.now())
        return
    five = request_for_serial(cert, issuer, 5, hashes.SHA1())
    assert five.count(b"\x02\x01\x05") == 1
    der = five.replace(b"\x02\x01\x05", b"\x02\x01" + serial.to_bytes(1, "big", signed=True))
    assert ocsp.load_der_ocsp_request(der).serial_number == serial
    assert ask(ctx, der).response_status is Outcome.MALFORMED_REQUEST
