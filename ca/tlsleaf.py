"""Plain TLS leaf certificates for authorities outside the SPIFFE mesh (OpenVPN, API gateways).

One purpose per certificate: EKU is exactly serverAuth or exactly clientAuth, so an OpenVPN
client certificate cannot serve as a VPN server (``remote-cert-tls``) and a gateway client
certificate cannot terminate TLS. The identity is the subject CN (what OpenVPN's
``verify-x509-name`` and Kong's mtls-auth match on); no SPIFFE ID is ever included.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlmodel import Session

from ca.authority import Issuer, active_issuer
from ca.config import Context
from ca.durations import Ttl
from ca.errors import InternalError, InvalidInput
from ca.issue import revocation_urls, validity_window
from ca.keys import PublicKey
from ca.pem import certs_pem
from ca.profiles import RevocationUrls, key_usage, sign, with_revocation_urls
from ca.records import record_issued
from ca.serial import Serial

__all__ = ["IssuedCertificate", "TlsLeafRequest", "Usage", "issue_tls_leaf", "tls_leaf_builder"]


class Usage(enum.Enum):
    SERVER = "server"
    CLIENT = "client"

    @property
    def eku(self) -> x509.ObjectIdentifier:
        return (
            ExtendedKeyUsageOID.SERVER_AUTH
            if self is Usage.SERVER
            else ExtendedKeyUsageOID.CLIENT_AUTH
        )


@dataclass(frozen=True, slots=True)
class TlsLeafRequest:
    authority: str
    profile: str  # recorded, e.g. "openvpn-client", "gateway-client"
    common_name: str
    usage: Usage
    public_key: PublicKey
    ttl: Ttl
    requested_by: str
    dns_names: Sequence[str] = ()
    uri_sans: Sequence[str] = ()
    organisation: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= len(self.common_name) <= 64:
            raise InvalidInput("a common name has 1 to 64 characters")

    @property
    def identity(self) -> str:
        return f"CN={self.common_name}"


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    certificate: x509.Certificate
    issuer: Issuer = field(repr=False)

    @property
    def serial(self) -> Serial:
        return Serial(self.certificate.serial_number)

    @property
    def certificate_pem(self) -> bytes:
        return certs_pem([self.certificate])


def _key_usage(public_key: PublicKey, usage: Usage) -> x509.KeyUsage:
    """RSA keys transport keys (keyEncipherment); EC keys in a TLS server agree on them
    (keyAgreement, for static ECDH suites some OpenVPN builds still offer)."""
    return key_usage(
        digital_signature=True,
        key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
        key_agreement=usage is Usage.SERVER and isinstance(public_key, ec.EllipticCurvePublicKey),
    )


def tls_leaf_builder(
    request: TlsLeafRequest,
    serial: Serial,
    issuer: x509.Certificate,
    not_before: dt.datetime,
    not_after: dt.datetime,
    urls: RevocationUrls | None = None,
) -> x509.CertificateBuilder:
    names = [x509.NameAttribute(NameOID.COMMON_NAME, request.common_name)]
    if request.organisation:
        names.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, request.organisation))
    issuer_ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(names))
        .issuer_name(issuer.subject)
        .public_key(request.public_key)
        .serial_number(serial.value)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(request.public_key, request.usage), critical=True)
        .add_extension(x509.ExtendedKeyUsage([request.usage.eku]), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(request.public_key), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
            critical=False,
        )
    )
    if urls is not None:
        builder = with_revocation_urls(builder, urls)
    general: list[x509.GeneralName] = [x509.DNSName(name) for name in request.dns_names]
    general += [x509.UniformResourceIdentifier(uri) for uri in request.uri_sans]
    if general:
        builder = builder.add_extension(x509.SubjectAlternativeName(general), critical=False)
    return builder


def _self_check(cert: x509.Certificate, issuer: x509.Certificate, usage: Usage) -> None:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise InternalError(f"self-check failed: signature ({exc})") from None
    eku = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    if eku != [usage.eku] or basic.ca or cert.not_valid_after_utc > issuer.not_valid_after_utc:
        raise InternalError("self-check failed: the TLS leaf profile was not applied")


def issue_tls_leaf(ctx: Context, request: TlsLeafRequest) -> IssuedCertificate:
    """template → sign → self-check → record, like SVID issuance (``ca.issue``)."""
    issuer = active_issuer(ctx, request.authority)
    if issuer.trust_domain is not None:
        raise InvalidInput(
            f"authority {request.authority!r} is a SPIFFE authority: it issues SVIDs only"
        )
    now = ctx.clock.now()
    not_before, not_after = validity_window(now, request.ttl, issuer.certificate)
    builder = tls_leaf_builder(
        request,
        Serial.generate(),
        issuer.certificate,
        not_before,
        not_after,
        revocation_urls(ctx, issuer),
    )
    cert = sign(builder, issuer.signer)
    _self_check(cert, issuer.certificate, request.usage)
    with Session(ctx.engine) as session:
        record_issued(
            session,
            cert,
            authority=request.authority,
            issuer_ca_id=issuer.ca_id,
            profile=request.profile,
            identity=request.identity,
            requested_by=request.requested_by,
            now=now,
        )
        session.commit()
    return IssuedCertificate(cert, issuer)  # counted by its caller (ca.issue.counted)
