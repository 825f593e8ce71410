"""``ca.gateway``: the authority, consumer rules, issuance from a CSR or as PKCS#12, the renewal
overlap and its race, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID
from sqlmodel import Session, select

from ca import gateway
from ca.authority import active_issuer
from ca.certs import CertStatus, get_certificate
from ca.clock import FixedClock
from ca.config import Context
from ca.crl import current_crl
from ca.durations import Ttl
from ca.errors import (
    Conflict,
    InvalidCsr,
    InvalidInput,
    NotFound,
    NotInitialised,
    PermissionDenied,
    PolicyViolation,
)
from ca.grants import admin_grant
from ca.identity import SpiffeId
from ca.issue import mint_svid
from ca.keys import KeyType
from ca.profiles import BACKDATE
from ca.revocation import RevocationReason
from ca.serial import Serial
from ca.store.models import CertificateRow
from cli.launch import Interrupted
from tests.conftest import issued_total
from tests.gateway.conftest import ACME
from tests.gateway.gwkit import assert_gateway_leaf, b64url, openssl, openssl_x5t, partner_csr

PASSWORD = b"correct horse battery"


def from_csr(
    ctx: Context, csr: bytes, consumer: gateway.ConsumerName = ACME, ttl: Ttl | None = None
) -> gateway.IssuedGatewayCertificate:
    request = gateway.CertRequest(consumer, "tests", csr_pem=csr, ttl=ttl)
    return gateway.issue_certificate(ctx, request)


def as_pkcs12(
    ctx: Context, *, legacy: bool = False, key_type: KeyType | None = None
) -> gateway.IssuedGatewayCertificate:
    request = gateway.CertRequest(
        ACME, "tests", pkcs12_password=PASSWORD, legacy_pkcs12=legacy, key_type=key_type
    )
    return gateway.issue_certificate(ctx, request)


@pytest.mark.parametrize(
    "name",
    ["acme", "a", "0day", "acme-payments.eu_1", "a" * 64],
    ids=["ok/plain", "ok/one-char", "ok/digit-first", "ok/punctuation", "ok/64-chars"],
)
def test_consumer_name_accepts(name: str) -> None:
    assert gateway.ConsumerName(name).identity == f"CN={name}"


@pytest.mark.parametrize(
    "name",
    ["", "Acme", "-acme", ".acme", "_acme", "ac me", "ac/me", "a" * 65, "acmé", "acme\n", "a;b"],
    ids=[
        "fail/empty",
        "fail/upper-case",
        "fail/leading-dash",
        "fail/leading-dot",
        "fail/leading-underscore",
        "fail/space",
        "fail/slash",
        "fail/65-chars",
        "fail/non-ascii",
        "fail/newline",
        "fail/semicolon",
    ],
)
def test_consumer_name_refuses(name: str) -> None:
    with pytest.raises(InvalidInput, match="consumer name"):
        gateway.ConsumerName(name)


def test_gateway_authority_is_its_own_hierarchy(gw: Context) -> None:
    status = gateway.gateway_status(gw)
    assert status.policy == gateway.GatewayPolicy(Ttl.parse("90d"), Ttl.parse("398d"))
    for ca_cert in (status.root, status.intermediate):
        with pytest.raises(x509.ExtensionNotFound):  # no SAN: it can never pass as SPIFFE
            ca_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert status.intermediate.not_valid_after_utc - status.intermediate.not_valid_before_utc > (
        Ttl.parse("398d").delta
    )
    mesh_roots = active_issuer(gw).roots
    assert status.root not in mesh_roots
    with pytest.raises(Conflict):
        gateway.init_gateway(gw, gateway.GatewayParams())


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"key_type": KeyType.ED25519}, "Ed25519"),
        ({"root_key_type": KeyType.ED25519}, "Ed25519"),
        ({"default_ttl": Ttl.parse("400d")}, "exceeds the max"),
        ({"max_ttl": Ttl.parse("3y")}, "shorter than the CA TTL"),
    ],
    ids=["fail/ed25519-intermediate", "fail/ed25519-root", "fail/default-over-max", "fail/max-ca"],
)
def test_gateway_params_refuse(fields: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        gateway.GatewayParams(**fields)  # type: ignore[arg-type]


def test_nothing_is_added_or_issued_before_init(lite_ctx: Context) -> None:
    """A consumer was added before init, while issuing and truststores said to run init."""
    with pytest.raises(NotInitialised, match="trellis gateway init"):
        gateway.add_consumer(lite_ctx, ACME)
    assert gateway.list_consumers(lite_ctx) == []
    _, csr = partner_csr()
    with pytest.raises(NotInitialised, match="trellis gateway init"):
        from_csr(lite_ctx, csr)


def test_consumers_are_unique_listed_and_disabled(gw: Context, clock: FixedClock) -> None:
    with pytest.raises(Conflict, match="exists already"):
        gateway.add_consumer(gw, ACME)
    with pytest.raises(InvalidInput, match="contact"):
        gateway.add_consumer(gw, gateway.ConsumerName("globex"), "x" * 256)
    gateway.add_consumer(gw, gateway.ConsumerName("globex"))
    assert [c.name.value for c in gateway.list_consumers(gw)] == ["acme", "globex"]
    with pytest.raises(NotFound):
        gateway.get_consumer(gw, gateway.ConsumerName("initech"))

    first = gateway.disable_consumer(gw, ACME)
    clock.advance(dt.timedelta(minutes=5))
    again = gateway.disable_consumer(gw, ACME)  # idempotent: the first time is kept
    assert not again.enabled and again.disabled_at == first.disabled_at == first.created_at
    _, csr = partner_csr()
    with pytest.raises(PermissionDenied, match="disabled"):
        from_csr(gw, csr)
    with pytest.raises(NotFound):
        from_csr(gw, csr, gateway.ConsumerName("initech"))


def test_certificate_from_a_csr_takes_only_its_key(gw_lite: Context, clock: FixedClock) -> None:
    """The partner's subject and SANs (an e-mail, a URN, a DNS name: parse_csr would refuse the
    first two) are ignored; CN and URN SAN name the consumer; 90 days exactly."""
    key, csr = partner_csr(
        common_name="admin",
        sans=[
            x509.RFC822Name("ops@acme.example"),
            x509.UniformResourceIdentifier("urn:trellis:gateway:consumer:root"),
            x509.DNSName("api.acme.example"),
        ],
    )
    issued = from_csr(gw_lite, csr)
    now = clock.now()
    intermediate = gateway.gateway_status(gw_lite).intermediate
    assert_gateway_leaf(
        issued.certificate,
        "acme",
        intermediate,
        public_key=key.public_key(),
        not_before=now - BACKDATE,
        not_after=now + dt.timedelta(days=90),
    )
    assert issued.chain_pem == intermediate.public_bytes(serialization.Encoding.PEM)
    assert issued.pkcs12 is None and not issued.clamped
    record = issued.record
    assert record.delivery is gateway.Delivery.CSR and record.consumer == ACME
    der = issued.certificate.public_bytes(serialization.Encoding.DER)
    assert record.x5t_s256 == b64url(hashlib.sha256(der).digest())
    assert len(record.x5t_s256) == 43 and "=" not in record.x5t_s256
    info = get_certificate(gw_lite, issued.serial)
    assert (info.identity, info.profile, info.requested_by) == (
        "CN=acme",
        "gateway-client",
        "tests",
    )
    assert gateway.show_certificate(gw_lite, issued.serial) == record


def test_thumbprint_matches_the_openssl_pipeline(gw_lite: Context, tmp_path: Path) -> None:
    issued = from_csr(gw_lite, partner_csr()[1])
    (tmp_path / "leaf.pem").write_bytes(issued.certificate_pem)
    assert openssl_x5t(tmp_path / "leaf.pem") == issued.record.x5t_s256


def test_ttl_is_bounded_by_the_gateway_policy(gw_lite: Context, clock: FixedClock) -> None:
    issued = from_csr(gw_lite, partner_csr()[1], ttl=Ttl.parse("398d"))
    assert issued.certificate.not_valid_after_utc == clock.now() + dt.timedelta(days=398)
    with pytest.raises(PolicyViolation, match="exceeds the gateway maximum 398d"):
        from_csr(gw_lite, partner_csr()[1], ttl=Ttl.parse("399d"))


def test_ttl_clamped_to_the_issuing_ca_is_reported(lite_ctx: Context, clock: FixedClock) -> None:
    gateway.init_gateway(
        lite_ctx,
        gateway.GatewayParams(
            ca_ttl=Ttl.parse("30d"), default_ttl=Ttl.parse("7d"), max_ttl=Ttl.parse("20d")
        ),
    )
    gateway.add_consumer(lite_ctx, ACME)
    clock.advance(dt.timedelta(days=25))
    issued = from_csr(lite_ctx, partner_csr()[1], ttl=Ttl.parse("20d"))
    assert issued.clamped
    assert issued.certificate.not_valid_after_utc == (
        gateway.gateway_status(lite_ctx).intermediate.not_valid_after_utc
    )


def test_two_live_certificates_at_most(gw: Context, clock: FixedClock) -> None:
    """The renewal overlap: current + successor. A third is refused until one is revoked or
    expires; revoked, expired and other consumers' certificates do not count."""
    first = from_csr(gw, partner_csr()[1], ttl=Ttl.parse("1d"))
    second = from_csr(gw, partner_csr()[1])
    gateway.add_consumer(gw, gateway.ConsumerName("globex"))
    from_csr(gw, partner_csr()[1], gateway.ConsumerName("globex"))
    with pytest.raises(Conflict, match="already holds 2 valid certificates"):
        from_csr(gw, partner_csr()[1])
    assert gateway.get_consumer(gw, ACME).live_certificates == 2

    gateway.revoke_gateway_certificate(gw, second.serial, RevocationReason.SUPERSEDED, "t")
    third = from_csr(gw, partner_csr()[1])
    with pytest.raises(Conflict):
        from_csr(gw, partner_csr()[1])
    clock.advance(dt.timedelta(days=1, seconds=1))  # the first expires
    fourth = from_csr(gw, partner_csr()[1])
    live = gateway.list_gateway_certificates(gw, ACME, live_only=True)
    assert {c.info.serial for c in live} == {third.serial, fourth.serial}
    every = gateway.list_gateway_certificates(gw, ACME)
    assert {c.info.serial for c in every} == {
        first.serial,
        second.serial,
        third.serial,
        fourth.serial,
    }
    statuses = {c.info.serial: c.info.status for c in every}
    assert statuses[first.serial] is CertStatus.EXPIRED
    assert statuses[second.serial] is CertStatus.REVOKED


def test_a_certificate_that_lost_the_race_is_withdrawn(
    gw: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two issuances can both pass the cheap pre-check; the one whose re-check sees three live
    certificates revokes its own (never handed out) and answers 409."""
    from_csr(gw, partner_csr()[1])
    from_csr(gw, partner_csr()[1])
    monkeypatch.setattr(gateway, "_check_policy", lambda ctx, request: Ttl.parse("90d"))
    with pytest.raises(Conflict):
        from_csr(gw, partner_csr()[1])
    with Session(gw.engine) as session:
        rows = session.exec(select(CertificateRow).where(CertificateRow.authority == "gateway"))
        withdrawn = [row for row in rows.all() if row.status == "revoked"]
    assert len(withdrawn) == 1
    assert (withdrawn[0].revoked_by, withdrawn[0].revocation_reason) == (
        "gateway:withdrawn",
        "superseded",
    )
    assert gateway.get_consumer(gw, ACME).live_certificates == 2
    crl = x509.load_der_x509_crl(current_crl(gw, "gateway", "intermediate").der)
    assert crl.get_revoked_certificate_by_serial_number(int(withdrawn[0].serial, 16))


def test_concurrent_issuance_never_leaves_three_live(gw: Context) -> None:
    barrier = threading.Barrier(4)
    outcomes: list[object] = []
    csrs = [partner_csr()[1] for _ in range(4)]

    def issue(csr: bytes) -> None:
        barrier.wait(timeout=10)
        try:
            outcomes.append(from_csr(gw, csr))
        except Conflict as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=issue, args=(csr,)) for csr in csrs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    issued = [o for o in outcomes if isinstance(o, gateway.IssuedGatewayCertificate)]
    assert len(outcomes) == 4 and len(issued) == 2  # settlements are serialised per consumer
    live = gateway.list_gateway_certificates(gw, ACME, live_only=True)
    assert {c.info.serial for c in live} == {i.serial for i in issued}


def _rsa_1024_csr() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return partner_csr(key)[1]


def _tampered_csr() -> bytes:
    der = bytearray(
        x509.load_pem_x509_csr(partner_csr()[1]).public_bytes(serialization.Encoding.DER)
    )
    der[-1] ^= 0x01
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)


def _p521_csr() -> bytes:
    return partner_csr(ec.generate_private_key(ec.SECP521R1()))[1]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: b"not a csr", "not a valid PEM"),
        (lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
         "not a valid PEM"),
        (_tampered_csr, "signature does not verify"),
        (_rsa_1024_csr, "too small"),
        (_p521_csr, "not accepted"),
    ],
    ids=["fail/garbage", "fail/bad-der", "fail/tampered", "fail/rsa-1024", "fail/p521"],
)  # fmt: skip
def test_bad_csrs_are_refused_before_signing(gw_lite: Context, make: object, match: str) -> None:
    assert callable(make)
    with pytest.raises(InvalidCsr, match=match):
        from_csr(gw_lite, make())
    assert gateway.list_gateway_certificates(gw_lite) == []


def test_csr_with_ed25519_and_rsa_keys(gw_lite: Context) -> None:
    for key in (ed25519.Ed25519PrivateKey.generate(), rsa.generate_private_key(65537, 2048)):
        builder = x509.CertificateSigningRequestBuilder().subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
        )
        digest = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
        csr = builder.sign(key, digest).public_bytes(serialization.Encoding.PEM)
        issued = from_csr(gw_lite, csr)
        assert issued.certificate.public_key() == key.public_key()
        gateway.revoke_gateway_certificate(gw_lite, issued.serial, RevocationReason.SUPERSEDED, "t")


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({}, "^give a CSR or a PKCS#12 password$"),
        ({"csr_pem": b"x", "pkcs12_password": PASSWORD}, "not both"),
        ({"pkcs12_password": b"short"}, "8 to 1024"),
        ({"csr_pem": b"x", "legacy_pkcs12": True}, "brings its own key"),
        ({"csr_pem": b"x", "key_type": KeyType.RSA_2048}, "brings its own key"),
        ({"pkcs12_password": PASSWORD, "key_type": KeyType.ED25519}, "EC or RSA"),
    ],
    ids=[
        "fail/neither",
        "fail/both",
        "fail/short-password",
        "fail/csr-legacy",
        "fail/csr-key",
        "fail/p12-ed25519",
    ],
)
def test_cert_request_shapes(fields: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        gateway.CertRequest(ACME, "tests", **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("legacy", "key_type", "expected_key", "algorithms"),
    [
        (False, None, ec.EllipticCurvePrivateKey,
         ["PBES2, PBKDF2, AES-256-CBC", "PRF hmacWithSHA256", "MAC: sha256"]),
        (True, None, rsa.RSAPrivateKey, ["pbeWithSHA1And3-KeyTripleDES-CBC", "MAC: sha1"]),
        (False, KeyType.RSA_2048, rsa.RSAPrivateKey, ["AES-256-CBC"]),
    ],
    ids=["ok/modern-ec", "ok/legacy-rsa", "ok/modern-rsa"],
)  # fmt: skip
def test_pkcs12_opens_with_the_password_only(
    gw_lite: Context,
    tmp_path: Path,
    legacy: bool,
    key_type: KeyType | None,
    expected_key: type,
    algorithms: list[str],
) -> None:
    keys_dir = gw_lite.settings.data_dir / "keys"
    key_files = sorted(keys_dir.rglob("*"))
    issued = as_pkcs12(gw_lite, legacy=legacy, key_type=key_type)
    assert issued.pkcs12 is not None
    assert issued.record.delivery is (
        gateway.Delivery.PKCS12_LEGACY if legacy else gateway.Delivery.PKCS12
    )
    bundle = pkcs12.load_pkcs12(issued.pkcs12, PASSWORD)
    assert bundle.key is not None and isinstance(bundle.key, expected_key)
    assert bundle.cert is not None and bundle.cert.certificate == issued.certificate
    assert bundle.cert.friendly_name == b"acme"
    assert bundle.key.public_key() == issued.certificate.public_key()
    assert [c.certificate for c in bundle.additional_certs] == [
        gateway.gateway_status(gw_lite).intermediate
    ]
    assert sorted(keys_dir.rglob("*")) == key_files  # the partner's key was never stored

    path, right, wrong = tmp_path / "acme.p12", tmp_path / "pw", tmp_path / "wrong"
    path.write_bytes(issued.pkcs12)
    right.write_bytes(PASSWORD + b"\n")
    wrong.write_bytes(b"not the password\n")
    opened = openssl("pkcs12", "-info", "-noout", "-in", str(path), "-passin", f"file:{right}")
    if legacy and opened.returncode != 0 and "unsupported" in opened.stderr:
        # builds without 3DES in the default provider need the legacy one
        opened = openssl("pkcs12", "-legacy", "-info", "-noout", "-in", str(path),
                         "-passin", f"file:{right}")  # fmt: skip
    assert opened.returncode == 0, opened.stderr
    for algorithm in algorithms:
        assert algorithm in opened.stderr + opened.stdout
    refused = openssl("pkcs12", "-info", "-noout", "-in", str(path), "-passin", f"file:{wrong}")
    assert refused.returncode != 0 and "Mac verify error" in refused.stderr
    with pytest.raises(ValueError):
        pkcs12.load_pkcs12(issued.pkcs12, b"not the password")


@pytest.mark.parametrize(
    "failure", [RuntimeError("disk full"), Interrupted()], ids=["error", "ctrl-c"]
)
def test_a_certificate_whose_pkcs12_failed_is_withdrawn(
    gw_lite: Context, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    """Whatever stops it, Ctrl-C included (``cli.launch.Interrupted``, a ``BaseException``,
    which an ``except Exception`` let through with the certificate live and its key lost)."""

    def broken(*args: object) -> bytes:
        raise failure

    monkeypatch.setattr(gateway, "_pkcs12", broken)
    with pytest.raises(type(failure)):
        as_pkcs12(gw_lite)
    (withdrawn,) = gateway.list_gateway_certificates(gw_lite, ACME)
    assert withdrawn.info.status is CertStatus.REVOKED
    assert withdrawn.info.revoked_by == "gateway:withdrawn"
    assert gateway.get_consumer(gw_lite, ACME).live_certificates == 0


def test_revoking_is_gateway_only(gw: Context) -> None:
    other = Serial.generate()
    with pytest.raises(NotFound, match="no gateway certificate"):
        gateway.revoke_gateway_certificate(gw, other, RevocationReason.UNSPECIFIED, "t")
    issued = from_csr(gw, partner_csr()[1])
    cert, written = gateway.revoke_gateway_certificate(
        gw, issued.serial, RevocationReason.KEY_COMPROMISE, "t"
    )
    assert cert.info.status is CertStatus.REVOKED and written == []
    with pytest.raises(Conflict, match="already revoked"):
        gateway.revoke_gateway_certificate(gw, issued.serial, RevocationReason.UNSPECIFIED, "t")


def test_listing_is_one_query_and_shows_each_recorded_thumbprint(gw: Context) -> None:
    """The thumbprints come from the rows recorded at issuance, in the listing's one query, not
    from one more query and a PEM parse per listed certificate."""
    for name in ("globex", "initech"):
        gateway.add_consumer(gw, gateway.ConsumerName(name))
    consumers = [ACME, ACME, gateway.ConsumerName("globex"), gateway.ConsumerName("initech")]
    issued = [from_csr(gw, partner_csr()[1], consumer) for consumer in consumers]
    selects: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_rest: object) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            selects.append(statement)

    sa.event.listen(gw.engine, "before_cursor_execute", count)
    try:
        listed = gateway.list_gateway_certificates(gw)
    finally:
        sa.event.remove(gw.engine, "before_cursor_execute", count)

    assert len(selects) == 1
    assert {c.info.serial for c in listed} == {c.serial for c in issued}
    for certificate in listed:
        pem = certificate.info.certificate_pem.encode()
        assert certificate.x5t_s256 == gateway.x5t_s256(x509.load_pem_x509_certificate(pem))


def _issued_over_time(gw: Context, clock: FixedClock) -> list[gateway.IssuedGatewayCertificate]:
    """Five certificates over three consumers, a minute apart but the third and fourth,
    created in the same second (the clock's resolution): a tie that pages of two split."""
    for name in ("globex", "initech"):
        gateway.add_consumer(gw, gateway.ConsumerName(name))
    issued = []
    for i, name in enumerate(["acme", "globex", "acme", "initech", "globex"]):
        if i != 3:
            clock.advance(dt.timedelta(minutes=1))
        issued.append(from_csr(gw, partner_csr()[1], gateway.ConsumerName(name)))
    return issued


def test_listing_pages_newest_first_reaching_every_certificate_once(
    gw: Context, clock: FixedClock
) -> None:
    """Regression: the listing stopped at 1,000 rows, with nothing to say there were more and
    no way to go on. Pages follow ``next_after`` as ``ca.certs.certificate_page``'s do."""
    issued = _issued_over_time(gw, clock)
    seen: list[gateway.GatewayCertificate] = []
    after, pages = None, 0
    while True:
        page = gateway.gateway_certificate_page(gw, limit=2, after=after)
        seen += page.items
        pages += 1
        if page.next_after is None:
            break
        assert page.next_after == page.items[-1].info.serial and len(page.items) == 2
        after = page.next_after
    assert pages == 3
    serials = [c.info.serial for c in seen]
    assert len(serials) == len(set(serials)) and set(serials) == {c.serial for c in issued}
    created = [c.info.created_at for c in seen]
    assert created == sorted(created, reverse=True)
    # the newest first, the tie (issued[2], issued[3]) split by the first page's end
    assert serials[0] == issued[4].serial
    assert set(serials[1:3]) == {issued[2].serial, issued[3].serial}
    assert serials[3:] == [issued[1].serial, issued[0].serial]
    # one page that holds everything is the last; the filters page the same way
    whole = gateway.gateway_certificate_page(gw, limit=5)
    assert [c.info.serial for c in whole.items] == serials and whole.next_after is None
    first = gateway.gateway_certificate_page(gw, ACME, limit=1)
    assert [c.info.serial for c in first.items] == [issued[2].serial]
    rest = gateway.gateway_certificate_page(gw, ACME, limit=1, after=first.next_after)
    assert [c.info.serial for c in rest.items] == [issued[0].serial]
    assert rest.next_after is None


def test_a_page_goes_on_after_its_last_certificate_left_the_filter(
    gw: Context, clock: FixedClock
) -> None:
    """The cursor names a certificate, not a filter's row: revoked since, it still marks where
    the next page of live certificates begins."""
    issued = _issued_over_time(gw, clock)
    first = gateway.gateway_certificate_page(gw, live_only=True, limit=3)
    assert first.next_after is not None
    gateway.revoke_gateway_certificate(gw, first.next_after, RevocationReason.SUPERSEDED, "t")
    rest = gateway.gateway_certificate_page(gw, live_only=True, limit=3, after=first.next_after)
    assert [c.info.serial for c in rest.items] == [issued[1].serial, issued[0].serial]


def test_listing_refuses_a_limit_out_of_range_and_a_cursor_it_never_listed(gw: Context) -> None:
    from_csr(gw, partner_csr()[1])
    for limit in (0, -1, 1001):
        with pytest.raises(InvalidInput, match="limit must be between 1 and 1000"):
            gateway.gateway_certificate_page(gw, limit=limit)
        with pytest.raises(InvalidInput, match="limit must be between 1 and 1000"):
            gateway.list_gateway_certificates(gw, limit=limit)
    mesh = mint_svid(gw, admin_grant(gw, SpiffeId.parse("spiffe://example.org/w"), "t"),
                     KeyType.EC_P256.generate())  # fmt: skip
    for cursor in (Serial.generate(), mesh.serial):  # none at all; not a gateway certificate
        with pytest.raises(InvalidInput, match="not there to page after"):
            gateway.gateway_certificate_page(gw, after=cursor)


def test_each_outcome_is_counted_once(gw_lite: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    """``trellis_certificates_issued_total`` as for SVIDs (``ca.issue.counted``): only
    ``issued`` was counted, from inside the signing, so refusals never showed and a certificate
    withdrawn after it was signed (it lost the race for the two live ones) counted as issued."""
    results = ("issued", "conflict", "forbidden")
    before = {r: issued_total("gateway", "gateway-client", r) for r in results}
    from_csr(gw_lite, partner_csr()[1])
    from_csr(gw_lite, partner_csr()[1])
    with monkeypatch.context() as patch:  # passes the pre-check, loses at the re-check
        patch.setattr(gateway, "_check_policy", lambda ctx, request: Ttl.parse("90d"))
        with pytest.raises(Conflict):
            from_csr(gw_lite, partner_csr()[1])
    gateway.disable_consumer(gw_lite, ACME)
    with pytest.raises(PermissionDenied):
        from_csr(gw_lite, partner_csr()[1])
    after = {r: issued_total("gateway", "gateway-client", r) for r in results}
    assert {r: after[r] - before[r] for r in results} == {
        "issued": 2,
        "conflict": 1,
        "forbidden": 1,
    }
