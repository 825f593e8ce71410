"""Certificate assertions shared by the test suites, in the style of trustme's ``assert_is_ca`` /
``assert_is_leaf``: every extension a Trellis certificate carries is checked, with its
criticality, and an unexpected extension fails the assertion.

Rules cited are from RFC 5280 and spiffe/spiffe ``standards/X509-SVID.md``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, ExtensionOID

from ca.profiles import BACKDATE

__all__ = [
    "ExpectedUrls",
    "assert_is_ca",
    "assert_is_crl",
    "assert_is_svid_leaf",
    "assert_serial",
    "uri_sans",
]

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

CA_EXTENSIONS = {
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
}
LEAF_EXTENSIONS = CA_EXTENSIONS | {ExtensionOID.EXTENDED_KEY_USAGE}
# Only with ``urls=``: a certificate carries revocation pointers only when Trellis has a public URL.
URL_EXTENSIONS = {ExtensionOID.CRL_DISTRIBUTION_POINTS, ExtensionOID.AUTHORITY_INFORMATION_ACCESS}
CRL_EXTENSIONS = {ExtensionOID.CRL_NUMBER, ExtensionOID.AUTHORITY_KEY_IDENTIFIER}
WEAK_HASHES = (hashes.SHA1, hashes.MD5)


@dataclass(frozen=True)
class ExpectedUrls:
    """The revocation pointers a certificate must carry: its issuer's CRL (RFC 5280 §4.2.1.13),
    the OCSP responder and the issuer certificate (§4.2.2.1 Authority Information Access)."""

    crl: str
    ocsp: str
    ca_issuers: str


def _key_usage_flags(usage: x509.KeyUsage) -> set[str]:
    flags = {
        name
        for name in (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
        )
        if getattr(usage, name)
    }
    # encipher_only/decipher_only are only defined (readable) when keyAgreement is set.
    if usage.key_agreement:
        flags |= {name for name in ("encipher_only", "decipher_only") if getattr(usage, name)}
    return flags


def uri_sans(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def assert_serial(cert: x509.Certificate) -> None:
    """RFC 5280 §4.1.2.2: positive, at most 20 octets; CA/B-style >= 64 bits of entropy."""
    serial = cert.serial_number
    assert serial > 0, "serial must be positive"
    assert serial >= 2**64, f"serial {serial:x} is below 2**64 (too little entropy)"
    # A positive DER INTEGER needs bit_length // 8 + 1 octets (leading sign bit).
    assert serial.bit_length() // 8 + 1 <= 20, f"serial {serial:x} does not fit in 20 octets"


def _assert_urls(cert: x509.Certificate, urls: ExpectedUrls) -> None:
    cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    assert not cdp.critical, "RFC 5280 §4.2.1.13: CRL distribution points SHOULD be non-critical"
    points = list(cdp.value)
    assert len(points) == 1, f"expected one distribution point, got {points}"
    (point,) = points
    assert point.full_name == [x509.UniformResourceIdentifier(urls.crl)], (
        f"CRL distribution point {point.full_name}, expected {urls.crl}"
    )
    # A plain URL point: no partial-reason CRLs, no indirect CRL issuer.
    assert point.relative_name is None and point.reasons is None and point.crl_issuer is None

    aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess)
    assert not aia.critical, "RFC 5280 §4.2.2.1: AIA MUST be non-critical"
    found = sorted(
        (d.access_method.dotted_string, d.access_location.value)
        for d in aia.value
        if isinstance(d.access_location, x509.UniformResourceIdentifier)
    )
    assert len(found) == len(aia.value), f"non-URI access locations in {aia.value}"
    wanted = sorted(
        [
            (AuthorityInformationAccessOID.OCSP.dotted_string, urls.ocsp),
            (AuthorityInformationAccessOID.CA_ISSUERS.dotted_string, urls.ca_issuers),
        ]
    )
    assert found == wanted, f"authority information access {found}, expected {wanted}"


def _assert_common(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    expected: set[object],
    urls: ExpectedUrls | None = None,
) -> None:
    assert cert.version is x509.Version.v3
    assert_serial(cert)
    if urls is not None:
        expected = expected | URL_EXTENSIONS
    present = {ext.oid for ext in cert.extensions}
    assert present == expected, (
        f"unexpected extension set: extra {present - expected}, missing {expected - present}"
    )
    if urls is not None:
        _assert_urls(cert, urls)
    algorithm = cert.signature_hash_algorithm
    assert not isinstance(algorithm, WEAK_HASHES), f"weak signature hash {algorithm}"
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise AssertionError(f"not signed by the issuer's key: {exc!r}") from exc
    assert cert.issuer == issuer.subject
    assert cert.not_valid_before_utc < cert.not_valid_after_utc
    assert cert.not_valid_after_utc <= issuer.not_valid_after_utc, "outlives its issuer"
    assert cert.not_valid_before_utc >= issuer.not_valid_before_utc, "predates its issuer"

    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert not ski.critical, "RFC 5280 §4.2.1.2: SKI MUST be non-critical"
    expected_ski = x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    assert ski.value.digest == expected_ski.digest, "SKI does not match the certificate's key"

    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert not aki.critical, "RFC 5280 §4.2.1.1: AKI MUST be non-critical"
    issuer_ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.value.key_identifier == issuer_ski.digest, "AKI is not the issuer's SKI"
    assert aki.value.authority_cert_issuer is None
    assert aki.value.authority_cert_serial_number is None


def assert_is_ca(
    cert: x509.Certificate,
    *,
    trust_domain: str,
    path_length: int | None,
    issuer: x509.Certificate | None = None,
    urls: ExpectedUrls | None = None,
) -> None:
    """A Trellis signing certificate; ``issuer=None`` means a self-signed root. CRL distribution
    points and AIA are refused unless ``urls`` names exactly what they must hold."""
    issuer = cert if issuer is None else issuer
    _assert_common(cert, issuer, CA_EXTENSIONS, urls)
    assert len(cert.subject) > 0, "CA certificates have a subject"

    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical, "RFC 5280 §4.2.1.9: basicConstraints is critical in CA certificates"
    assert basic.value.ca is True, "basicConstraints cA must be true"
    assert basic.value.path_length == path_length, (
        f"path length {basic.value.path_length}, expected {path_length}"
    )

    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical, "keyUsage must be critical"
    # X509-SVID §4.3: signing certificates assert keyCertSign (cRLSign so they can sign CRLs).
    flags = _key_usage_flags(usage.value)
    assert flags == {"key_cert_sign", "crl_sign"}, f"CA keyUsage flags {sorted(flags)}"

    # No EKU on CA certificates: Go's verifier would constrain every leaf below by it.
    assert ExtensionOID.EXTENDED_KEY_USAGE not in {ext.oid for ext in cert.extensions}, (
        "CA certificates carry no EKU"
    )

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical is (len(cert.subject) == 0), "SAN critical iff the subject is empty"
    names = list(san.value)
    # X509-SVID §4.1: a signing certificate's SPIFFE ID, if any, is the trust domain ID.
    assert names == [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")], (
        f"CA SAN {names}, expected only the trust domain ID"
    )


def assert_is_svid_leaf(
    cert: x509.Certificate,
    *,
    spiffe_id: str,
    issuer: x509.Certificate,
    dns_names: Iterable[str] = (),
    ip_addresses: Iterable[IpAddress] = (),
    urls: ExpectedUrls | None = None,
) -> None:
    """An X509-SVID leaf (X509-SVID §4 and §5) signed directly by ``issuer``. CRL distribution
    points and AIA are refused unless ``urls`` names exactly what they must hold."""
    _assert_common(cert, issuer, LEAF_EXTENSIONS, urls)
    assert cert.subject != issuer.subject, "a leaf is not self-issued"

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    # X509-SVID §2 / RFC 5280 §4.2.1.6: an empty subject makes the SAN critical.
    assert san.critical is (len(cert.subject) == 0), "SAN critical iff the subject is empty"
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == [spiffe_id], f"X509-SVID §2: exactly one URI SAN, got {uris}"
    path = spiffe_id.split("://", 1)[1].partition("/")[2]
    assert path, "X509-SVID §4.1: a leaf SPIFFE ID has a non-root path"
    dns = sorted(san.value.get_values_for_type(x509.DNSName))
    assert dns == sorted(dns_names), f"DNS SANs {dns}, expected {sorted(dns_names)}"
    ips = sorted(san.value.get_values_for_type(x509.IPAddress), key=str)
    assert ips == sorted(ip_addresses, key=str), f"IP SANs {ips}"
    allowed = (x509.UniformResourceIdentifier, x509.DNSName, x509.IPAddress)
    assert all(isinstance(name, allowed) for name in san.value), list(san.value)

    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical, "X509-SVID §4.1: basicConstraints present and critical"
    assert basic.value.ca is False, "leaf basicConstraints cA must be false"
    assert basic.value.path_length is None, "a leaf has no path length"

    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical, "X509-SVID §4.3: keyUsage MUST be critical"
    expected_usage = {"digital_signature"}
    if isinstance(cert.public_key(), rsa.RSAPublicKey):
        expected_usage.add("key_encipherment")  # RSA key transport (TLS 1.2 RSA kx)
    # X509-SVID §4.3: digitalSignature set; keyCertSign and cRLSign MUST NOT be set.
    flags = _key_usage_flags(usage.value)
    assert flags == expected_usage, f"leaf keyUsage flags {sorted(flags)}"

    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert not eku.critical, "EKU is non-critical"
    # X509-SVID §4.4: if present, EKU holds both TLS roles; Trellis adds nothing else.
    purposes = sorted(oid.dotted_string for oid in eku.value)
    assert purposes == sorted(
        oid.dotted_string
        for oid in (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
    ), f"EKU {purposes}, expected exactly serverAuth + clientAuth"


def _crl_version(crl: x509.CertificateRevocationList) -> int | None:
    """The TBSCertList's optional version INTEGER (RFC 5280 §5.1.2.1): 1 means v2, absent v1."""
    tbs = crl.tbs_certlist_bytes
    assert tbs[0] == 0x30, "TBSCertList is not a SEQUENCE"
    at = 2 + (tbs[1] & 0x7F if tbs[1] & 0x80 else 0)  # skip the SEQUENCE header
    if tbs[at] != 0x02:  # no INTEGER first: the AlgorithmIdentifier SEQUENCE, so v1
        return None
    return int.from_bytes(tbs[at + 2 : at + 2 + tbs[at + 1]], "big")


def assert_is_crl(
    crl: x509.CertificateRevocationList,
    *,
    issuer: x509.Certificate,
    number: int | None = None,
    signed_at: dt.datetime | None = None,
    lifetime: dt.timedelta | None = None,
) -> None:
    """A v2 CRL issued by ``issuer`` (RFC 5280 §5): every CRL extension checked, signature valid.
    ``signed_at``: when Trellis signed it; thisUpdate is ``BACKDATE`` before (relying parties
    whose clocks lag must not find it "not yet valid"), nextUpdate ``lifetime`` after."""
    assert _crl_version(crl) == 1, "RFC 5280 §5.1.2.1: a CRL with extensions MUST be v2"
    assert crl.issuer == issuer.subject, f"CRL issuer {crl.issuer}, expected {issuer.subject}"
    assert not isinstance(crl.signature_hash_algorithm, WEAK_HASHES)
    assert crl.is_signature_valid(issuer.public_key()), "CRL signature does not verify"
    present = {ext.oid for ext in crl.extensions}
    assert present == CRL_EXTENSIONS, f"CRL extensions {present}, expected {CRL_EXTENSIONS}"

    crl_number = crl.extensions.get_extension_for_class(x509.CRLNumber)
    assert not crl_number.critical, "RFC 5280 §5.2.3: cRLNumber MUST be non-critical"
    assert crl_number.value.crl_number > 0
    if number is not None:
        assert crl_number.value.crl_number == number, (
            f"CRL number {crl_number.value.crl_number}, expected {number}"
        )

    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert not aki.critical, "RFC 5280 §5.2.1: the CRL's AKI MUST be non-critical"
    issuer_ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.value.key_identifier == issuer_ski.digest, "CRL AKI is not the issuer's SKI"

    # RFC 5280 §5.1.2.5: conforming CRL issuers MUST include nextUpdate.
    assert crl.next_update_utc is not None, "nextUpdate is missing"
    assert crl.last_update_utc < crl.next_update_utc
    if signed_at is not None:
        expected = signed_at - BACKDATE
        assert crl.last_update_utc == expected, f"thisUpdate {crl.last_update_utc}, not {expected}"
        if lifetime is not None:
            assert crl.next_update_utc == signed_at + lifetime, (
                f"nextUpdate {crl.next_update_utc}, expected {signed_at + lifetime}"
            )
