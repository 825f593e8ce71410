"""The certificate assertions must fail on every defect they claim to catch: each row builds a
certificate that breaks exactly one X509-SVID / RFC 5280 rule and expects ``AssertionError``."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca.identity import SpiffeId, TrustDomain
from ca.keys import KeyHandle, KeyType, Signer
from ca.profiles import CaSpec, LeafSpec, ca_builder, ca_subject, leaf_builder, sign
from ca.serial import Serial
from tests.certassert import assert_is_ca, assert_is_svid_leaf

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
WEB = "spiffe://example.org/web"
ROOT_KEY = ec.generate_private_key(ec.SECP256R1())
LEAF_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())


def _root(key: ec.EllipticCurvePrivateKey = ROOT_KEY) -> x509.Certificate:
    spec = CaSpec(
        subject=ca_subject("Trellis", "example.org root"),
        public_key=key.public_key(),
        spiffe_id=TrustDomain("example.org").id(),
        serial=Serial.generate(),
        not_before=NOW - dt.timedelta(days=1),
        not_after=NOW + dt.timedelta(days=30),
        path_length=None,
    )
    return sign(ca_builder(spec), Signer(KeyHandle("t", "root", KeyType.EC_P256), key))


ROOT = _root()


def _usage(**flags: bool) -> x509.KeyUsage:
    names = (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    )
    return x509.KeyUsage(**{name: flags.get(name, False) for name in names})


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


BOTH_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])


def build_leaf(**change: Any) -> x509.Certificate:
    """A valid SVID leaf built by hand, with one field or extension replaced or (None) dropped."""
    public_key = change.pop("public_key", LEAF_KEY.public_key())
    fields = {
        "subject": x509.Name([]),
        "serial": Serial.generate().value,
        "not_after": NOW + dt.timedelta(hours=1),
        "signing_key": ROOT_KEY,
    }
    extensions: dict[str, tuple[x509.ExtensionType, bool] | None] = {
        "basic": (x509.BasicConstraints(ca=False, path_length=None), True),
        "usage": (_usage(digital_signature=True), True),
        "eku": (BOTH_EKU, False),
        "ski": (x509.SubjectKeyIdentifier.from_public_key(public_key), False),
        "aki": (_aki(ROOT), False),
        "san": (x509.SubjectAlternativeName([x509.UniformResourceIdentifier(WEB)]), True),
    }
    for name, value in change.items():
        (fields if name in fields else extensions)[name] = value
    builder = (
        x509.CertificateBuilder()
        .subject_name(fields["subject"])
        .issuer_name(ROOT.subject)
        .public_key(public_key)
        .serial_number(fields["serial"])
        .not_valid_before(NOW)
        .not_valid_after(fields["not_after"])
    )
    for extension in extensions.values():
        if extension is not None:
            builder = builder.add_extension(*extension)
    return builder.sign(fields["signing_key"], hashes.SHA256())


def test_the_hand_built_leaf_is_valid() -> None:
    assert_is_svid_leaf(build_leaf(), spiffe_id=WEB, issuer=ROOT)


def test_the_profile_leaf_is_valid() -> None:
    spec = LeafSpec(
        LEAF_KEY.public_key(),
        SpiffeId.parse(WEB),
        Serial.generate(),
        NOW,
        NOW + dt.timedelta(hours=1),
        ROOT,
        dns_names=("web.example.org",),
    )
    cert = sign(leaf_builder(spec), Signer(KeyHandle("t", "root", KeyType.EC_P256), ROOT_KEY))
    assert_is_svid_leaf(cert, spiffe_id=WEB, issuer=ROOT, dns_names=["web.example.org"])


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
SAN = x509.SubjectAlternativeName
URI = x509.UniformResourceIdentifier

MISSING = "unexpected extension set"

# id -> (the defective certificate, what the assertion must say)
LEAF_DEFECTS: dict[str, tuple[Callable[[], x509.Certificate], str]] = {
    "san/not-critical-with-empty-subject": (
        lambda: build_leaf(san=(SAN([URI(WEB)]), False)),
        "SAN critical iff",
    ),
    "san/critical-with-subject": (
        lambda: build_leaf(subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")])),
        "SAN critical iff",
    ),
    "san/two-uris": (
        lambda: build_leaf(san=(SAN([URI(WEB), URI(WEB + "2")]), True)),
        "exactly one URI",
    ),
    "san/other-id": (
        lambda: build_leaf(san=(SAN([URI("spiffe://example.org/db")]), True)),
        "exactly one URI",
    ),
    "san/unexpected-dns": (
        lambda: build_leaf(san=(SAN([URI(WEB), x509.DNSName("x.example.org")]), True)),
        "DNS SANs",
    ),
    "san/missing": (lambda: build_leaf(san=None), MISSING),
    "basic/ca-true": (
        lambda: build_leaf(basic=(x509.BasicConstraints(True, None), True)),
        "cA must be false",
    ),
    "basic/not-critical": (
        lambda: build_leaf(basic=(x509.BasicConstraints(False, None), False)),
        "present and critical",
    ),
    "basic/missing": (lambda: build_leaf(basic=None), MISSING),
    "usage/not-critical": (
        lambda: build_leaf(usage=(_usage(digital_signature=True), False)),
        "MUST be critical",
    ),
    "usage/key-cert-sign": (
        lambda: build_leaf(usage=(_usage(digital_signature=True, key_cert_sign=True), True)),
        "keyUsage flags",
    ),
    "usage/crl-sign": (
        lambda: build_leaf(usage=(_usage(digital_signature=True, crl_sign=True), True)),
        "keyUsage flags",
    ),
    "usage/no-digital-signature": (
        lambda: build_leaf(usage=(_usage(key_encipherment=True), True)),
        "keyUsage flags",
    ),
    "usage/key-encipherment-on-ec": (
        lambda: build_leaf(usage=(_usage(digital_signature=True, key_encipherment=True), True)),
        "keyUsage flags",
    ),
    "usage/rsa-without-key-encipherment": (
        lambda: build_leaf(public_key=RSA_KEY.public_key()),
        "keyUsage flags",
    ),
    "usage/missing": (lambda: build_leaf(usage=None), MISSING),
    "eku/server-only": (
        lambda: build_leaf(eku=(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)),
        "exactly serverAuth",
    ),
    "eku/extra-code-signing": (
        lambda: build_leaf(
            eku=(x509.ExtendedKeyUsage([*BOTH_EKU, ExtendedKeyUsageOID.CODE_SIGNING]), False)
        ),
        "exactly serverAuth",
    ),
    "eku/critical": (lambda: build_leaf(eku=(BOTH_EKU, True)), "non-critical"),
    "ski/wrong-key": (
        lambda: build_leaf(
            ski=(x509.SubjectKeyIdentifier.from_public_key(OTHER_KEY.public_key()), False)
        ),
        "SKI does not match",
    ),
    "ski/missing": (lambda: build_leaf(ski=None), MISSING),
    "aki/not-the-issuer": (
        lambda: build_leaf(
            aki=(x509.AuthorityKeyIdentifier.from_issuer_public_key(OTHER_KEY.public_key()), False)
        ),
        "AKI is not the issuer's SKI",
    ),
    "extra-extension": (lambda: build_leaf(extra=(x509.OCSPNoCheck(), False)), MISSING),
    "serial/below-2**64": (lambda: build_leaf(serial=2**63), "below 2\\*\\*64"),
    "validity/outlives-issuer": (
        lambda: build_leaf(not_after=NOW + dt.timedelta(days=31)),
        "outlives its issuer",
    ),
    "signature/other-key": (lambda: build_leaf(signing_key=OTHER_KEY), "not signed by"),
}


@pytest.mark.parametrize("defect", LEAF_DEFECTS, ids=[f"fail/{k}" for k in LEAF_DEFECTS])
def test_assert_is_svid_leaf_catches(defect: str) -> None:
    build, reason = LEAF_DEFECTS[defect]
    with pytest.raises(AssertionError, match=reason):
        assert_is_svid_leaf(build(), spiffe_id=WEB, issuer=ROOT)


def test_assert_is_ca_accepts_trellis_roots() -> None:
    assert_is_ca(ROOT, trust_domain="example.org", path_length=None)


CA_DEFECTS: dict[str, tuple[x509.Certificate, dict[str, Any], str]] = {
    "wrong-path-length": (ROOT, {"path_length": 0}, "path length None, expected 0"),
    "wrong-trust-domain": (ROOT, {"trust_domain": "other.test"}, "expected only the trust"),
    "leaf-is-not-a-ca": (build_leaf(), {"issuer": ROOT}, MISSING),
    "wrong-issuer": (ROOT, {"issuer": _root(OTHER_KEY)}, "not signed by"),
}


@pytest.mark.parametrize("defect", CA_DEFECTS, ids=[f"fail/{k}" for k in CA_DEFECTS])
def test_assert_is_ca_catches(defect: str) -> None:
    cert, overrides, reason = CA_DEFECTS[defect]
    kwargs: dict[str, Any] = {"trust_domain": "example.org", "path_length": None, **overrides}
    with pytest.raises(AssertionError, match=reason):
        assert_is_ca(cert, **kwargs)
