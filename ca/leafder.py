"""The X509-SVID leaf of ``ca.profiles.leaf_builder``, signed from a DER template of its issuer.

cryptography's ``CertificateBuilder`` turns every field and extension, as Python objects, into
DER on each call, and ``sign`` then parses what it made: ~100 µs of CPU a certificate here, of
which the ECDSA signature itself is ~22 µs (docs/benchmarks.md, change 53). Of an SVID's
fields, all but six are the same for every leaf one issuer signs for one kind of key: the
version, the signature algorithm, the issuer's name, basicConstraints, keyUsage, EKU, the
authority key identifier and the revocation URLs. Those are taken, encoded, from a prototype
that ``leaf_builder`` itself builds once per issuer; only the serial, the validity, the
subject, the public key, its key identifier and the SAN are encoded per certificate, and the
TBS is signed as it is. The profile stays in one place (``leaf_builder``): a template is
nothing but its output cut apart, and tests/ca/test_leafder.py checks, for every CA and subject
key type, that both paths encode the same TBS byte for byte.

What the template cannot render (an Ed25519 CA key, a name that is not ASCII) goes through
``leaf_builder`` as before. The certificate is self-checked afterwards either way
(``ca.checks.check_leaf``: its signature verified, its extensions read back).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import threading
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ca.der import contents, elements, public_key_bits, tlv
from ca.keys import KeyType, PublicKey, Signer
from ca.profiles import LeafSpec, RevocationUrls, leaf_builder, sign

__all__ = ["signed_leaf"]

_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
_SKI_OID = bytes.fromhex("0603551d0e")  # id-ce-subjectKeyIdentifier, encoded
_SAN_OID = bytes.fromhex("0603551d11")  # id-ce-subjectAltName, encoded
_CRITICAL = bytes.fromhex("0101ff")  # BOOLEAN TRUE; FALSE is the default, never encoded
_EMPTY_NAME = bytes.fromhex("3000")
_PKCS1 = padding.PKCS1v15()
_VERSION = bytes.fromhex("a003020102")  # [0] EXPLICIT INTEGER 2: v3

# The signature AlgorithmIdentifier of each CA key type that signs with a hash (RFC 5758
# §3.2: ECDSA, no parameters; RFC 4055 §5: RSA PKCS #1 v1.5, NULL parameters).
_ALGORITHMS = {
    KeyType.EC_P256: bytes.fromhex("300a06082a8648ce3d040302"),
    KeyType.EC_P384: bytes.fromhex("300a06082a8648ce3d040303"),
    KeyType.RSA_2048: bytes.fromhex("300d06092a864886f70d01010b0500"),
    KeyType.RSA_3072: bytes.fromhex("300d06092a864886f70d01010b0500"),
    KeyType.RSA_4096: bytes.fromhex("300d06092a864886f70d01010b0500"),
}


def _time(moment: dt.datetime) -> bytes:
    """RFC 5280 §4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050; whole seconds."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC)
    if 1950 <= moment.year < 2050:
        tag, year = 0x17, b"%02d" % (moment.year % 100)
    else:
        tag, year = 0x18, b"%04d" % moment.year
    clock = (moment.month, moment.day, moment.hour, moment.minute, moment.second)
    return tlv(tag, year + b"%02d%02d%02d%02d%02dZ" % clock)  # a third of strftime's time


def _integer(value: int) -> bytes:
    """A non-negative INTEGER, in the fewest octets that keep its sign bit clear."""
    return tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


@dataclass(frozen=True, slots=True)
class _Template:
    """An issuer's leaf, encoded, with gaps for the fields that differ per certificate."""

    middle: bytes  # the signature algorithm and the issuer's name
    algorithm: bytes  # the signature AlgorithmIdentifier, again outside the TBS
    before_ski: bytes  # basicConstraints, keyUsage, EKU
    between: bytes  # the authority key identifier
    after_san: bytes  # CRL distribution point and AIA, if any
    digest: hashes.HashAlgorithm  # what the CA key signs with, made once: not per signature
    ecdsa: ec.ECDSA

    def render(self, spec: LeafSpec, spki: bytes) -> bytes | None:
        """The TBSCertificate, or None when a name is not ASCII (``leaf_builder`` then says
        what is wrong with it)."""
        try:
            names = [tlv(0x86, str(spec.spiffe_id).encode("ascii"))]
            names += [tlv(0x82, name.encode("ascii")) for name in spec.dns_names]
        except UnicodeEncodeError:
            return None
        names += [tlv(0x87, address.packed) for address in spec.ip_addresses]
        subject = _EMPTY_NAME if len(spec.subject) == 0 else spec.subject.public_bytes()
        # RFC 5280 §4.2.1.2, method 1: an identifier, not a security function
        key_id = hashlib.sha1(public_key_bits(spki), usedforsecurity=False).digest()
        ski = tlv(0x30, _SKI_OID + tlv(0x04, tlv(0x04, key_id)))
        critical = _CRITICAL if subject == _EMPTY_NAME else b""
        san = tlv(0x30, _SAN_OID + critical + tlv(0x04, tlv(0x30, b"".join(names))))
        extensions = self.before_ski + ski + self.between + san + self.after_san
        return tlv(
            0x30,
            _VERSION
            + _integer(spec.serial.value)
            + self.middle
            + tlv(0x30, _time(spec.not_before) + _time(spec.not_after))
            + subject
            + spki
            + tlv(0xA3, tlv(0x30, extensions)),
        )


_TemplateKey = tuple[x509.Certificate, RevocationUrls | None, bool, KeyType]
_templates: dict[_TemplateKey, _Template | None] = {}
_templates_lock = threading.Lock()
_MAX_TEMPLATES = 64  # issuers in use at once are a handful; past this the cache starts again


def _template(spec: LeafSpec, key_type: KeyType) -> _Template | None:
    is_rsa = isinstance(spec.public_key, rsa.RSAPublicKey)
    key = (spec.issuer, spec.urls, is_rsa, key_type)
    try:
        return _templates[key]
    except KeyError:
        pass
    made = _made(spec, key_type)
    with _templates_lock:
        if len(_templates) >= _MAX_TEMPLATES:
            _templates.clear()
        _templates[key] = made
    return made


@functools.cache
def _prototype_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _made(spec: LeafSpec, key_type: KeyType) -> _Template | None:
    """Cut apart a leaf that ``leaf_builder`` made for this issuer and this kind of key.
    The prototype is signed by a throwaway key: only its TBS, not its signature, is used."""
    algorithm, digest = _ALGORITHMS.get(key_type), key_type.signature_hash()
    if algorithm is None or digest is None:
        return None
    prototype = leaf_builder(spec).sign(_prototype_key(), hashes.SHA256())
    fields = elements(contents(prototype.tbs_certificate_bytes))
    if len(fields) != 8 or fields[0] != _VERSION:
        return None
    issuer_name, extensions = fields[3], elements(contents(contents(fields[7])))
    oids = [elements(contents(extension))[0] for extension in extensions]
    if oids.count(_SKI_OID) != 1 or oids.count(_SAN_OID) != 1:
        return None
    ski, san = oids.index(_SKI_OID), oids.index(_SAN_OID)
    if ski > san:
        return None
    return _Template(
        middle=algorithm + issuer_name,
        algorithm=algorithm,
        before_ski=b"".join(extensions[:ski]),
        between=b"".join(extensions[ski + 1 : san]),
        after_san=b"".join(extensions[san + 1 :]),
        digest=digest,
        ecdsa=ec.ECDSA(digest),
    )


def signed_leaf(spec: LeafSpec, signer: Signer) -> x509.Certificate:
    """``sign(leaf_builder(spec), signer)``, the same certificate, made from the issuer's
    template where there is one."""
    template = _template(spec, signer.handle.key_type)
    tbs = None if template is None else template.render(spec, _spki(spec.public_key))
    if tbs is None or template is None:
        return sign(leaf_builder(spec), signer)
    key = signer.private_key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        signature = key.sign(tbs, template.ecdsa)
    elif isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(tbs, _PKCS1, template.digest)
    else:
        return sign(leaf_builder(spec), signer)
    signed = tlv(0x30, tbs + template.algorithm + tlv(0x03, b"\x00" + signature))
    return x509.load_der_x509_certificate(signed)


def _spki(public_key: PublicKey) -> bytes:
    return public_key.public_bytes(*_SPKI)
