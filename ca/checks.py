"""Self-checks run on every certificate Trellis signs, before it is stored or returned.

Like SPIRE's post-sign validation: a profile bug must surface as a refused issuance, never as a
certificate in the wild that breaks the X509-SVID rules relying parties enforce. The same
signature check serves the workload client (``chains_to``), which takes an SVID and a bundle
from the server only if the one comes from the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.x509.oid import ExtendedKeyUsageOID

from ca.errors import InternalError
from ca.identity import SpiffeId
from ca.keys import verify_signed

__all__ = ["chains_to", "check_ca", "check_leaf", "spiffe_id_of"]


# The most certificates an SVID chain of Trellis has: the leaf, its issuing CA, and the cross
# certificates of a root rotation (one; a few to spare).
MAX_CHAIN = 8


def _fail(what: str) -> InternalError:
    return InternalError(f"self-check failed on a just-signed certificate: {what}")


def uri_sans(cert: x509.Certificate) -> list[str]:
    """Every URI SAN of the certificate; none without the extension."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId | None:
    """The certificate's SPIFFE ID, or None; more than one URI SAN is not an SVID at all."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    return _spiffe_id_in(san)


def _spiffe_id_in(san: x509.SubjectAlternativeName) -> SpiffeId | None:
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        return None
    return SpiffeId.parse(uris[0])


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    """``cert.verify_directly_issued_by(issuer)``: the names, then the signature, with the
    issuer's key (``verify_signed``: 73 against 85 µs for a P-256 leaf)."""
    if cert.issuer != issuer.subject:
        raise _fail("its issuer is not the issuing CA's subject")
    try:
        verify_signed(issuer.public_key(), cert, cert.tbs_certificate_bytes)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise _fail(f"signature does not verify against the issuer ({exc})") from None
    if cert.not_valid_after_utc > issuer.not_valid_after_utc:
        raise _fail("outlives its issuer")


def _signs(ca: x509.Certificate, cert: x509.Certificate) -> bool:
    """Whether ``ca`` is a CA certificate (cA, and keyCertSign if it has a keyUsage) whose
    subject is ``cert``'s issuer and whose key made ``cert``'s signature (``verify_signed``)."""
    try:
        if ca.subject != cert.issuer:
            return False
        found = {type(e.value): e.value for e in ca.extensions}
        basic, usage = found.get(x509.BasicConstraints), found.get(x509.KeyUsage)
        if not (isinstance(basic, x509.BasicConstraints) and basic.ca):
            return False  # RFC 5280 §4.2.1.9: no cA, no certificate signing
        if isinstance(usage, x509.KeyUsage) and not usage.key_cert_sign:
            return False
        verify_signed(ca.public_key(), cert, cert.tbs_certificate_bytes)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False  # ValueError: a name or an extension cryptography cannot parse
    return True


def chains_to(
    chain: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    """The certificate of ``anchors`` that ``chain`` (a leaf, then the CAs sent with it, in any
    order) leads to, through CAs each of which signed the one before (``_signs``); None if
    there is none. It answers "does this SVID come from these roots", for a client that takes
    an SVID and a bundle from a server: cryptography's ``PolicyBuilder`` would, but its Web PKI
    policy forbids Ed25519 keys, which Trellis issues. Validity periods, path lengths and name
    constraints are not looked at. ``chain`` comes from a server, so the search is bounded: a
    chain longer than ``MAX_CHAIN`` leads nowhere, and each CA of it is taken at most once."""
    if not chain or len(chain) > MAX_CHAIN:
        return None
    extras = list(chain[1:])
    tried: set[int] = set()
    pending = [chain[0]]
    while pending:
        cert = pending.pop()
        for anchor in anchors:
            if _signs(anchor, cert):
                return anchor
        for index, ca in enumerate(extras):
            if index not in tried and _signs(ca, cert):
                tried.add(index)
                pending.append(ca)
    return None


def check_leaf(cert: x509.Certificate, issuer: x509.Certificate, spiffe_id: SpiffeId) -> None:
    _issued_by(cert, issuer)
    # Each extension looked up once (get_extension_for_class walks the list on every call).
    ext: dict[type[x509.ExtensionType], x509.Extension[Any]] = {
        type(e.value): e for e in cert.extensions
    }
    missing = {x509.BasicConstraints, x509.KeyUsage, x509.ExtendedKeyUsage} - ext.keys()
    if missing or x509.SubjectAlternativeName not in ext:
        raise _fail("leaf lacks basicConstraints, keyUsage, extendedKeyUsage or a SAN")
    san = ext[x509.SubjectAlternativeName]
    if _spiffe_id_in(san.value) != spiffe_id:
        raise _fail("URI SAN is not exactly the SPIFFE ID")
    basic = ext[x509.BasicConstraints]
    if basic.value.ca or not basic.critical:
        raise _fail("leaf must have critical basicConstraints cA=false")
    usage = ext[x509.KeyUsage]
    if not usage.critical or not usage.value.digital_signature:
        raise _fail("leaf keyUsage must be critical with digitalSignature")
    if usage.value.key_cert_sign or usage.value.crl_sign:
        raise _fail("leaf keyUsage asserts keyCertSign or cRLSign")
    eku = set(ext[x509.ExtendedKeyUsage].value)
    if {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} - eku:
        raise _fail("leaf EKU lacks serverAuth or clientAuth")
    if len(cert.subject) == 0 and not san.critical:
        raise _fail("empty subject with a non-critical SAN")


def check_ca(cert: x509.Certificate, issuer: x509.Certificate, spiffe_id: SpiffeId | None) -> None:
    """``issuer`` is ``cert`` itself for a root."""
    _issued_by(cert, issuer)
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    if not basic.value.ca or not basic.critical:
        raise _fail("CA must have critical basicConstraints cA=true")
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    if not usage.critical or not usage.value.key_cert_sign:
        raise _fail("CA keyUsage must be critical with keyCertSign")
    if spiffe_id is None:
        try:
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            return
        raise _fail("a CA outside the SPIFFE mesh carries no SAN")
    if spiffe_id_of(cert) != spiffe_id or not spiffe_id.is_trust_domain_id:
        raise _fail("CA URI SAN must be the trust domain ID")
