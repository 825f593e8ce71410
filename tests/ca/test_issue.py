"""Tests for ``ca.issue`` through the real pipeline: entry → join token → grant → ``issue_svid``,
and renewal (``ca.renewal.make_proof`` → ``ca.grants.renewal_grant`` → ``issue_svid``).

Every refusal is checked twice: the right ``ca.errors`` class, and nothing written (no new
``certificate`` or ``renewal_nonce`` row, the join token's uses unchanged).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from ca import csr as csr_module
from ca.authority import AuthorityParams, active_issuer, init_authority
from ca.certs import CertStatus, get_certificate, revoke_certificate
from ca.clock import FixedClock
from ca.config import Context
from ca.durations import Ttl
from ca.entries import Entry, delete_entry
from ca.errors import (
    AuthenticationFailed,
    InternalError,
    InvalidCsr,
    InvalidSpiffeId,
    PermissionDenied,
    PolicyViolation,
    TrellisError,
    Unavailable,
)
from ca.grants import admin_grant, join_grant, renewal_grant
from ca.identity import SpiffeId, TrustDomain
from ca.issue import Grant, IssuedSvid, issue_for_key, issue_svid, mint_svid
from ca.keys import KeyType, PrivateKey
from ca.profiles import BACKDATE
from ca.renewal import AUDIENCE, CLOCK_SKEW, PROOF_TYPE, make_proof
from ca.revocation import RevocationReason
from ca.serial import Serial
from ca.tokens import create_admin_token, revoke_token
from tests.ca.svidkit import (
    SQLITE_ONLY,
    SUBJECT_KEY_TYPES,
    Workload,
    add_entry,
    count_rows,
    csr_sha256,
    enrol,
    join_secret,
    make_csr,
    new_key,
    tamper_signature,
    uses_remaining,
)
from tests.certassert import assert_is_svid_leaf

WEB = "spiffe://example.org/web"
DNS = ("web.example.org", "web.internal")
KEY_IDS = [k.value for k in SUBJECT_KEY_TYPES]


def test_issue_svid(ctx: Context, clock: FixedClock) -> None:
    """The whole happy path, on both stores, with a CSR that repeats the identity."""
    now = clock.now()
    entry = add_entry(ctx, WEB, dns_names=DNS)
    token_id, secret = join_secret(ctx, entry)
    key = new_key(KeyType.EC_P256)
    csr = make_csr(key, uris=[WEB], dns_names=["web.example.org"])

    svid = issue_svid(ctx, join_grant(ctx, secret), csr)

    issuer = active_issuer(ctx)
    cert = svid.certificate
    assert_is_svid_leaf(cert, spiffe_id=WEB, issuer=issuer.certificate, dns_names=DNS)
    assert cert.public_key() == key.public_key()
    assert cert.subject == x509.Name([])
    # Exact window: backdated for skew, entry TTL (the authority's 1h SVID TTL) forward.
    assert cert.not_valid_before_utc == now - BACKDATE
    assert cert.not_valid_after_utc == now + dt.timedelta(hours=1)
    assert svid.chain_pem == issuer.chain_pem
    assert svid.bundle_pem == issuer.bundle_pem

    info = get_certificate(ctx, Serial(cert.serial_number))
    der = cert.public_bytes(serialization.Encoding.DER)
    assert info.fingerprint_sha256 == hashlib.sha256(der).hexdigest()
    assert info.certificate_pem == svid.certificate_pem.decode()
    assert str(info.spiffe_id) == WEB
    assert info.status is CertStatus.ACTIVE
    assert info.profile == "x509-svid"
    assert (info.not_before, info.not_after) == (
        cert.not_valid_before_utc,
        cert.not_valid_after_utc,
    )
    assert info.requested_by == f"join-token:{token_id}"
    assert count_rows(ctx, "certificate") == 1
    assert uses_remaining(ctx, token_id) == 0


@SQLITE_ONLY
@pytest.mark.parametrize("key_type", SUBJECT_KEY_TYPES, ids=KEY_IDS)
def test_issue_for_every_subject_key_type(
    ctx: Context, clock: FixedClock, key_type: KeyType
) -> None:
    workload = enrol(ctx, WEB, key_type, dns_names=DNS)
    issuer = active_issuer(ctx)
    assert_is_svid_leaf(workload.cert, spiffe_id=WEB, issuer=issuer.certificate, dns_names=DNS)
    assert KeyType.of(workload.cert.public_key()) is key_type
    assert workload.cert.not_valid_before_utc == clock.now() - BACKDATE
    assert workload.cert.not_valid_after_utc == clock.now() + dt.timedelta(hours=1)


@SQLITE_ONLY
@pytest.mark.parametrize("subject", SUBJECT_KEY_TYPES, ids=[f"subject-{k}" for k in KEY_IDS])
@pytest.mark.parametrize("issuer_key", SUBJECT_KEY_TYPES, ids=[f"issuer-{k}" for k in KEY_IDS])
def test_issue_for_every_issuer_and_subject_key_type(
    bare_ctx: Context, issuer_key: KeyType, subject: KeyType
) -> None:
    params = AuthorityParams(TrustDomain("example.org"), key_type=issuer_key)
    issuer = init_authority(bare_ctx, params)
    workload = enrol(bare_ctx, WEB, subject)
    assert_is_svid_leaf(workload.cert, spiffe_id=WEB, issuer=issuer.certificate)
    expected = issuer_key.signature_hash()
    got = workload.cert.signature_hash_algorithm
    assert (None if got is None else got.name) == (None if expected is None else expected.name)


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("ttl", "lifetime"),
    [
        pytest.param(None, dt.timedelta(minutes=20), id="ok/entry-default"),
        pytest.param(Ttl(60), dt.timedelta(seconds=60), id="ok/requested-shorter"),
        pytest.param(Ttl(7200), dt.timedelta(hours=2), id="ok/requested-equals-max"),
    ],
)
def test_validity_window_is_exact(
    ctx: Context, clock: FixedClock, ttl: Ttl | None, lifetime: dt.timedelta
) -> None:
    entry = add_entry(ctx, WEB, ttl=Ttl(1200), max_ttl=Ttl(7200))
    _, secret = join_secret(ctx, entry)
    clock.advance(dt.timedelta(minutes=7))  # later than the CA's notBefore: no clamping
    now = clock.now()
    svid = issue_svid(ctx, join_grant(ctx, secret), make_csr(new_key(KeyType.EC_P256)), ttl)
    assert svid.certificate.not_valid_before_utc == now - BACKDATE
    assert svid.certificate.not_valid_after_utc == now + lifetime
    assert svid.expires_at == now + lifetime


@SQLITE_ONLY
@pytest.mark.parametrize(
    "spiffe_id",
    [
        pytest.param("spiffe://example.org/trellis/server", id="fail/serving-identity"),
        pytest.param("spiffe://example.org/trellis", id="fail/reserved-root"),
        pytest.param("spiffe://example.org/trellis/agent", id="fail/reserved-subpath"),
    ],
)
def test_admin_mint_refuses_trellis_reserved_ids(ctx: Context, spiffe_id: str) -> None:
    """docs/differences.md: ``/trellis/...`` is Trellis's own (its serving certificate is
    serverAuth + clientAuth): a minted SVID for it would impersonate the server."""
    with pytest.raises(PolicyViolation, match="reserved for Trellis"):
        admin_grant(ctx, SpiffeId.parse(spiffe_id), "cli:mint")
    assert count_rows(ctx, "certificate") == 0


@SQLITE_ONLY
def test_lifetime_is_capped_at_the_issuer_expiry(
    ctx: Context, clock: FixedClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Issued, shorter, and logged, as SPIRE does (docs/differences.md)."""
    issuer = active_issuer(ctx).certificate
    entry = add_entry(ctx, WEB)
    clock.current = issuer.not_valid_after_utc - dt.timedelta(minutes=10)
    _, secret = join_secret(ctx, entry)  # created now, so the token itself is live
    with caplog.at_level("WARNING", logger="trellis.issue"):
        svid = issue_svid(ctx, join_grant(ctx, secret), make_csr(new_key(KeyType.EC_P256)))
    assert svid.certificate.not_valid_after_utc == issuer.not_valid_after_utc
    (warning,) = [r for r in caplog.records if r.name == "trellis.issue"]
    assert (
        WEB in warning.getMessage() and "cut to the issuing CA's notAfter" in warning.getMessage()
    )
    assert svid.certificate.not_valid_before_utc == clock.now() - BACKDATE
    assert_is_svid_leaf(svid.certificate, spiffe_id=WEB, issuer=issuer)


@SQLITE_ONLY
@pytest.mark.parametrize(
    "after_expiry",
    [dt.timedelta(0), dt.timedelta(seconds=1)],
    ids=["fail/at-ca-expiry", "fail/after-ca-expiry"],
)
def test_no_issuance_once_the_issuer_expired(
    ctx: Context, clock: FixedClock, after_expiry: dt.timedelta
) -> None:
    issuer = active_issuer(ctx).certificate
    entry = add_entry(ctx, WEB)
    clock.current = issuer.not_valid_after_utc + after_expiry
    token_id, secret = join_secret(ctx, entry)
    with pytest.raises(Unavailable, match="expires"):
        issue_svid(ctx, join_grant(ctx, secret), make_csr(new_key(KeyType.EC_P256)))
    assert count_rows(ctx, "certificate") == 0
    assert uses_remaining(ctx, token_id) == 1


NO_USAGE = dict.fromkeys(
    (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "encipher_only",
        "decipher_only",
    ),
    False,
)
CA_WISHES: dict[str, list[tuple[x509.ExtensionType, bool]]] = {
    "basic-constraints-ca": [(x509.BasicConstraints(ca=True, path_length=None), True)],
    "key-cert-sign": [(x509.KeyUsage(key_cert_sign=True, crl_sign=True, **NO_USAGE), True)],
    "everything": [
        (x509.BasicConstraints(ca=True, path_length=5), True),
        (x509.KeyUsage(key_cert_sign=True, crl_sign=True, **NO_USAGE), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), False),
        (x509.NameConstraints([x509.DNSName("x.test")], None), True),
    ],
}


@SQLITE_ONLY
@pytest.mark.parametrize("wish", CA_WISHES, ids=[f"ignored/{k}" for k in CA_WISHES])
def test_csr_extensions_are_ignored(ctx: Context, wish: str) -> None:
    entry = add_entry(ctx, WEB)
    _, secret = join_secret(ctx, entry)
    csr = make_csr(
        new_key(KeyType.EC_P256),
        uris=[WEB],
        extensions=CA_WISHES[wish],
        subject=x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Evil CA")]),
    )
    cert = issue_svid(ctx, join_grant(ctx, secret), csr).certificate
    assert_is_svid_leaf(cert, spiffe_id=WEB, issuer=active_issuer(ctx).certificate)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.subject == x509.Name([]), "the CSR subject is not copied"


# --- refusals ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    ctx: Context
    clock: FixedClock
    entry: Entry
    token_id: str
    secret: str
    key: PrivateKey


Present = Callable[[Setup], str]  # returns the bearer secret to present
MakeCsr = Callable[[Setup], bytes]


def _fresh(s: Setup) -> str:
    return s.secret


def _spent(s: Setup) -> str:
    issue_svid(s.ctx, join_grant(s.ctx, s.secret), make_csr(s.key))
    return s.secret


def _expired(s: Setup) -> str:
    s.clock.advance(dt.timedelta(hours=1))  # the default join-token TTL, to the second
    return s.secret


def _admin(s: Setup) -> str:
    return create_admin_token(s.ctx, "ops")[1]


def _revoked(s: Setup) -> str:
    revoke_token(s.ctx, s.token_id)
    return s.secret


def _unknown(s: Setup) -> str:
    return "trellis-join-" + secrets.token_urlsafe(32)


def _plain(s: Setup) -> bytes:
    return make_csr(s.key)


def _with(**kwargs: object) -> MakeCsr:
    return lambda s: make_csr(s.key, **kwargs)  # type: ignore[arg-type]


def _rsa_1024(s: Setup) -> bytes:
    return make_csr(rsa.generate_private_key(public_exponent=65537, key_size=1024), uris=[WEB])


def _p521(s: Setup) -> bytes:
    return make_csr(ec.generate_private_key(ec.SECP521R1()), uris=[WEB])


def _tampered(key_type: KeyType) -> MakeCsr:
    return lambda s: tamper_signature(make_csr(new_key(key_type), uris=[WEB]))


PEM_GARBAGE = (
    b"-----BEGIN CERTIFICATE REQUEST-----\nbm90IGEgY3Ny\n-----END CERTIFICATE REQUEST-----\n"
)

Refusal = tuple[str, Present, MakeCsr, Ttl | None, type[TrellisError], str]

# What the request asks for: refused before any row is read for update. (id, present, csr,
# ttl, expected error, what its detail says)
REQUEST_REFUSALS: list[Refusal] = [
    ("fail/csr/not-pem", _fresh, lambda s: b"hello", None, InvalidCsr, "not a valid PEM"),
    ("fail/csr/malformed-pem", _fresh, lambda s: PEM_GARBAGE, None, InvalidCsr, "not a valid"),
    (
        "fail/csr/certificate-not-csr",
        _fresh,
        lambda s: active_issuer(s.ctx).chain_pem,
        None,
        InvalidCsr,
        "not a valid",
    ),
    (
        "fail/csr/tampered-signature/ec-p256",
        _fresh,
        _tampered(KeyType.EC_P256),
        None,
        InvalidCsr,
        "signature",
    ),
    (
        "fail/csr/tampered-signature/rsa-2048",
        _fresh,
        _tampered(KeyType.RSA_2048),
        None,
        InvalidCsr,
        "signature",
    ),
    (
        "fail/csr/tampered-signature/ed25519",
        _fresh,
        _tampered(KeyType.ED25519),
        None,
        InvalidCsr,
        "signature",
    ),
    ("fail/csr/rsa-1024", _fresh, _rsa_1024, None, InvalidCsr, "too small"),
    ("fail/csr/ec-p521", _fresh, _p521, None, InvalidCsr, "secp521r1"),
    (
        "fail/san/other-spiffe-id",
        _fresh,
        _with(uris=["spiffe://example.org/db"]),
        None,
        PolicyViolation,
        "credential is for",
    ),
    (
        "fail/san/foreign-trust-domain",
        _fresh,
        _with(uris=["spiffe://evil.test/web"]),
        None,
        PolicyViolation,
        "credential is for",
    ),
    (
        "fail/san/two-uris",
        _fresh,
        _with(uris=[WEB, "spiffe://example.org/db"]),
        None,
        PolicyViolation,
        "exactly one URI",
    ),
    (
        "fail/san/same-uri-twice",
        _fresh,
        _with(uris=[WEB, WEB]),
        None,
        PolicyViolation,
        "exactly one URI",
    ),
    (
        "fail/san/not-a-spiffe-id",
        _fresh,
        _with(uris=["https://example.org/web"]),
        None,
        InvalidSpiffeId,
        "scheme",
    ),
    (
        "fail/san/trust-domain-id",
        _fresh,
        _with(uris=["spiffe://example.org"]),
        None,
        PolicyViolation,
        "credential is for",
    ),
    (
        "fail/san/dns-not-in-entry",
        _fresh,
        _with(uris=[WEB], dns_names=["db.example.org"]),
        None,
        PolicyViolation,
        "db.example.org",
    ),
    (
        "fail/san/invalid-dns",
        _fresh,
        _with(dns_names=["-bad-.example.org"]),
        None,
        PolicyViolation,
        "invalid DNS name",
    ),
    (
        "fail/san/ip-address-as-dns",
        _fresh,
        _with(dns_names=["10.0.0.1"]),
        None,
        PolicyViolation,
        "not a host name",
    ),
]

# Who is asking: decided by token rows and the issuing transaction, so run on both stores.
CREDENTIAL_REFUSALS: list[Refusal] = [
    ("fail/ttl/above-max", _fresh, _plain, Ttl(7201), PolicyViolation, "exceeds the maximum"),
    ("fail/token/reused", _spent, _plain, None, AuthenticationFailed, "already been used"),
    ("fail/token/expired", _expired, _plain, None, AuthenticationFailed, "expired"),
    ("fail/token/revoked", _revoked, _plain, None, AuthenticationFailed, "invalid bearer"),
    ("fail/token/unknown", _unknown, _plain, None, AuthenticationFailed, "invalid bearer"),
    ("fail/token/admin-token", _admin, _plain, None, PermissionDenied, "join token"),
]


def check_refusal(
    ctx: Context,
    clock: FixedClock,
    present: Present,
    csr: MakeCsr,
    ttl: Ttl | None,
    error: type[TrellisError],
    reason: str,
) -> None:
    entry = add_entry(ctx, WEB, dns_names=DNS, max_ttl=Ttl(7200))
    token_id, secret = join_secret(ctx, entry)
    setup = Setup(ctx, clock, entry, token_id, secret, new_key(KeyType.EC_P256))
    presented = present(setup)
    request = csr(setup)
    certificates, uses = count_rows(ctx, "certificate"), uses_remaining(ctx, token_id)

    with pytest.raises(error, match=reason) as caught:
        issue_svid(ctx, join_grant(ctx, presented), request, ttl)

    assert type(caught.value) is error, f"{type(caught.value).__name__} is too specific"
    assert count_rows(ctx, "certificate") == certificates
    assert uses_remaining(ctx, token_id) == uses


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("present", "csr", "ttl", "error", "reason"),
    [pytest.param(*case[1:], id=case[0]) for case in REQUEST_REFUSALS],
)
def test_bad_requests_write_nothing(
    ctx: Context,
    clock: FixedClock,
    present: Present,
    csr: MakeCsr,
    ttl: Ttl | None,
    error: type[TrellisError],
    reason: str,
) -> None:
    check_refusal(ctx, clock, present, csr, ttl, error, reason)


@pytest.mark.parametrize(
    ("present", "csr", "ttl", "error", "reason"),
    [pytest.param(*case[1:], id=case[0]) for case in CREDENTIAL_REFUSALS],
)
def test_bad_credentials_write_nothing(
    ctx: Context,
    clock: FixedClock,
    present: Present,
    csr: MakeCsr,
    ttl: Ttl | None,
    error: type[TrellisError],
    reason: str,
) -> None:
    check_refusal(ctx, clock, present, csr, ttl, error, reason)


@SQLITE_ONLY
def test_join_token_is_live_until_its_last_second(ctx: Context, clock: FixedClock) -> None:
    entry = add_entry(ctx, WEB)
    token_id, secret = join_secret(ctx, entry)
    clock.advance(dt.timedelta(minutes=59, seconds=59))
    issue_svid(ctx, join_grant(ctx, secret), make_csr(new_key(KeyType.EC_P256)))
    assert uses_remaining(ctx, token_id) == 0


def test_token_spent_between_grant_and_issue_is_refused(ctx: Context) -> None:
    """The token is re-checked atomically while persisting, not only when the grant is made."""
    entry = add_entry(ctx, WEB)
    token_id, secret = join_secret(ctx, entry)
    first, second = join_grant(ctx, secret), join_grant(ctx, secret)  # both see a live token
    issue_svid(ctx, first, make_csr(new_key(KeyType.EC_P256)))
    with pytest.raises(AuthenticationFailed, match="already been used"):
        issue_svid(ctx, second, make_csr(new_key(KeyType.EC_P256)))
    assert count_rows(ctx, "certificate") == 1
    assert uses_remaining(ctx, token_id) == 0


def test_concurrent_redemptions_of_a_single_use_token(ctx: Context) -> None:
    """Four workers race one single-use token: exactly one SVID, three refusals."""
    entry = add_entry(ctx, WEB)
    token_id, secret = join_secret(ctx, entry)
    grants = [join_grant(ctx, secret) for _ in range(4)]
    csrs = [make_csr(new_key(KeyType.EC_P256)) for _ in grants]
    barrier = threading.Barrier(len(grants), timeout=10)
    outcomes: list[object] = []

    def redeem(grant: Grant, csr: bytes) -> None:
        barrier.wait()
        try:
            outcomes.append(issue_svid(ctx, grant, csr))
        except TrellisError as exc:
            outcomes.append(exc)

    threads = [
        threading.Thread(target=redeem, args=pair) for pair in zip(grants, csrs, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert not any(thread.is_alive() for thread in threads)
    assert sorted(type(o).__name__ for o in outcomes) == [
        "AuthenticationFailed",
        "AuthenticationFailed",
        "AuthenticationFailed",
        "IssuedSvid",
    ]
    assert count_rows(ctx, "certificate") == 1
    assert uses_remaining(ctx, token_id) == 0


@SQLITE_ONLY
def test_multi_use_join_token_counts_down(ctx: Context) -> None:
    entry = add_entry(ctx, WEB)
    token_id, secret = join_secret(ctx, entry, uses=2)
    for left in (1, 0):
        issue_svid(ctx, join_grant(ctx, secret), make_csr(new_key(KeyType.EC_P256)))
        assert uses_remaining(ctx, token_id) == left
    with pytest.raises(AuthenticationFailed):
        join_grant(ctx, secret)
    assert count_rows(ctx, "certificate") == 2


@SQLITE_ONLY
def test_rsa_key_of_an_unlisted_size_is_refused_but_the_profile_takes_it(ctx: Context) -> None:
    """An RSA size that is no KeyType (2304 bits) is refused in a CSR: the SVID could not be
    renewed, as renewal makes a fresh key of the SVID's KeyType. The leaf profile still takes
    any RSA key (regression: it used to look the key up in KeyType and raise a bare
    ValueError)."""
    entry = add_entry(ctx, WEB)
    token_id, secret = join_secret(ctx, entry)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2304)
    with pytest.raises(InvalidCsr, match=r"2304 bits is not accepted.*2048, 3072 or 4096"):
        issue_svid(ctx, join_grant(ctx, secret), make_csr(key, uris=[WEB]))
    assert count_rows(ctx, "certificate") == 0
    assert uses_remaining(ctx, token_id) == 1
    svid = issue_for_key(ctx, join_grant(ctx, secret), key.public_key())
    # assert_is_svid_leaf also demands keyEncipherment, as for every RSA subject key.
    assert_is_svid_leaf(svid.certificate, spiffe_id=WEB, issuer=active_issuer(ctx).certificate)
    assert svid.certificate.public_key() == key.public_key()


@SQLITE_ONLY
@pytest.mark.parametrize(
    "behind",
    [dt.timedelta(seconds=1), dt.timedelta(hours=2)],
    ids=["fail/clock-1s-behind-ca", "fail/clock-2h-behind-ca"],
)
def test_clock_before_the_issuer_validity_is_refused_cleanly(
    ctx: Context, clock: FixedClock, behind: dt.timedelta
) -> None:
    """Regression: with the clock stepped back past the CA's notBefore, validity_window used to
    produce notAfter < notBefore and cryptography's builder raised a bare ValueError."""
    issuer = active_issuer(ctx).certificate
    entry = add_entry(ctx, WEB)
    clock.current = issuer.not_valid_before_utc - behind
    token_id, secret = join_secret(ctx, entry)
    with pytest.raises(Unavailable, match="not valid yet"):
        issue_svid(ctx, join_grant(ctx, secret), make_csr(new_key(KeyType.EC_P256)))
    assert count_rows(ctx, "certificate") == 0
    assert uses_remaining(ctx, token_id) == 1


# --- renewal -------------------------------------------------------------------------------


def renew(ctx: Context, old: Workload, key: PrivateKey | None = None) -> x509.Certificate:
    """Renew ``old`` into a fresh key, the way the agent does."""
    new = key or new_key(KeyType.EC_P256)
    csr = make_csr(new, uris=[str(old.entry.spiffe_id)])
    proof = make_proof(old.cert, old.key, csr_sha256(csr), ctx.clock.now())
    return issue_svid(ctx, renewal_grant(ctx, proof, csr), csr).certificate


def test_renewal(ctx: Context, clock: FixedClock) -> None:
    old = enrol(ctx, WEB, dns_names=DNS)
    new_key_ = new_key(KeyType.EC_P256)
    cert = renew(ctx, old, new_key_)

    assert_is_svid_leaf(cert, spiffe_id=WEB, issuer=active_issuer(ctx).certificate, dns_names=DNS)
    assert cert.serial_number != old.cert.serial_number
    assert cert.public_key() == new_key_.public_key()
    assert cert.not_valid_after_utc == clock.now() + dt.timedelta(hours=1)
    info = get_certificate(ctx, Serial(cert.serial_number))
    assert info.requested_by == f"renewal:{old.cert.serial_number:x}"
    assert str(info.spiffe_id) == WEB
    assert count_rows(ctx, "certificate") == 2
    assert count_rows(ctx, "renewal_nonce") == 1
    # Renewing does not revoke the old SVID: it simply expires.
    assert get_certificate(ctx, Serial(old.cert.serial_number)).status is CertStatus.ACTIVE


@SQLITE_ONLY
def test_a_renewal_loads_and_checks_its_csr_once(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proof is bound to the CSR, so authenticating decodes it (for its hash) and, once the
    proof verified, checks it; issuing the same bytes takes that parse (its load and signature
    check are ~100 µs) instead of making it again. Other bytes than the proof was checked
    against are refused unparsed: even a CSR for the same identity, which the proof does not
    name, would have been issued."""
    old = enrol(ctx, WEB)
    loads: list[bytes] = []
    checks: list[bytes] = []
    load, check = csr_module._decoded, csr_module._verified

    def counted_load(pem: bytes) -> Any:
        loads.append(pem)
        return load(pem)

    def counted_check(csr: x509.CertificateSigningRequest) -> Any:
        checks.append(csr.public_bytes(serialization.Encoding.PEM))
        return check(csr)

    monkeypatch.setattr(csr_module, "_decoded", counted_load)
    monkeypatch.setattr(csr_module, "_verified", counted_check)
    cert = renew(ctx, old)
    assert (len(loads), len(checks)) == (1, 1)
    assert_is_svid_leaf(cert, spiffe_id=WEB, issuer=active_issuer(ctx).certificate)

    csr = make_csr(new_key(KeyType.EC_P256), uris=[WEB])
    grant = renewal_grant(ctx, make_proof(old.cert, old.key, csr_sha256(csr), ctx.clock.now()), csr)
    seen = len(loads), len(checks)
    for other in (
        make_csr(new_key(KeyType.EC_P256), uris=["spiffe://example.org/other"]),
        make_csr(new_key(KeyType.EC_P256), uris=[WEB]),
    ):
        with pytest.raises(InternalError, match="only for the CSR its proof was checked"):
            issue_svid(ctx, grant, other)
    assert (len(loads), len(checks)) == seen


@SQLITE_ONLY
@pytest.mark.parametrize("key_type", SUBJECT_KEY_TYPES, ids=KEY_IDS)
def test_renewal_proof_for_every_key_type(ctx: Context, key_type: KeyType) -> None:
    old = enrol(ctx, WEB, key_type)
    cert = renew(ctx, old, new_key(key_type))
    assert_is_svid_leaf(cert, spiffe_id=WEB, issuer=active_issuer(ctx).certificate)


@SQLITE_ONLY
def test_renewed_svid_can_be_renewed_again(ctx: Context) -> None:
    old = enrol(ctx, WEB)
    key = new_key(KeyType.EC_P256)
    second = Workload(old.entry, key, IssuedSvid(renew(ctx, old, key), old.svid.issuer))
    third = renew(ctx, second)
    assert_is_svid_leaf(third, spiffe_id=WEB, issuer=active_issuer(ctx).certificate)
    assert count_rows(ctx, "certificate") == 3


@dataclass(frozen=True)
class RenewalAttempt:
    proof: str
    csr: bytes


def _replayed(ctx: Context, old: Workload) -> RenewalAttempt:
    csr = make_csr(new_key(KeyType.EC_P256))
    proof = make_proof(old.cert, old.key, csr_sha256(csr), ctx.clock.now())
    issue_svid(ctx, renewal_grant(ctx, proof, csr), csr)
    return RenewalAttempt(proof, csr)


def _other_csr(ctx: Context, old: Workload) -> RenewalAttempt:
    signed_for = make_csr(new_key(KeyType.EC_P256))
    proof = make_proof(old.cert, old.key, csr_sha256(signed_for), ctx.clock.now())
    return RenewalAttempt(proof, make_csr(new_key(KeyType.EC_P256)))


def _signed_by(key_type: KeyType) -> Callable[[Context, Workload], RenewalAttempt]:
    def attempt(ctx: Context, old: Workload) -> RenewalAttempt:
        csr = make_csr(new_key(KeyType.EC_P256))
        proof = make_proof(old.cert, new_key(key_type), csr_sha256(csr), ctx.clock.now())
        return RenewalAttempt(proof, csr)

    return attempt


def _valid(ctx: Context, old: Workload) -> RenewalAttempt:
    csr = make_csr(new_key(KeyType.EC_P256))
    return RenewalAttempt(make_proof(old.cert, old.key, csr_sha256(csr), ctx.clock.now()), csr)


def _then(
    before: Callable[[Context, Workload], None],
) -> Callable[[Context, Workload], RenewalAttempt]:
    def attempt(ctx: Context, old: Workload) -> RenewalAttempt:
        before(ctx, old)
        return _valid(ctx, old)

    return attempt


def _revoke(ctx: Context, old: Workload) -> None:
    revoke_certificate(ctx, Serial(old.cert.serial_number), RevocationReason.KEY_COMPROMISE, "t")


def _expired_svid(ctx: Context, old: Workload) -> RenewalAttempt:
    """The SVID's last second has passed; the proof itself is fresh (made 90 s ago, well within
    its 5 minutes)."""
    assert isinstance(ctx.clock, FixedClock)
    ctx.clock.current = old.cert.not_valid_after_utc
    csr = make_csr(new_key(KeyType.EC_P256))
    made = ctx.clock.now() - dt.timedelta(seconds=90)
    return RenewalAttempt(make_proof(old.cert, old.key, csr_sha256(csr), made), csr)


def _not_a_jwt(ctx: Context, old: Workload) -> RenewalAttempt:
    return RenewalAttempt("not.a.jwt", _valid(ctx, old).csr)


def _delete_entry(ctx: Context, old: Workload) -> None:
    delete_entry(ctx, old.entry.id)


def _minted(ctx: Context, old: Workload) -> RenewalAttempt:
    """An SVID from ``trellis svid mint``: it never had an entry, so none was deleted."""
    key = new_key(KeyType.EC_P256)
    minted = mint_svid(ctx, admin_grant(ctx, SpiffeId.parse(WEB), "cli:mint"), key)
    csr = make_csr(new_key(KeyType.EC_P256))
    return RenewalAttempt(
        make_proof(minted.certificate, key, csr_sha256(csr), ctx.clock.now()), csr
    )


def _forged_serial(ctx: Context, old: Workload) -> RenewalAttempt:
    forged = old.svid.issuer.certificate  # a real certificate, but not an SVID in the store
    csr = make_csr(new_key(KeyType.EC_P256))
    return RenewalAttempt(make_proof(forged, old.key, csr_sha256(csr), ctx.clock.now()), csr)


def _stale_proof(ctx: Context, old: Workload) -> RenewalAttempt:
    attempt = _valid(ctx, old)
    assert isinstance(ctx.clock, FixedClock)
    ctx.clock.advance(dt.timedelta(minutes=5))  # MAX_PROOF_LIFETIME, to the second
    return attempt


def _crafted(
    headers: dict[str, object] | None = None, **claims: object
) -> Callable[[Context, Workload], RenewalAttempt]:
    """A proof signed with the SVID's own key, with claims or a header ``make_proof`` would not
    write (a hand-made client's mistakes, or an attacker holding a stolen key's proof format)."""

    def attempt(ctx: Context, old: Workload) -> RenewalAttempt:
        csr = make_csr(new_key(KeyType.EC_P256))
        now = int(ctx.clock.now().timestamp())
        body: dict[str, object] = {
            "aud": AUDIENCE,
            "sub": format(old.cert.serial_number, "x"),
            "iat": now,
            "exp": now + 60,
            "jti": secrets.token_urlsafe(24),
            "csr": base64.urlsafe_b64encode(csr_sha256(csr)).rstrip(b"=").decode(),
            **claims,
        }
        header = {"typ": PROOF_TYPE} if headers is None else headers
        return RenewalAttempt(jwt.encode(body, old.key, algorithm="ES256", headers=header), csr)

    return attempt


Attempt = Callable[[Context, Workload], RenewalAttempt]


def _sub_spelt(spell: Callable[[int], str]) -> Attempt:
    """A proof whose ``sub`` names the SVID's serial in a spelling ``Serial.parse`` reads but
    docs/api.md does not allow (it was accepted)."""
    return lambda ctx, old: _crafted(sub=spell(old.cert.serial_number))(ctx, old)


def _lasting(seconds: int) -> Attempt:
    """A fresh proof, made now, whose exp is ``seconds`` after its iat."""

    def attempt(ctx: Context, old: Workload) -> RenewalAttempt:
        now = int(ctx.clock.now().timestamp())
        return _crafted(iat=now, exp=now + seconds)(ctx, old)

    return attempt


RenewalRefusal = tuple[str, Attempt, type[TrellisError], str]

# The proof itself does not verify: pure cryptography, checked on SQLite.
# (id, attempt, expected error, what its detail says)
BAD_PROOFS: list[RenewalRefusal] = [
    ("fail/proof-for-another-csr", _other_csr, AuthenticationFailed, "different CSR"),
    (
        "fail/proof-signed-by-another-key",
        _signed_by(KeyType.EC_P256),
        AuthenticationFailed,
        "does not verify",
    ),
    (
        "fail/proof-signed-by-another-key-type",
        _signed_by(KeyType.ED25519),
        AuthenticationFailed,
        "does not verify",
    ),
    (
        "fail/proof-names-unknown-certificate",
        _forged_serial,
        AuthenticationFailed,
        "unknown certificate",
    ),
    ("fail/proof-not-a-jwt", _not_a_jwt, AuthenticationFailed, "malformed"),
    ("fail/proof-expired", _stale_proof, AuthenticationFailed, "expired or not yet valid"),
    *[
        (f"fail/proof-{name}", _crafted(**claims), AuthenticationFailed, "expired or not yet")
        for name, claims in [
            ("iat-a-string", {"iat": "abc"}),
            ("iat-a-list", {"iat": [1]}),
            ("iat-before-1970", {"iat": -(10**12)}),
            ("iat-a-bool", {"iat": True}),
            ("exp-a-string", {"exp": "1e999"}),
            ("exp-past-9999", {"exp": 10**20}),
            ("exp-a-float-overflow", {"exp": 1e300}),
            # RFC 7519 §4.1.5: not accepted before its nbf (it was ignored).
            ("nbf-in-2286", {"nbf": 10**10}),
            ("nbf-a-string", {"nbf": "abc"}),
        ]
    ],
    # Named, not "does not verify": the signature does (a hand-made client's mistake).
    *[
        (f"fail/proof-jti-{name}", _crafted(jti=jti), AuthenticationFailed, "invalid jti")
        for name, jti in [
            ("a-list", ["x" * 20]),
            ("an-integer", 12345678901234567890),
            ("short", "x"),
        ]
    ],
    ("fail/proof-no-csr-claim", _crafted(csr=None), AuthenticationFailed, "no 'csr' claim"),
    ("fail/proof-sub-a-number", _crafted(sub=12345), AuthenticationFailed, "unknown certificate"),
    *[
        (f"fail/proof-sub-{name}", _sub_spelt(spell), AuthenticationFailed, "lower-case hex")
        for name, spell in [
            ("upper-case", lambda n: format(n, "X")),
            ("leading-zero", lambda n: "0" + format(n, "x")),
            ("0x", lambda n: "0x" + format(n, "x")),
            ("colons", lambda n: ":".join(format(n, "x")[i : i + 2] for i in range(0, 38, 2))),
        ]
    ],
    # Named apart from "expired or not yet valid": the proof is fresh, only too long-lived.
    ("fail/proof-lives-an-hour", _lasting(3600), AuthenticationFailed, "lives longer than 300 s"),
    ("fail/proof-lives-301-s", _lasting(301), AuthenticationFailed, "lives longer than 300 s"),
    ("fail/proof-typ-jwt", _crafted(headers={"typ": "JWT"}), AuthenticationFailed, "typ"),
    ("fail/proof-no-typ", _crafted(headers={}), AuthenticationFailed, "typ"),
]

# A valid proof refused because of what the store says: both stores.
REFUSED_RENEWALS: list[RenewalRefusal] = [
    ("fail/proof-replayed", _replayed, AuthenticationFailed, "already been used"),
    ("fail/svid-revoked", _then(_revoke), AuthenticationFailed, "is revoked"),
    ("fail/svid-expired", _expired_svid, AuthenticationFailed, "has expired"),
    ("fail/entry-deleted", _then(_delete_entry), PermissionDenied, "entry was deleted"),
    ("fail/svid-minted", _minted, PermissionDenied, "minted SVIDs are not renewable, mint a new"),
]


def check_renewal_refusal(
    ctx: Context, attempt: Attempt, error: type[TrellisError], reason: str
) -> None:
    # A one-minute SVID, so "expired" needs only a short clock jump (see _expired_svid).
    old = enrol(ctx, WEB, ttl=Ttl(60))
    request = attempt(ctx, old)
    certificates, nonces = count_rows(ctx, "certificate"), count_rows(ctx, "renewal_nonce")

    with pytest.raises(error, match=reason) as caught:
        issue_svid(ctx, renewal_grant(ctx, request.proof, request.csr), request.csr)

    assert type(caught.value) is error
    assert count_rows(ctx, "certificate") == certificates
    assert count_rows(ctx, "renewal_nonce") == nonces


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("attempt", "error", "reason"), [pytest.param(*case[1:], id=case[0]) for case in BAD_PROOFS]
)
def test_bad_renewal_proofs_write_nothing(
    ctx: Context, attempt: Attempt, error: type[TrellisError], reason: str
) -> None:
    check_renewal_refusal(ctx, attempt, error, reason)


@SQLITE_ONLY
@pytest.mark.parametrize(
    "attempt",
    [
        pytest.param(_lasting(300), id="ok/lives-exactly-300-s"),
        # RFC 7519 §4.1.3: aud may be an array; the proof is for Trellis if it names Trellis.
        pytest.param(_crafted(aud=["https://other.example", AUDIENCE]), id="ok/aud-a-list"),
    ],
)
def test_proofs_within_the_rules_renew(ctx: Context, attempt: Attempt) -> None:
    old = enrol(ctx, WEB)
    request = attempt(ctx, old)
    cert = issue_svid(ctx, renewal_grant(ctx, request.proof, request.csr), request.csr)
    assert_is_svid_leaf(cert.certificate, spiffe_id=WEB, issuer=active_issuer(ctx).certificate)


@pytest.mark.parametrize(
    ("attempt", "error", "reason"),
    [pytest.param(*case[1:], id=case[0]) for case in REFUSED_RENEWALS],
)
def test_refused_renewals_write_nothing(
    ctx: Context, attempt: Attempt, error: type[TrellisError], reason: str
) -> None:
    check_renewal_refusal(ctx, attempt, error, reason)


def test_revocation_after_authentication_wins(ctx: Context) -> None:
    """The grant is re-checked inside the issuing transaction (``ca.issue._persist``)."""
    old = enrol(ctx, WEB)
    request = _valid(ctx, old)
    grant = renewal_grant(ctx, request.proof, request.csr)
    _revoke(ctx, old)
    with pytest.raises(AuthenticationFailed):
        issue_svid(ctx, grant, request.csr)
    assert count_rows(ctx, "certificate") == 1
    assert count_rows(ctx, "renewal_nonce") == 0


@SQLITE_ONLY
def test_renewal_at_half_life_uses_the_injected_clock(ctx: Context, clock: FixedClock) -> None:
    """Regression: read_proof let PyJWT check 'iat' against the wall clock, so a proof made at
    the injected clock's half-life (30 min ahead of the host) was refused."""
    old = enrol(ctx, WEB)
    clock.advance(dt.timedelta(minutes=30))
    cert = renew(ctx, old)
    assert cert.not_valid_before_utc == clock.now() - BACKDATE
    assert cert.not_valid_after_utc == clock.now() + dt.timedelta(hours=1)


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("ahead", "accepted"),
    [
        pytest.param(dt.timedelta(seconds=30), True, id="ok/30s-ahead"),
        pytest.param(CLOCK_SKEW, True, id="ok/exactly-the-skew-allowance"),
        pytest.param(CLOCK_SKEW + dt.timedelta(seconds=1), False, id="fail/beyond-the-skew"),
    ],
)
def test_renewal_proof_from_a_client_clock_ahead(
    ctx: Context, clock: FixedClock, ahead: dt.timedelta, accepted: bool
) -> None:
    """Regression: PyJWT's own 'iat' check (wall clock, no leeway) used to refuse any proof made
    even 1 s in the future, voiding ca.renewal.CLOCK_SKEW."""
    old = enrol(ctx, WEB)
    csr = make_csr(new_key(KeyType.EC_P256))
    proof = make_proof(old.cert, old.key, csr_sha256(csr), clock.now() + ahead)
    if accepted:
        cert = issue_svid(ctx, renewal_grant(ctx, proof, csr), csr).certificate
        assert_is_svid_leaf(cert, spiffe_id=WEB, issuer=active_issuer(ctx).certificate)
        assert count_rows(ctx, "certificate") == 2
        return
    with pytest.raises(AuthenticationFailed, match="not yet valid"):
        issue_svid(ctx, renewal_grant(ctx, proof, csr), csr)
    assert count_rows(ctx, "certificate") == 1
    assert count_rows(ctx, "renewal_nonce") == 0


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("nbf", "accepted"),
    [
        pytest.param(dt.timedelta(0), True, id="ok/nbf-now"),
        pytest.param(-dt.timedelta(seconds=30), True, id="ok/nbf-past"),
        pytest.param(CLOCK_SKEW, True, id="ok/nbf-at-the-skew-allowance"),
        pytest.param(CLOCK_SKEW + dt.timedelta(seconds=1), False, id="fail/nbf-beyond-it"),
    ],
)
def test_a_proof_is_not_accepted_before_its_nbf(
    ctx: Context, clock: FixedClock, nbf: dt.timedelta, accepted: bool
) -> None:
    """Regression: read_proof switched PyJWT's nbf check off (times are checked against the
    injected clock) and had none of its own, so a proof valid only from the future renewed."""
    old = enrol(ctx, WEB)
    attempt = _crafted(nbf=int((clock.now() + nbf).timestamp()))(ctx, old)
    if accepted:
        issue_svid(ctx, renewal_grant(ctx, attempt.proof, attempt.csr), attempt.csr)
        assert count_rows(ctx, "certificate") == 2
        return
    with pytest.raises(AuthenticationFailed, match="not yet valid"):
        issue_svid(ctx, renewal_grant(ctx, attempt.proof, attempt.csr), attempt.csr)
    assert count_rows(ctx, "certificate") == 1
