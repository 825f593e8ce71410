"""What a seal of the audit trail proves, and whose seals count (``ca.audit.verify``).

A seal is a signature over the chain's head by the mesh authority's issuing intermediate. It
counts only if its signer is one of that authority's own intermediates: a CA row of the mesh
authority with role ``intermediate`` (or one an ``init --force`` replaced, named by the
``authority.reinitialised`` record it left in the chain), with the profile Trellis gives them,
chaining to the trust anchors, valid at the seal's time and not revoked by then. Anything else
that chains to the mesh roots is a CA whose key is not the sealer's: an Istio cluster's
intermediate (its key is handed out, ``ca.istio``), a cross-certificate (a root's key), another
authority's CA (gateway, OpenVPN).

Two formats. Seals made before this module (v1) sign the head hash alone: they prove that the
signer's key signed that head, not when, since their ``signed_at`` is a column anyone who can
write the database may change. Seals made now (v2) sign ``seal_message``: the authority, the
sequence number, the head hash and the time, so the time can be held against the signer's
revocation. Which format a seal is in is told by which message its signature verifies over: a
v2 message starts with ``SEAL_V2``, and can never be a head hash, so no signature over one is a
signature over the other.

A signer revoked before a seal's time makes the seal broken: an honest sealer signs with the
active intermediate only. One dated in the second of the revocation is not counted: times are
whole seconds, and a replica's sealer may sign with the intermediate it read as active while
the revocation commits. A seal dated before the revocation counts when the reason says the
key was never out of Trellis's hands (superseded, cessation of operation, ...). For any other
reason (cACompromise, keyCompromise, unspecified) the key is known or feared stolen, and whoever
holds it signs whatever time they like: such a seal, and a v1 seal of any revoked signer (its
time is not signed at all), is not counted. It proves nothing, but is no sign of tampering either
as long as a later seal by another key covers its records, which the sealer's next run after
the revocation makes; when none does, the records up to it rest on a stolen key alone
(``unproven``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from ca.keys import PrivateKey
from ca.revocation import RevocationReason

__all__ = [
    "SEAL_V2",
    "Anchors",
    "SealCa",
    "Signers",
    "check_signature",
    "seal_message",
    "sign",
    "signed_as",
]

SEAL_V2 = b"trellis audit seal v2\n"

# RFC 5280 §5.3.1 reasons that say nothing against the key: a seal its CA signed before the
# revocation is as good as it was. Every other reason, or none recorded, may mean a stolen key.
_KEY_KEPT = frozenset(
    reason.value
    for reason in (
        RevocationReason.SUPERSEDED,
        RevocationReason.CESSATION_OF_OPERATION,
        RevocationReason.AFFILIATION_CHANGED,
        RevocationReason.PRIVILEGE_WITHDRAWN,
    )
)


def seal_message(authority: str, seq: int, head: str, signed_at: dt.datetime) -> bytes:
    """What a v2 seal signs. The time in microseconds, UTC, as both databases store it."""
    at = signed_at.astimezone(dt.UTC).isoformat(timespec="microseconds")
    return SEAL_V2 + f"authority {authority}\nseq {seq}\nhead {head}\nsigned_at {at}\n".encode()


def sign(key: PrivateKey, data: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(data)


def check_signature(cert: x509.Certificate, signature: bytes, data: bytes) -> bool:
    try:
        public = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return False
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, data)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def signed_as(
    cert: x509.Certificate,
    signature: bytes,
    *,
    authority: str,
    seq: int,
    head: str,
    signed_at: dt.datetime,
) -> int | None:
    """The format whose message ``signature`` verifies over (2, else 1), None for neither."""
    if check_signature(cert, signature, seal_message(authority, seq, head, signed_at)):
        return 2
    if check_signature(cert, signature, head.encode()):
        return 1
    return None


@dataclass(frozen=True, slots=True)
class Anchors:
    """The certificates a seal's signer must chain to, and where they came from (said in
    ``verify``'s report: anchors read from the database being checked prove less than a bundle
    kept elsewhere)."""

    certificates: tuple[x509.Certificate, ...]
    source: str


@dataclass(frozen=True, slots=True)
class SealCa:
    """One CA row of the mesh authority, as ``Signers`` needs it."""

    role: str
    certificate: x509.Certificate
    revoked_at: dt.datetime | None = None
    revocation_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Revoked:
    at: dt.datetime
    reason: str  # "unrecorded" when the row holds none
    key_kept: bool  # the reason says nothing against the key (``_KEY_KEPT``)


@dataclass(frozen=True, slots=True)
class _Signer:
    problem: str | None  # why it may never seal, whatever the time
    path: tuple[x509.Certificate, ...]  # up to a trust anchor, the signer first
    revoked: Revoked | None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except (x509.ExtensionNotFound, ValueError):
        return False
    return constraints.ca and usage.key_cert_sign


def _signs_for_itself(cert: x509.Certificate) -> bool:
    """keyUsage digitalSignature: Istio's plug-in CA profile, whose key istiod signs with, and
    no other CA certificate Trellis has ever made (``ca.profiles.CaSpec``)."""
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    except (x509.ExtensionNotFound, ValueError):
        return False


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


class Signers:
    """Whether a seal's signer may seal, each signer judged once (a server seals every 10 s,
    all with a few CAs; ``verify`` may check thousands of seals).

    ``cas``: the mesh authority's CA rows (every role and state); ``former``: the serial
    numbers of intermediates an ``init --force`` replaced, from the records in the chain that
    verified. The rows prove only as much as the database: someone who can write it can record
    any certificate as an intermediate, and plant a root beside it. So the profile is checked as
    well (no Istio intermediate ever passes for one), and ``--bundle`` gives anchors the
    database cannot change."""

    def __init__(self, anchors: Anchors, cas: Iterable[SealCa], former: Iterable[int] = ()) -> None:
        self.anchors = anchors
        cas = list(cas)
        self.intermediates = {_der(ca.certificate): ca for ca in cas if ca.role == "intermediate"}
        self.others = {_der(ca.certificate) for ca in cas if ca.role != "intermediate"}
        pool = [ca.certificate for ca in cas] + list(anchors.certificates)
        self.pool = [cert for cert in pool if _is_ca(cert)]
        self.former = frozenset(former)
        self.signers: dict[bytes, _Signer] = {}

    def problem(self, cert: x509.Certificate, at: dt.datetime) -> str | None:
        """Why ``cert`` cannot have sealed at ``at``, or None."""
        signer = self._signer(cert)
        if signer.problem is not None:
            return signer.problem
        for link in signer.path:
            if not link.not_valid_before_utc <= at <= link.not_valid_after_utc:
                return (
                    f"its signer's certificate {link.subject.rfc4514_string()[:120]} was not "
                    f"valid at the seal's time {at.isoformat()}"
                )
        return None

    def revoked(self, cert: x509.Certificate) -> Revoked | None:
        return self._signer(cert).revoked

    def _signer(self, cert: x509.Certificate) -> _Signer:
        der = _der(cert)
        known = self.signers.get(der)
        if known is None:
            known = self.signers[der] = self._judge(cert, der)
        return known

    def _judge(self, cert: x509.Certificate, der: bytes) -> _Signer:
        name = cert.subject.rfc4514_string()[:120]
        row = self.intermediates.get(der)
        replaced = der not in self.others and cert.serial_number in self.former
        if row is None and not replaced:
            return _Signer(
                f"its signer ({name}) is not an intermediate of the mesh authority recorded in "
                "this database (an Istio cluster's intermediate, a cross-certificate, another "
                "authority's CA and any other key never seal the trail)",
                (),
                None,
            )
        if not _is_ca(cert) or _signs_for_itself(cert):
            return _Signer(
                f"its signer ({name}) does not have the profile of a Trellis intermediate "
                "(cA and keyCertSign, no digitalSignature: an Istio cluster's intermediate has it, "
                "and its key leaves Trellis)",
                (),
                None,
            )
        path = self._path(cert)
        if path is None:
            return _Signer(
                f"its signer ({name}) is not a CA certificate chaining to the trust anchors "
                f"({self.anchors.source})",
                (),
                None,
            )
        revoked = None
        if row is not None and row.revoked_at is not None:
            reason = row.revocation_reason or "unrecorded"
            revoked = Revoked(row.revoked_at, reason, reason in _KEY_KEPT)
        return _Signer(None, tuple(path), revoked)

    def _path(self, cert: x509.Certificate) -> list[x509.Certificate] | None:
        path, current = [cert], cert
        for _ in range(8):
            if any(
                current == anchor or (_is_ca(anchor) and _issued_by(current, anchor))
                for anchor in self.anchors.certificates
            ):
                return path
            parent = next((c for c in self.pool if c != current and _issued_by(current, c)), None)
            if parent is None or parent in path:
                return None
            path.append(parent)
            current = parent
        return None
