"""Renewal proofs: "I hold the key of this live SVID" without a TLS client certificate.

The client signs a short JWT with its current SVID key. The proof names the certificate (``sub``:
serial), is bound to the new CSR (``csr``: base64url SHA-256 of its DER) so it cannot be replayed
for another key, lives at most five minutes, and carries a ``jti`` that the server records in the
issuing transaction, so a captured proof cannot be used twice.
"""

from __future__ import annotations

import base64
import datetime as dt
import secrets
from dataclasses import dataclass

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ca.errors import AuthenticationFailed
from ca.keys import PrivateKey, PublicKey
from ca.serial import Serial

__all__ = [
    "AUDIENCE",
    "MAX_PROOF_LIFETIME",
    "PROOF_TYPE",
    "RenewalClaims",
    "make_proof",
    "read_proof",
]

AUDIENCE = "trellis:svid-renew"
PROOF_TYPE = "trellis-renew+jwt"  # the JWS header's typ
MAX_PROOF_LIFETIME = dt.timedelta(minutes=5)
CLOCK_SKEW = dt.timedelta(seconds=60)


def _algorithm(key: PrivateKey | PublicKey) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return "ES384" if key.curve.name == "secp384r1" else "ES256"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "EdDSA"
    raise AuthenticationFailed("unsupported key type for a renewal proof")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_proof(cert: x509.Certificate, key: PrivateKey, csr_sha256: bytes, now: dt.datetime) -> str:
    claims = {
        "aud": AUDIENCE,
        "sub": format(cert.serial_number, "x"),
        "iat": int(now.timestamp()),
        "exp": int((now + MAX_PROOF_LIFETIME).timestamp()),
        "jti": secrets.token_urlsafe(24),
        "csr": _b64(csr_sha256),
    }
    return jwt.encode(claims, key, algorithm=_algorithm(key), headers={"typ": PROOF_TYPE})


@dataclass(frozen=True, slots=True)
class RenewalClaims:
    serial: Serial
    jti: str
    expires_at: dt.datetime


def unverified_serial(proof: str) -> Serial:
    """Which certificate's key to verify with; nothing else is trusted before verification."""
    try:
        claims = jwt.decode(proof, options={"verify_signature": False})
        return Serial.parse(str(claims["sub"]))
    except Exception:
        raise AuthenticationFailed("the renewal proof is malformed") from None


def read_proof(
    proof: str, cert: x509.Certificate, csr_sha256: bytes | None, now: dt.datetime
) -> RenewalClaims:
    """The proof's claims, once it verifies with ``cert``'s key, is live and was made for the
    CSR whose DER has ``csr_sha256``. None: the request holds no CSR to bind (its PEM does not
    decode); the caller refuses that once the proof and its certificate are otherwise judged,
    so that only the holder of a live SVID's key learns that its CSR is bad."""
    public_key = cert.public_key()
    try:
        # One parse for the header and the claims (``get_unverified_header`` parsed it again,
        # ~30 µs a renewal).
        decoded = jwt.decode_complete(
            proof,
            public_key,  # type: ignore[arg-type]
            algorithms=[_algorithm(public_key)],  # type: ignore[arg-type]
            audience=AUDIENCE,
            # Times are checked below against the injected clock, with a stated skew allowance;
            # jti and sub below too, so that a bad one is named (PyJWT's own checks of their
            # types fail like a bad signature).
            options={
                "require": ["aud", "sub", "iat", "exp", "jti", "csr"],
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
                "verify_jti": False,
                "verify_sub": False,
            },
        )
        # Explicit typing (RFC 8725 §3.11): a JWT the workload signed for something else is
        # not a renewal proof, however its claims read.
        kind = str(decoded["header"].get("typ", "")).lower()
        if kind.removeprefix("application/") != PROOF_TYPE:
            raise AuthenticationFailed(f"the renewal proof's typ must be {PROOF_TYPE}")
        claims = decoded["payload"]
    except jwt.MissingRequiredClaimError as missing:
        # Raised only once the signature verified: naming the claim tells no forger anything.
        raise AuthenticationFailed(f"the renewal proof has no {missing.claim!r} claim") from None
    except jwt.InvalidTokenError:
        raise AuthenticationFailed(
            "the renewal proof does not verify with the certificate's key"
        ) from None
    issued, expires = _instant(claims["iat"]), _instant(claims["exp"])
    # Named apart from expiry: a client that writes exp = iat + 1 hour is refused at once, and
    # should be told why rather than look for a clock to blame.
    if expires - issued > MAX_PROOF_LIFETIME:
        most = int(MAX_PROOF_LIFETIME.total_seconds())
        raise AuthenticationFailed(
            f"the renewal proof lives longer than {most} s: exp may be at most {most} s after iat"
        )
    if expires <= now or issued > now + CLOCK_SKEW:
        raise AuthenticationFailed("the renewal proof is expired or not yet valid")
    # nbf is optional, but a proof that carries one is not accepted before it (RFC 7519
    # §4.1.5), with the same skew allowance as iat.
    if "nbf" in claims and _instant(claims["nbf"]) > now + CLOCK_SKEW:
        raise AuthenticationFailed("the renewal proof is expired or not yet valid")
    if csr_sha256 is not None and claims["csr"] != _b64(csr_sha256):
        raise AuthenticationFailed("the renewal proof was made for a different CSR")
    jti, subject = claims["jti"], claims["sub"]
    if not isinstance(jti, str) or not 16 <= len(jti) <= 64:
        raise AuthenticationFailed("the renewal proof has an invalid jti")
    # One spelling, the one every answer and listing uses: the serial was looked up from a
    # lenient parse (``unverified_serial``), but "0A:1B" or "0x0a1b" is no proof's sub.
    if not isinstance(subject, str) or subject != format(cert.serial_number, "x"):
        raise AuthenticationFailed(
            "the renewal proof's sub must be the certificate's serial in lower-case hex, "
            "without leading zeros"
        )
    return RenewalClaims(Serial.parse(subject), jti, expires)


# NumericDate (RFC 7519 §2) bounds a proof can hold: a signed proof with "iat": "abc" or an
# "exp" past year 9999 is refused like an expired one, not failed on.
_EARLIEST, _LATEST = 0, 253_402_300_799  # 1970-01-01, 9999-12-31T23:59:59Z


def _instant(value: object) -> dt.datetime:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not _EARLIEST <= value <= _LATEST  # NaN fails this too
    ):
        raise AuthenticationFailed("the renewal proof is expired or not yet valid")
    return dt.datetime.fromtimestamp(int(value), dt.UTC)
