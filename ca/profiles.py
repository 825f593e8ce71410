"""Certificate profiles: which fields and extensions each kind of certificate carries.

A profile turns already-authorised inputs into an unsigned ``CertificateBuilder``. Nothing a
requester sends reaches a profile except the public key: identity, lifetime and extensions are
decided by the caller (policy) and here. The rules cited are from RFC 5280 and the SPIFFE
X509-SVID standard.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from ca.identity import SpiffeId
from ca.keys import PublicKey, Signer
from ca.serial import Serial

__all__ = [
    "BACKDATE",
    "CaSpec",
    "LeafSpec",
    "ResponderSpec",
    "RevocationUrls",
    "ca_builder",
    "ca_common_name",
    "fitted_name",
    "key_usage",
    "leaf_builder",
    "ocsp_responder_builder",
    "sign",
    "with_revocation_urls",
]

# Clock skew between Trellis and the relying party must not make a fresh certificate "not yet
# valid"; SPIRE backdates by 10 s, we allow a little more for VMs with lazy NTP.
BACKDATE = dt.timedelta(seconds=30)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_EMPTY_NAME = x509.Name([])


@dataclass(frozen=True, slots=True)
class RevocationUrls:
    """Where relying parties find revocation data for certificates of one issuer (RFC 5280
    §4.2.1.13 CRL Distribution Points, §4.2.2.1 Authority Information Access)."""

    crl: str
    ocsp: str
    ca_issuers: str

    @classmethod
    def under(cls, public_url: str, authority: str, issuer_serial: int) -> RevocationUrls:
        base, serial = public_url.rstrip("/"), format(issuer_serial, "x")
        return cls(
            crl=f"{base}/v1/crl/{authority}/{serial}.crl",
            ocsp=f"{base}/v1/ocsp",
            ca_issuers=f"{base}/v1/ca/{authority}/{serial}.crt",
        )


def with_revocation_urls(
    builder: x509.CertificateBuilder, urls: RevocationUrls | None
) -> x509.CertificateBuilder:
    if urls is None:
        return builder
    point = x509.DistributionPoint(
        full_name=[x509.UniformResourceIdentifier(urls.crl)],
        relative_name=None,
        reasons=None,
        crl_issuer=None,
    )
    access = [
        x509.AccessDescription(
            AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(urls.ocsp)
        ),
        x509.AccessDescription(
            AuthorityInformationAccessOID.CA_ISSUERS,
            x509.UniformResourceIdentifier(urls.ca_issuers),
        ),
    ]
    return builder.add_extension(x509.CRLDistributionPoints([point]), critical=False).add_extension(
        x509.AuthorityInformationAccess(access), critical=False
    )


@dataclass(frozen=True, slots=True)
class CaSpec:
    """A root (``issuer is None``, self-signed) or an intermediate."""

    subject: x509.Name
    public_key: PublicKey
    # The trust domain ID (X509-SVID §4.1: signing certs carry an empty path); None for CAs of
    # authorities that issue no SVIDs.
    spiffe_id: SpiffeId | None
    serial: Serial
    not_before: dt.datetime
    not_after: dt.datetime
    path_length: int | None
    issuer: x509.Certificate | None = None
    urls: RevocationUrls | None = None  # only for intermediates: a root has no issuer to ask
    # Istio's plug-in CA profile asks for digitalSignature too (istiod signs with this key).
    digital_signature: bool = False


@dataclass(frozen=True, slots=True)
class LeafSpec:
    """An X509-SVID leaf: one SPIFFE ID, optional DNS names and IP addresses."""

    public_key: PublicKey
    spiffe_id: SpiffeId
    serial: Serial
    not_before: dt.datetime
    not_after: dt.datetime
    issuer: x509.Certificate
    dns_names: Sequence[str] = ()
    ip_addresses: Sequence[IpAddress] = ()
    subject: x509.Name = _EMPTY_NAME
    urls: RevocationUrls | None = None


def key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_agreement: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    """The KeyUsage bits Trellis profiles use; everything else is always off."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _ski(public_key: PublicKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(public_key)


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


UB_NAME = 64  # ub-common-name, ub-organization-name, ub-organizational-unit-name: RFC 5280 App. A


def fitted_name(head: str, tail: str = "") -> str:
    """``head + tail`` within the 64 characters X.520 allows the name attributes Trellis sets,
    ``head`` cut where it must be: a trust domain may be 255 bytes and a cluster name 63
    characters, and cryptography refuses a longer value, which failed ``init`` for any trust
    domain of 52 characters or more. The names are for people; the SPIFFE ID stays whole in
    the URI SAN."""
    return head[: UB_NAME - len(tail)].rstrip() + tail


def ca_common_name(label: str, role: str) -> str:
    """A CA's common name: its trust domain (or authority name) and its role."""
    return fitted_name(label, f" {role}")


def istio_subject(trust_domain: str, cluster: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Trellis"),
            x509.NameAttribute(
                NameOID.ORGANIZATIONAL_UNIT_NAME, fitted_name(f"istio {trust_domain}")
            ),
            # A cluster name is a DNS label of up to 63 characters: alone when the prefix would
            # not fit, never cut, so that two clusters' intermediates never share a subject.
            x509.NameAttribute(
                NameOID.COMMON_NAME,
                f"istio-{cluster}" if len(cluster) <= UB_NAME - len("istio-") else cluster,
            ),
        ]
    )


def _canonical(value: str) -> str:
    """``value`` as OpenSSL compares it when it matches an issuer name to a CA's subject
    (``X509_NAME_cmp``'s canonical form: ASCII lower-cased, whitespace trimmed and each run of
    it one space), or a superset of it: ``str.lower`` and ``str.split`` also fold what OpenSSL
    leaves alone, so every name OpenSSL takes for an Istio intermediate's is taken for one
    here."""
    return " ".join(value.split()).lower()


def is_istio_subject(name: x509.Name) -> bool:
    """Whether ``name`` is the subject of an Istio plug-in intermediate Trellis issued (the
    shape ``istio_subject`` gives: O=Trellis, OU=istio <td>, CN=istio-<cluster> or <cluster>,
    alike since the first ``istio issue``; the OU alone tells it, as no other CA Trellis signs
    under a root has an OU). Read as OpenSSL reads a certificate's issuer when it builds the
    chain, so an issuer spelled ``o=TRELLIS, ou=ISTIO  example.org`` is one too.

    istiod may sign any SPIFFE ID of the trust domain (name constraints cannot limit a URI's
    path), ``spiffe://<td>/trellis/server`` included: ``ca.serverconn`` refuses a server whose
    certificate such a CA issued. A verified peer's issuer is its issuing CA's subject, and only
    Trellis chooses the subjects of the CAs under its roots. Here, not in ``ca.istio``: every
    SVID command and agent checks it, and ``ca.istio`` costs ~45 ms to import."""
    organisations = name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    units = name.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return any(_canonical(str(o.value)) == "trellis" for o in organisations) and any(
        _canonical(str(u.value)).startswith("istio ") for u in units
    )


def ca_subject(organisation: str, common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def ca_builder(spec: CaSpec) -> x509.CertificateBuilder:
    issuer_name = spec.subject if spec.issuer is None else spec.issuer.subject
    aki = (
        x509.AuthorityKeyIdentifier.from_issuer_public_key(spec.public_key)
        if spec.issuer is None
        else _aki(spec.issuer)
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(spec.subject)
        .issuer_name(issuer_name)
        .public_key(spec.public_key)
        .serial_number(spec.serial.value)
        .not_valid_before(spec.not_before)
        .not_valid_after(spec.not_after)
        # RFC 5280 §4.2.1.9: critical in CA certificates.
        .add_extension(x509.BasicConstraints(ca=True, path_length=spec.path_length), critical=True)
        # X509-SVID §4.3: signing certificates assert keyCertSign; cRLSign lets them sign CRLs.
        .add_extension(
            key_usage(digital_signature=spec.digital_signature, key_cert_sign=True, crl_sign=True),
            critical=True,
        )
        .add_extension(_ski(spec.public_key), critical=False)
        .add_extension(aki, critical=False)
        # No EKU on CA certificates: Go's verifier (istiod, Envoy's control plane) treats an EKU on
        # a CA as a constraint on everything below it.
    )
    if spec.spiffe_id is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spec.spiffe_id))]),
            critical=False,
        )
    return with_revocation_urls(builder, spec.urls)


def leaf_builder(spec: LeafSpec) -> x509.CertificateBuilder:
    is_rsa = isinstance(spec.public_key, rsa.RSAPublicKey)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spec.spiffe_id))]
    names += [x509.DNSName(name) for name in spec.dns_names]
    names += [x509.IPAddress(address) for address in spec.ip_addresses]
    builder = (
        x509.CertificateBuilder()
        .subject_name(spec.subject)
        .issuer_name(spec.issuer.subject)
        .public_key(spec.public_key)
        .serial_number(spec.serial.value)
        .not_valid_before(spec.not_before)
        .not_valid_after(spec.not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # X509-SVID §4.3: critical, digitalSignature, never keyCertSign/cRLSign. keyEncipherment
        # only where the key can do it (RSA key transport).
        .add_extension(
            key_usage(digital_signature=True, key_encipherment=is_rsa),
            critical=True,
        )
        # X509-SVID §4.4: if EKU is present it must allow both TLS roles.
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(_ski(spec.public_key), critical=False)
        .add_extension(_aki(spec.issuer), critical=False)
        # X509-SVID §4.1 / RFC 5280 §4.2.1.6: with an empty subject the SAN must be critical.
        .add_extension(x509.SubjectAlternativeName(names), critical=len(spec.subject) == 0)
    )
    return with_revocation_urls(builder, spec.urls)


def sign(builder: x509.CertificateBuilder, signer: Signer) -> x509.Certificate:
    return builder.sign(signer.private_key, signer.hash_algorithm)


@dataclass(frozen=True, slots=True)
class ResponderSpec:
    """A delegated OCSP responder certificate (RFC 6960 §4.2.2.2)."""

    public_key: PublicKey
    common_name: str
    serial: Serial
    not_before: dt.datetime
    not_after: dt.datetime
    issuer: x509.Certificate


def ocsp_responder_builder(spec: ResponderSpec) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(ca_subject("Trellis", spec.common_name))
        .issuer_name(spec.issuer.subject)
        .public_key(spec.public_key)
        .serial_number(spec.serial.value)
        .not_valid_before(spec.not_before)
        .not_valid_after(spec.not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            key_usage(digital_signature=True),
            critical=True,
        )
        # RFC 6960 §4.2.2.2: the delegation is the id-kp-OCSPSigning EKU.
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
        # §4.2.2.2.1: clients need not check the responder's own revocation; it lives briefly.
        .add_extension(x509.OCSPNoCheck(), critical=False)
        .add_extension(_ski(spec.public_key), critical=False)
        .add_extension(_aki(spec.issuer), critical=False)
    )
