"""X509-SVID leaves rendered from their issuer's DER template (``ca.leafder``) are the leaves
``ca.profiles.leaf_builder`` makes: the same TBSCertificate, byte for byte, for every CA key
type, every subject key type, and the fields that differ per certificate at their edges (DER
lengths, the sign bit of a serial, UTCTime against GeneralizedTime, time zones). A CA key the
template cannot sign with goes through ``leaf_builder`` itself."""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from ca import leafder
from ca.checks import check_leaf
from ca.errors import InternalError
from ca.identity import SpiffeId
from ca.keys import KeyHandle, KeyType, PrivateKey, Signer
from ca.profiles import CaSpec, LeafSpec, RevocationUrls, ca_builder, ca_subject, leaf_builder, sign
from ca.serial import Serial

NOW = dt.datetime(2026, 11, 27, 10, 30, 15, 654321, tzinfo=dt.UTC)
WEB = SpiffeId.parse("spiffe://example.org/ns/default/sa/web")
CA_TYPES = list(KeyType)
LEAF_TYPES = [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048, KeyType.ED25519]
URLS = RevocationUrls.under("https://trellis.example.org:8443", "mesh", 0x1234)


@functools.cache
def _key(key_type: KeyType, which: str = "") -> PrivateKey:
    return key_type.generate()


@functools.cache
def _ca(key_type: KeyType) -> tuple[x509.Certificate, Signer]:
    key = _key(key_type, "ca")
    signer = Signer(KeyHandle("t", f"ca-{key_type.value}", key_type), key)
    spec = CaSpec(
        subject=ca_subject("Trellis", f"example.org {key_type.value}"),
        public_key=key.public_key(),
        spiffe_id=None,
        serial=Serial.generate(),
        not_before=NOW - dt.timedelta(days=1),
        not_after=NOW + dt.timedelta(days=365 * 30),
        path_length=0,
    )
    return sign(ca_builder(spec), signer), signer


def _spec(ca_type: KeyType, leaf_type: KeyType, **fields: object) -> LeafSpec:
    issuer, _ = _ca(ca_type)
    values: dict[str, object] = {
        "public_key": _key(leaf_type).public_key(),
        "spiffe_id": WEB,
        "serial": Serial.generate(),
        "not_before": NOW - dt.timedelta(seconds=30),
        "not_after": NOW + dt.timedelta(hours=1),
        "issuer": issuer,
    }
    return LeafSpec(**{**values, **fields})  # type: ignore[arg-type]


def _both(spec: LeafSpec, ca_type: KeyType) -> tuple[x509.Certificate, x509.Certificate]:
    _, signer = _ca(ca_type)
    return leafder.signed_leaf(spec, signer), sign(leaf_builder(spec), signer)


def _same(spec: LeafSpec, ca_type: KeyType) -> x509.Certificate:
    rendered, built = _both(spec, ca_type)
    assert rendered.tbs_certificate_bytes == built.tbs_certificate_bytes
    assert rendered.signature_algorithm_oid == built.signature_algorithm_oid
    check_leaf(rendered, spec.issuer, WEB)  # its signature verifies, its extensions pass
    return rendered


VARIANTS = {
    "plain": {},
    "names, URLs and a subject": {
        "dns_names": ("web.default.svc", "web.default.svc.cluster.local"),
        "ip_addresses": (ipaddress.ip_address("10.0.0.7"), ipaddress.ip_address("fd00::7")),
        "urls": URLS,
        "subject": x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example"),
                x509.NameAttribute(NameOID.COMMON_NAME, "web"),
            ]
        ),
    },
}


@pytest.mark.parametrize("ca_type", [t for t in CA_TYPES if t is not KeyType.ED25519])
@pytest.mark.parametrize("leaf_type", LEAF_TYPES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_rendered_leaf_is_the_builders_leaf(
    ca_type: KeyType, leaf_type: KeyType, variant: str
) -> None:
    spec = _spec(ca_type, leaf_type, **VARIANTS[variant])
    assert leafder._template(spec, ca_type) is not None  # rendered, not built
    _same(spec, ca_type)


@pytest.mark.parametrize(
    "serial",
    [1, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 2**151 + 5, 2**152 - 1, 2**152, 2**159 - 1],
)
def test_serials_at_the_edges_of_their_encoding(serial: int) -> None:
    _same(_spec(KeyType.EC_P256, KeyType.EC_P256, serial=Serial(serial)), KeyType.EC_P256)


@pytest.mark.parametrize(
    ("not_before", "not_after"),
    [
        # UTCTime through 2049, GeneralizedTime from 2050 (RFC 5280 §4.1.2.5)
        (
            dt.datetime(2049, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC),
            dt.datetime(2050, 1, 1, tzinfo=dt.UTC),
        ),
        # another zone is converted; naive times are UTC, as cryptography takes them
        (
            dt.datetime(2026, 11, 27, 12, 0, 1, tzinfo=dt.timezone(dt.timedelta(hours=2))),
            dt.datetime(2026, 11, 27, 11, 0, 1, 500000),
        ),
    ],
)
def test_validity_at_the_edges_of_its_encoding(
    not_before: dt.datetime, not_after: dt.datetime
) -> None:
    spec = _spec(KeyType.EC_P256, KeyType.EC_P256, not_before=not_before, not_after=not_after)
    _same(spec, KeyType.EC_P256)


def test_long_names_take_long_form_lengths() -> None:
    """A SAN of more than 255 octets: two-octet lengths around it, up to the TBS."""
    names = tuple(f"{'a' * 60}.{n}.web.default.svc.cluster.local" for n in range(12))
    spec = _spec(KeyType.EC_P256, KeyType.RSA_2048, dns_names=names, urls=URLS)
    rendered = _same(spec, KeyType.EC_P256)
    san = rendered.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == list(names)


def test_each_issuer_has_its_own_template() -> None:
    """The same request under two issuers, one after the other: each leaf names its own issuer
    and is signed by it."""
    for ca_type in (KeyType.EC_P256, KeyType.EC_P384, KeyType.EC_P256):
        rendered = _same(_spec(ca_type, KeyType.EC_P256), ca_type)
        assert rendered.issuer == _ca(ca_type)[0].subject


def test_an_ed25519_ca_signs_through_the_builder() -> None:
    spec = _spec(KeyType.ED25519, KeyType.EC_P256)
    assert leafder._template(spec, KeyType.ED25519) is None
    _same(spec, KeyType.ED25519)


def test_a_name_that_is_not_ascii_fails_as_the_builder_does() -> None:
    spec = _spec(KeyType.EC_P256, KeyType.EC_P256, dns_names=("bücher.example",))
    _, signer = _ca(KeyType.EC_P256)
    with pytest.raises(ValueError, match="A-label") as rendered:
        leafder.signed_leaf(spec, signer)
    with pytest.raises(ValueError, match="A-label") as built:
        sign(leaf_builder(spec), signer)
    assert str(rendered.value) == str(built.value)


@pytest.mark.parametrize("ca_type", CA_TYPES)
def test_the_self_check_refuses_another_keys_signature(ca_type: KeyType) -> None:
    """The self-check's signature verification, for each kind of CA key: a leaf that names the
    issuer but was signed by another key of the same type is refused."""
    spec = _spec(ca_type, KeyType.EC_P256)
    other = Signer(KeyHandle("t", "other", ca_type), _key(ca_type, "other"))
    forged = leafder.signed_leaf(spec, other)
    with pytest.raises(InternalError, match="does not verify against the issuer"):
        check_leaf(forged, spec.issuer, WEB)
