"""Parsing certificate signing requests at the boundary.

A CSR contributes exactly one thing to a certificate: its public key, after the CSR's signature
proves the requester holds the private half. The SANs it asks for are only compared with what the
requester is entitled to; every other extension it asks for is ignored (the profile decides).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import SplitResult

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ca.errors import InvalidCsr, PolicyViolation
from ca.identity import SpiffeId
from ca.keys import KeyType, PublicKey, RefusedSignatureAlgorithm, check_public_key, verify_signed

__all__ = [
    "DecodedCsr",
    "ParsedCsr",
    "check_dns_name",
    "decode_csr",
    "load_verified_csr",
    "parse_csr",
    "svid_csr",
]

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def check_dns_name(name: str) -> str:
    """A lower-case hostname (RFC 1123), optionally with one leading wildcard label. ASCII is
    checked before lower-casing: str.lower maps some non-ASCII letters to ASCII ones (U+212A
    KELVIN SIGN to "k"), which turned such a name into another one instead of refusing it.
    An internationalised name is given in its A-label form (xn--...)."""
    if not name.isascii():
        raise PolicyViolation(
            f"invalid DNS name {name[:64]!r}: not ASCII (give an internationalised name as "
            "its xn-- A-label)"
        )
    candidate = name.strip().lower().rstrip(".")
    labels = candidate.split(".")
    if labels and labels[0] == "*":
        labels = labels[1:]
    if (
        not candidate
        or len(candidate) > 253
        or not labels
        or not all(_LABEL.match(x) for x in labels)
    ):
        raise PolicyViolation(f"invalid DNS name {name[:64]!r}")
    # No top-level domain is all digits (RFC 3696 §2): "10.0.0.1" is an address, and an
    # address in a dNSName is matched by no verifier; it belongs in an iPAddress SAN.
    if labels[-1].isdigit():
        raise PolicyViolation(
            f"{name[:64]!r} is not a host name (an IP address belongs in the IP addresses)"
        )
    return candidate


def no_port_to_reach(parts: SplitResult) -> bool:
    """Whether a URL's authority names port 0 or a ':' with no port after it: no client
    connects to either, and ``urlsplit`` reads both as no port (the scheme's default) or 0.
    Its ``port`` must have been read already (it raises on one out of range)."""
    return parts.port == 0 or parts.netloc.endswith(":")


def is_host(value: str) -> bool:
    """An IP address, or a host name by the rules of DNS SANs (``check_dns_name``) with no
    wildcard: what a URL or a listening address may name (TRELLIS_HOST, TRELLIS_PUBLIC_URL, a
    federation endpoint)."""
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        pass
    try:
        check_dns_name(value)
    except PolicyViolation:
        return False
    return "*" not in value


@dataclass(frozen=True, slots=True)
class DecodedCsr:
    """A CSR decoded from its PEM, nothing in it checked: its structure is DER, that is all.
    What a renewal proof is bound to (the SHA-256 of the DER), known before the proof is
    judged, so that a caller whose proof does not verify learns nothing about its CSR."""

    request: x509.CertificateSigningRequest
    sha256: bytes


def decode_csr(pem: bytes) -> DecodedCsr:
    """The PEM's CSR, structure only (a few µs: no key is read and no signature verified)."""
    request = _decoded(pem)
    return DecodedCsr(
        request, hashlib.sha256(request.public_bytes(serialization.Encoding.DER)).digest()
    )


# RFC 7468 §7 (and the legacy "NEW CERTIFICATE REQUEST" label it names).
_LABELS = (b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST")


def _one_block(pem: bytes) -> bool:
    """One BEGIN/END pair, of a CSR label, and no other PEM block; explanatory text around it is
    allowed, as RFC 7468 §5.2 asks of parsers (``openssl req -text`` writes the request's text
    before it). A few string scans: every issuance and renewal runs this."""
    return pem.count(b"-----") == 4 and any(
        b"-----BEGIN " + label + b"-----" in pem and b"-----END " + label + b"-----" in pem
        for label in _LABELS
    )


# What cryptography raises for a CSR it cannot read besides ValueError: its own exception types,
# which are not ValueErrors. Missed, each was an HTTP 500 (and a CLI traceback) where the caller
# sent bad input: a version other than v1 (0) when loading (RFC 2986 §4.1 knows only v1), a second
# subjectAltName or an x400Address/ediPartyName name when its extensions are read.
_UNREADABLE = (
    ValueError,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)


def _decoded(pem: bytes) -> x509.CertificateSigningRequest:
    """Exactly one PEM CSR. cryptography reads the first PEM block it finds and ignores the
    rest: a second request (or a certificate) after the first was accepted and dropped, so what
    was judged and signed was not all the caller sent."""
    if not _one_block(pem):
        blocks = pem.count(b"-----BEGIN ")
        raise InvalidCsr(
            "the CSR is not a valid PEM certificate request: send exactly one BEGIN/END "
            "CERTIFICATE REQUEST block and no other PEM block"
            + (f" (this holds {blocks} PEM blocks)" if blocks > 1 else "")
        )
    try:
        csr = x509.load_pem_x509_csr(pem)
    except _UNREADABLE:
        raise InvalidCsr("the CSR is not a valid PEM certificate request") from None
    _one_extension_request(csr)
    return csr


_EXTENSION_REQUEST = x509.ObjectIdentifier("1.2.840.113549.1.9.14")  # PKCS #9 extensionRequest
_EXTENSION_REQUEST_DER = bytes.fromhex("06092a864886f70d01090e")


def _one_extension_request(csr: x509.CertificateSigningRequest) -> None:
    """At most one extensionRequest attribute (RFC 2985 §5.4.2: single-valued, so a request has
    one). cryptography reads the first and ignores any other, so the names a second one asked for
    were never judged: refused, as a second PEM block is. A byte scan of the request first (every
    issuance runs this); its attributes are parsed only when the OID occurs twice. A second value
    inside one attribute cryptography refuses itself, when the extensions are read."""
    if csr.tbs_certrequest_bytes.count(_EXTENSION_REQUEST_DER) < 2:
        return
    try:
        requests = sum(1 for attribute in csr.attributes if attribute.oid == _EXTENSION_REQUEST)
    except _UNREADABLE:
        raise InvalidCsr("the CSR attributes cannot be parsed") from None
    if requests > 1:
        raise InvalidCsr(
            f"the CSR holds {requests} extensionRequest attributes: a certificate request has "
            "at most one (RFC 2985 §5.4.2)"
        )


@dataclass(frozen=True, slots=True)
class ParsedCsr:
    public_key: PublicKey
    spiffe_id: SpiffeId | None
    dns_names: tuple[str, ...]
    sha256: bytes  # of the DER CSR: renewal proofs are bound to it


_RSASSA_PSS = bytes.fromhex("06092a864886f70d01010a")  # the DER OID 1.2.840.113549.1.1.10


def _inside(der: bytes, at: int) -> tuple[int, int]:
    """Where the contents of the DER element at ``at`` start and end (short or long length)."""
    length, start = der[at + 1], at + 2
    if length & 0x80:
        count = length & 0x7F
        length, start = int.from_bytes(der[start : start + count]), start + count
    return start, start + length


def _key_algorithm(info: bytes) -> bytes:
    """The DER OID of the key's algorithm in a CertificationRequestInfo (RFC 2986 §4.1:
    SEQUENCE { version, subject, subjectPKInfo SEQUENCE { algorithm SEQUENCE { OID, ... } ... }
    ... }), which cryptography parsed already. Read from the DER because cryptography's typed
    CSR interface does not expose it (only its certificates have ``public_key_algorithm_oid``)."""
    at = _inside(info, 0)[0]
    at = _inside(info, at)[1]  # past the version
    at = _inside(info, at)[1]  # past the subject
    at = _inside(info, at)[0]  # into subjectPKInfo
    at = _inside(info, at)[0]  # into its AlgorithmIdentifier
    return info[at : _inside(info, at)[1]]


def load_verified_csr(pem: bytes) -> tuple[x509.CertificateSigningRequest, PublicKey]:
    """A PEM CSR whose signature proves possession of its (acceptable) key, made with an
    acceptable algorithm (SHA-256/384/512 or Ed25519: ``verify_signed``); nothing else judged.
    The key is read once and the signature verified with it, rather than by
    ``is_signature_valid``, which reads the key again (~8 µs a request) and accepts SHA-224."""
    return _verified(_decoded(pem))


def _verified(
    csr: x509.CertificateSigningRequest,
) -> tuple[x509.CertificateSigningRequest, PublicKey]:
    # cryptography reads an id-RSASSA-PSS key as a plain RSA key, so a certificate built from it
    # would say rsaEncryption and drop the restriction to PSS signatures its holder asked for
    # (RFC 4055 §1.2). Keeping it would mean copying the CSR's SPKI and its parameters, leaving
    # out keyEncipherment, and PS256 renewal proofs: refused instead, as no client needs it.
    if _key_algorithm(csr.tbs_certrequest_bytes) == _RSASSA_PSS:
        raise InvalidCsr(
            "the CSR's key is an RSA-PSS key (id-RSASSA-PSS), which is not accepted: use an RSA "
            "key (rsaEncryption), EC P-256/P-384 or Ed25519"
        )
    try:
        public_key = csr.public_key()
    except Exception:
        raise InvalidCsr("the CSR public key cannot be read") from None
    key = check_public_key(public_key)
    try:
        verify_signed(key, csr, csr.tbs_certrequest_bytes)
    except RefusedSignatureAlgorithm as refused:
        raise InvalidCsr(
            f"the CSR is signed with {refused.name}, which is not accepted: sign it with "
            "SHA-256, SHA-384 or SHA-512 (or an Ed25519 key)"
        ) from None
    except Exception:  # unsupported signature algorithms raise from deep inside cryptography
        raise InvalidCsr(
            "the CSR signature does not verify: it was not signed by its own key"
        ) from None
    return csr, key


# An X509-SVID's RSA key is one of Trellis's RSA key types, not any size ``check_public_key``
# accepts: ``svid renew`` and the agent renew into a fresh key of the SVID's KeyType, so an SVID
# for a 3000-bit key could be issued and never renewed. SPIRE's agents likewise rotate within a
# closed set of key types; keys outside it come only from minting, which is not renewed.
_SVID_RSA_BITS = tuple(int(k.value.removeprefix("rsa-")) for k in KeyType if k.is_rsa)


def parse_csr(pem: bytes) -> ParsedCsr:
    """A CSR for an X509-SVID (``svid_csr``) from its PEM."""
    return svid_csr(decode_csr(pem))


def svid_csr(decoded: DecodedCsr) -> ParsedCsr:
    """A CSR for an X509-SVID: its signature proves possession of an acceptable key
    (``load_verified_csr``), an RSA key is of a KeyType size, and it asks for only a URI SAN
    (at most one) and DNS names."""
    csr, key = _verified(decoded.request)
    if isinstance(key, rsa.RSAPublicKey) and key.key_size not in _SVID_RSA_BITS:
        *first, last = (str(bits) for bits in _SVID_RSA_BITS)
        raise InvalidCsr(
            f"RSA key of {key.key_size} bits is not accepted for an X509-SVID: use "
            f"{', '.join(first)} or {last} bits, the sizes it can be renewed with"
        )
    spiffe_id: SpiffeId | None = None
    dns: tuple[str, ...] = ()
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    except _UNREADABLE:
        raise InvalidCsr("the CSR extensions cannot be parsed") from None
    if san is not None:
        for general_name in san:
            if not isinstance(general_name, x509.UniformResourceIdentifier | x509.DNSName):
                raise PolicyViolation("only URI and DNS names may be requested in a CSR")
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) > 1:
            raise PolicyViolation(
                "an X509-SVID carries exactly one URI SAN; the CSR asks for several"
            )
        if uris:
            spiffe_id = SpiffeId.parse(uris[0])
        dns = tuple(check_dns_name(name) for name in san.get_values_for_type(x509.DNSName))
    return ParsedCsr(key, spiffe_id, dns, decoded.sha256)
