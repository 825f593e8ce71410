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
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca.identity import SpiffeId
from ca.keys import KeyType, PublicKey, Signer
from ca.serial import Serial

__all__ = [
    "BACKDATE",
    "CaSpec",
    "LeafSpec",
    "ca_builder",
    "leaf_builder",
    "sign",
]

# Clock skew between Trellis and the relying party must not make a fresh certificate "not yet
# valid"; SPIRE backdates by 10 s, we allow a little more for VMs with lazy NTP.
BACKDATE = dt.timedelta(seconds=30)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_EMPTY_NAME = x509.Name([])


@dataclass(frozen=True, slots=True)
class CaSpec:
    """A root (``issuer is None``, self-signed) or an intermediate."""

    subject: x509.Name
    public_key: PublicKey
    spiffe_id: SpiffeId  # the trust domain ID: X509-SVID §4.1, signing certs carry an empty path
    serial: Serial
    not_before: dt.datetime
    not_after: dt.datetime
    path_length: int | None
    issuer: x509.Certificate | None = None


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


def _ski(public_key: PublicKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(public_key)


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


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
    return (
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
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(_ski(spec.public_key), critical=False)
        .add_extension(aki, critical=False)
        # No EKU on CA certificates: Go's verifier (istiod, Envoy's control plane) treats an EKU on
        # a CA as a constraint on everything below it.
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spec.spiffe_id))]),
            critical=False,
        )
    )


def leaf_builder(spec: LeafSpec) -> x509.CertificateBuilder:
    key_type = KeyType.of(spec.public_key)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spec.spiffe_id))]
    names += [x509.DNSName(name) for name in spec.dns_names]
    names += [x509.IPAddress(address) for address in spec.ip_addresses]
    return (
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
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=key_type.is_rsa,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
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


def sign(builder: x509.CertificateBuilder, signer: Signer) -> x509.Certificate:
    return builder.sign(signer.private_key, signer.hash_algorithm)
