"""The key algorithms Trellis issues with and accepts."""

from __future__ import annotations

import enum

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import SignatureAlgorithmOID

from ca.errors import InvalidCsr, InvalidInput

__all__ = [
    "KeyType",
    "PrivateKey",
    "PublicKey",
    "RefusedSignatureAlgorithm",
    "check_public_key",
    "verify_signed",
]

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

_CURVES: dict[str, type[ec.EllipticCurve]] = {"secp256r1": ec.SECP256R1, "secp384r1": ec.SECP384R1}
MIN_RSA_BITS = 2048


class KeyType(enum.Enum):
    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"
    ED25519 = "ed25519"

    @classmethod
    def parse(cls, text: str) -> KeyType:
        try:
            return cls(text.strip().lower())
        except ValueError:
            names = ", ".join(k.value for k in cls)
            raise InvalidInput(f"unknown key type {text[:32]!r}: choose one of {names}") from None

    @classmethod
    def of(cls, key: PrivateKey | PublicKey) -> KeyType:
        if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
            curves = {"secp256r1": cls.EC_P256, "secp384r1": cls.EC_P384}
            if key.curve.name not in curves:
                raise InvalidInput(f"EC keys on {key.curve.name} are not a Trellis key type")
            return curves[key.curve.name]
        if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
            try:
                return cls(f"rsa-{key.key_size}")
            except ValueError:
                raise InvalidInput(
                    f"RSA keys of {key.key_size} bits are not a Trellis key type"
                ) from None
        if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
            return cls.ED25519
        # Ed448, X25519, DSA ...: not taken for Ed25519 (a renewal then failed as "authentication")
        raise InvalidInput(f"{type(key).__name__.removeprefix('_')} is not a Trellis key type")

    @property
    def is_rsa(self) -> bool:
        return self.value.startswith("rsa-")

    def generate(self) -> PrivateKey:
        if self is KeyType.EC_P256:
            return ec.generate_private_key(ec.SECP256R1())
        if self is KeyType.EC_P384:
            return ec.generate_private_key(ec.SECP384R1())
        if self is KeyType.ED25519:
            return ed25519.Ed25519PrivateKey.generate()
        return rsa.generate_private_key(public_exponent=65537, key_size=int(self.value[4:]))

    def signature_hash(self) -> hashes.SHA256 | hashes.SHA384 | None:
        """The digest a CA key of this type signs with (Ed25519 takes none)."""
        if self is KeyType.ED25519:
            return None
        if self is KeyType.EC_P384:
            return hashes.SHA384()
        return hashes.SHA256()


RSA_EXPONENT = 65537


def check_public_key(key: object) -> PublicKey:
    """Accept the subject keys Trellis certifies: EC P-256/P-384, Ed25519, RSA >= 2048 bits.

    Anything else (DSA, small RSA, other curves, X25519) would weaken every mTLS session it is
    used in, so it is refused before a certificate is ever built.
    """
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _CURVES:
            raise InvalidCsr(f"EC curve {key.curve.name} is not accepted: use P-256 or P-384")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise InvalidCsr(
                f"RSA key of {key.key_size} bits is too small: at least {MIN_RSA_BITS}"
            )
        if key.key_size > 8192:
            raise InvalidCsr(f"RSA key of {key.key_size} bits is larger than 8192")
        # e = 3 and other small exponents are where RSA's padding attacks live; every key
        # generator in use makes 65537 (Let's Encrypt accepts only it, the CA/B Forum
        # recommends 2^16+1 or more).
        if key.public_numbers().e != RSA_EXPONENT:
            raise InvalidCsr(
                f"RSA public exponent {key.public_numbers().e} is not accepted: use 65537"
            )
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    raise InvalidCsr(f"key type {type(key).__name__} is not accepted")


# The digests a signature Trellis verifies may use: SHA-2 of 256 bits and more (RFC 5758 §3.2,
# RFC 4055 §5, RFC 8017). MD5 and SHA-1 signatures can be forged by collision (the 2008 rogue
# MD5 CA, SHAttered, the SHA-1 chosen-prefix collision of 2020); SHA-224 and SHA-3 are refused
# too, as no client Trellis serves makes them and the CA/B Forum allows neither.
_DIGESTS = (hashes.SHA256, hashes.SHA384, hashes.SHA512)


class RefusedSignatureAlgorithm(TypeError):
    """A signature made with an algorithm Trellis does not accept; ``name`` says which."""

    def __init__(self, name: str) -> None:
        super().__init__(f"signature algorithm {name} is not accepted")
        self.name = name


# The names of signature algorithms cryptography verifies but has no name for (its "Unknown
# OID"): the SHA-3 ones, as NIST's registry and RFC 8692/8702 name them, and the OIW SHA-1 one.
_UNNAMED = {
    "1.3.14.3.2.29": "sha1WithRSASignature",
    **{
        f"2.16.840.1.101.3.4.3.{arc + offset}": f"{prefix}-with-sha3-{bits}"
        for arc, prefix in ((9, "id-ecdsa"), (13, "id-rsassa-pkcs1-v1_5"))
        for offset, bits in enumerate((224, 256, 384, 512))
    },
}


def _refused(
    signed: x509.Certificate | x509.CertificateSigningRequest,
    digest: hashes.HashAlgorithm | None = None,
) -> RefusedSignatureAlgorithm:
    """Named as RFC 5280 and openssl name it (sha1WithRSAEncryption, ecdsa-with-SHA1), else as
    ``_UNNAMED`` does, else by its OID; RSASSA-PSS carries its digest in its parameters."""
    oid = signed.signature_algorithm_oid
    name = oid._name
    if name == "Unknown OID":
        name = _UNNAMED.get(oid.dotted_string, oid.dotted_string)
    if oid == SignatureAlgorithmOID.RSASSA_PSS and digest is not None:
        name = f"{name} with {digest.name.upper()}"
    return RefusedSignatureAlgorithm(name)


def _digest(signed: x509.Certificate | x509.CertificateSigningRequest) -> hashes.HashAlgorithm:
    try:
        digest = signed.signature_hash_algorithm
    except UnsupportedAlgorithm:
        raise _refused(signed) from None
    if not isinstance(digest, _DIGESTS):
        raise _refused(signed, digest)
    return digest


def verify_signed(
    key: CertificatePublicKeyTypes,
    signed: x509.Certificate | x509.CertificateSigningRequest,
    data: bytes,
) -> None:
    """That ``key`` made the signature of ``signed`` (a certificate over its TBS, a CSR over
    its CertificationRequestInfo: ``data``), with the algorithm ``signed`` names, which must be
    ECDSA or RSA (PKCS #1 v1.5 or PSS) with SHA-256, SHA-384 or SHA-512, or Ed25519
    (``_DIGESTS``). That is what ``verify_directly_issued_by`` and ``is_signature_valid``
    check, and stricter: they accept SHA-224 and SHA-3. It uses a key object the
    caller holds already instead of one loaded again from a certificate or a CSR on every call
    (~10 µs each: docs/benchmarks.md, changes 53 and 54). Raises ``InvalidSignature``,
    ``RefusedSignatureAlgorithm`` for a digest outside ``_DIGESTS`` or an unknown algorithm,
    or ``TypeError`` when the algorithm does not fit the key."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        _digest(signed)
        parameters = signed.signature_algorithm_parameters
        if not isinstance(parameters, ec.ECDSA):
            raise TypeError("an EC key with a signature that is not ECDSA")
        key.verify(signed.signature, data, parameters)
    elif isinstance(key, rsa.RSAPublicKey):
        digest = _digest(signed)
        parameters = signed.signature_algorithm_parameters
        if not isinstance(parameters, padding.PKCS1v15 | padding.PSS):
            raise TypeError("an RSA key with a signature that is not RSA")
        key.verify(signed.signature, data, parameters, digest)
    elif isinstance(key, ed25519.Ed25519PublicKey):
        if signed.signature_algorithm_oid != SignatureAlgorithmOID.ED25519:
            raise TypeError("an Ed25519 key with a signature that is not Ed25519")
        key.verify(signed.signature, data)
    else:
        raise TypeError(f"a key of type {type(key).__name__}")
