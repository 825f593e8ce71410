"""The self-check every signed leaf passes before it is recorded or returned (``ca.checks``):
an X509-SVID-shaped leaf passes; each way of breaking the profile is refused as an internal
error, never returned to the caller."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from ca.authority import Issuer, active_issuer
from ca.checks import check_leaf
from ca.config import Context
from ca.errors import InternalError
from ca.identity import SpiffeId
from ca.profiles import ca_subject

WEB = SpiffeId.parse("spiffe://example.org/web")


def _leaf(
    issuer: Issuer,
    *,
    ca: bool = False,
    usage_critical: bool = True,
    key_cert_sign: bool = False,
    eku: tuple[x509.ObjectIdentifier, ...] = (
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ),
    uris: tuple[str, ...] = (str(WEB),),
    san_critical: bool = True,
    lifetime: dt.timedelta = dt.timedelta(hours=1),
    signing_key: ec.EllipticCurvePrivateKey | None = None,
    issuer_name: x509.Name | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer.certificate.subject if issuer_name is None else issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(seconds=30))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, key_cert_sign, False, False, False),
            critical=usage_critical,
        )
        .add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=san_critical,
        )
    )
    signer = signing_key or issuer.signer.private_key  # type: ignore[attr-defined]
    return builder.sign(signer, hashes.SHA256())


def test_an_svid_shaped_leaf_passes(ctx: Context) -> None:
    issuer = active_issuer(ctx)
    check_leaf(_leaf(issuer), issuer.certificate, WEB)


@pytest.mark.parametrize(
    ("defect", "options"),
    [
        ("a CA", {"ca": True}),
        ("keyUsage not critical", {"usage_critical": False}),
        ("keyCertSign", {"key_cert_sign": True}),
        ("no clientAuth", {"eku": (ExtendedKeyUsageOID.SERVER_AUTH,)}),
        ("two URI SANs", {"uris": (str(WEB), "spiffe://example.org/db")}),
        ("another ID", {"uris": ("spiffe://example.org/db",)}),
        ("non-critical SAN, empty subject", {"san_critical": False}),
        ("outlives its issuer", {"lifetime": dt.timedelta(days=3650)}),
        ("signed by another key", {"signing_key": ec.generate_private_key(ec.SECP256R1())}),
        ("another issuer's name", {"issuer_name": ca_subject("Trellis", "another CA")}),
    ],
)
def test_a_leaf_that_breaks_the_profile_is_refused(
    ctx: Context, defect: str, options: dict[str, object]
) -> None:
    issuer = active_issuer(ctx)
    with pytest.raises(InternalError, match="self-check failed"):
        check_leaf(_leaf(issuer, **options), issuer.certificate, WEB)  # type: ignore[arg-type]


def test_a_leaf_without_a_required_extension_is_refused(ctx: Context) -> None:
    issuer = active_issuer(ctx)
    now = dt.datetime.now(dt.UTC)
    bare = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer.certificate.subject)
        .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(WEB))]), critical=True
        )
        .sign(issuer.signer.private_key, hashes.SHA256())  # type: ignore[attr-defined]
    )
    with pytest.raises(InternalError, match="lacks"):
        check_leaf(bare, issuer.certificate, WEB)
