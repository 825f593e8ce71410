"""SPIFFE bundles as JWK Sets (SPIFFE Trust Domain and Bundle §4).

One JWK per CA certificate: ``use: "x509-svid"``, ``x5c`` holding exactly that certificate, the
key parameters of that certificate's public key (go-spiffe rejects a mismatch), no ``kid``;
``spiffe_sequence`` increases whenever the content changes and ``spiffe_refresh_hint`` tells
pollers how often to come back. ``parse_jwks`` is the strict reader federation uses.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ca.errors import InvalidInput
from ca.pem import certs_pem

__all__ = [
    "DEFAULT_REFRESH_HINT",
    "MAX_REFRESH_HINT",
    "MAX_SEQUENCE",
    "JwksBundle",
    "bundle_jwks",
    "checked_certificate",
    "jwk_for",
    "parse_jwks",
]

DEFAULT_REFRESH_HINT = 300
# A day. Federation polls no less often whatever hint a partner announces (ca.federation clamps
# to it), and the hint we publish is held to it: go-spiffe and SPIRE read it as an int64, and a
# peer polling us less than daily would miss a root rotation.
MAX_REFRESH_HINT = 86_400
MAX_BUNDLE_BYTES = 1024 * 1024
# What the store's signed 64-bit INTEGER/BIGINT column holds: a larger spiffe_sequence could be
# neither stored nor compared with the next one.
MAX_SEQUENCE = 2**63 - 1
_CURVES = {"secp256r1": ("P-256", 32), "secp384r1": ("P-384", 48)}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int(value: int) -> str:
    return _b64url(value.to_bytes((value.bit_length() + 7) // 8 or 1, "big"))


def _key_params(key: object) -> dict[str, str]:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _CURVES:
            raise InvalidInput(f"unsupported curve {key.curve.name}")
        crv, size = _CURVES[key.curve.name]
        numbers = key.public_numbers()
        return {
            "kty": "EC",
            "crv": crv,
            "x": _b64url(numbers.x.to_bytes(size, "big")),
            "y": _b64url(numbers.y.to_bytes(size, "big")),
        }
    if isinstance(key, rsa.RSAPublicKey):
        rsa_numbers = key.public_numbers()
        return {"kty": "RSA", "n": _int(rsa_numbers.n), "e": _int(rsa_numbers.e)}
    if isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw)}
    raise InvalidInput(f"unsupported key type {type(key).__name__}")


def jwk_for(cert: x509.Certificate) -> dict[str, Any]:
    der = cert.public_bytes(serialization.Encoding.DER)
    return {
        "use": "x509-svid",
        **_key_params(cert.public_key()),
        "x5c": [base64.b64encode(der).decode()],
    }


def bundle_jwks(certs: list[x509.Certificate], sequence: int, refresh_hint: int) -> dict[str, Any]:
    return {
        "keys": [jwk_for(cert) for cert in certs],
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": refresh_hint,
    }


@dataclass(frozen=True, slots=True)
class JwksBundle:
    """A validated X.509 bundle read from a JWK Set."""

    certificates: tuple[x509.Certificate, ...]
    sequence: int | None
    refresh_hint: int | None

    @property
    def pem(self) -> bytes:
        return certs_pem(self.certificates)


def _fail(reason: str) -> InvalidInput:
    return InvalidInput(f"invalid SPIFFE bundle: {reason}")


def checked_certificate(cert: x509.Certificate, what: str) -> x509.Certificate:
    """``cert`` once its extensions and public key parse. cryptography decodes both lazily, so a
    certificate that loaded can still raise on first use (a SAN that is not a GeneralNames, an
    extension present twice, an unknown key algorithm): that is the sender's malformed input and
    is refused here, where it is read, rather than wherever it would first be looked at."""
    try:
        _ = cert.extensions
        cert.public_key()
    except (
        ValueError,
        x509.DuplicateExtension,
        x509.UnsupportedGeneralNameType,
        UnsupportedAlgorithm,
    ) as exc:
        raise InvalidInput(f"{what}: the certificate is malformed ({exc})") from None
    return cert


# The (kty, crv) of the JWKs Trellis can use (``_key_params``): RSA has no crv.
_KNOWN_KEY_TYPES = frozenset(
    {("RSA", None), ("OKP", "Ed25519"), *(("EC", crv) for crv, _size in _CURVES.values())}
)
# Longer integers are out of every range a bundle's numbers have (2^63-1 has 19 digits); Python
# refuses to read one of over 4,300 digits at all, which was reported as "not JSON".
_INT_DIGITS = 30
_OUT_OF_RANGE = int("1" + "0" * _INT_DIGITS)


def _bounded_int(text: str) -> int:
    """A JSON integer, with one far out of range read as just out of it (its sign kept)."""
    if len(text.lstrip("-")) <= _INT_DIGITS:
        return int(text)
    return -_OUT_OF_RANGE if text.startswith("-") else _OUT_OF_RANGE


def parse_jwks(data: bytes) -> JwksBundle:
    """Strict: every x509-svid key must be one CA certificate whose key matches its JWK."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise _fail("larger than 1 MiB")
    try:
        document = json.loads(data, parse_int=_bounded_int)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError included
        raise _fail("not JSON") from None
    except RecursionError:  # arrays nested deeper than the interpreter's stack
        raise _fail("nested too deeply") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise _fail("no 'keys' array")
    sequence, hint = document.get("spiffe_sequence"), document.get("spiffe_refresh_hint")
    for name, value in (("spiffe_sequence", sequence), ("spiffe_refresh_hint", hint)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 0
        ):
            raise _fail(f"{name} must be a non-negative integer")
    if sequence is not None and sequence > MAX_SEQUENCE:
        raise _fail(f"spiffe_sequence is larger than {MAX_SEQUENCE} (2^63-1)")
    certs: dict[bytes, x509.Certificate] = {}  # by DER: a certificate listed twice is one
    for index, key in enumerate(document["keys"]):
        if not isinstance(key, dict):
            raise _fail(f"key {index} is not an object")
        if key.get("use") != "x509-svid":
            continue  # jwt-svid keys and unknown uses are not ours to judge (bundle spec §4.2)
        if (key.get("kty"), key.get("crv")) not in _KNOWN_KEY_TYPES:
            # Bundle spec §4.1.3 and §4.2.1: a client MUST ignore a JWK of a key type it does
            # not know. Refused, the whole bundle was: a partner adding a root of a newer type
            # (a post-quantum one, secp256k1, Ed448) froze every later update here, its root
            # rotations included. The other keys decide (at least one authority: ca.federation).
            continue
        x5c = key.get("x5c")
        if not isinstance(x5c, list) or len(x5c) != 1 or not isinstance(x5c[0], str):
            raise _fail(f"key {index}: x5c must hold exactly one certificate")
        try:
            cert = x509.load_der_x509_certificate(base64.b64decode(x5c[0], validate=True))
        except ValueError:
            raise _fail(f"key {index}: x5c is not a DER certificate") from None
        checked_certificate(cert, f"invalid SPIFFE bundle: key {index}")
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise _fail(f"key {index}: the certificate is not a CA")
        try:
            expected = _key_params(cert.public_key())
        except InvalidInput:  # a key of a type the JWK does not claim (a DSA certificate)
            expected = {}
        if not expected or any(key.get(name) != value for name, value in expected.items()):
            raise _fail(f"key {index}: the JWK parameters do not match its certificate")
        certs.setdefault(cert.public_bytes(serialization.Encoding.DER), cert)
    return JwksBundle(tuple(certs.values()), sequence, hint)


def decode_param(value: str) -> bytes:
    return _unb64url(value)
