"""The CSR's proof of possession (``ca.csr.load_verified_csr``) verifies the signature with the
key it read once (``ca.keys.verify_signed``). Its verdict must be cryptography's own
(``is_signature_valid``) for every key type and signature scheme a CSR may use, signed or
tampered with, in the signature or in the signed request."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding

from ca.csr import load_verified_csr
from ca.errors import InvalidCsr
from ca.keys import KeyType, PrivateKey
from tests.ca.svidkit import tamper_signature

WEB = "spiffe://example.org/web"
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)

# (id, key type, hash, RSA padding)
SCHEMES = [
    ("ec-p256-sha256", KeyType.EC_P256, hashes.SHA256(), None),
    ("ec-p256-sha384", KeyType.EC_P256, hashes.SHA384(), None),
    ("ec-p384-sha384", KeyType.EC_P384, hashes.SHA384(), None),
    ("rsa-2048-pkcs1", KeyType.RSA_2048, hashes.SHA256(), None),
    ("rsa-2048-pss", KeyType.RSA_2048, hashes.SHA256(), PSS),
    ("ed25519", KeyType.ED25519, None, None),
]


def _csr(
    key: PrivateKey,
    algorithm: hashes.HashAlgorithm | None,
    rsa_padding: padding.AsymmetricPadding | None,
    common_name: str = "web",
) -> bytes:
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(WEB)]), critical=False
        )
    )
    if isinstance(key, ed25519.Ed25519PrivateKey):
        signed = builder.sign(key, None)
    else:
        signed = builder.sign(key, algorithm, rsa_padding=rsa_padding)
    return signed.public_bytes(serialization.Encoding.PEM)


def _with_other_request(pem: bytes, key: PrivateKey, *scheme: object) -> bytes:
    """The signature of this CSR on another request body of the same length (the common name
    changed by one letter): the DER stays well-formed and only the signature can tell."""
    other = _csr(key, *scheme, common_name="wex")  # type: ignore[arg-type]
    body = x509.load_pem_x509_csr(other).tbs_certrequest_bytes
    der = x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)
    original = x509.load_pem_x509_csr(pem).tbs_certrequest_bytes
    assert len(body) == len(original) and der.count(original) == 1
    swapped = der.replace(original, body)
    return x509.load_der_x509_csr(swapped).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("key_type", "algorithm", "rsa_padding"), [s[1:] for s in SCHEMES], ids=[s[0] for s in SCHEMES]
)
def test_a_signed_csr_is_accepted_and_a_tampered_one_refused(
    key_type: KeyType,
    algorithm: hashes.HashAlgorithm | None,
    rsa_padding: padding.AsymmetricPadding | None,
) -> None:
    key = key_type.generate()
    pem = _csr(key, algorithm, rsa_padding)
    assert x509.load_pem_x509_csr(pem).is_signature_valid
    csr, public_key = load_verified_csr(pem)
    assert public_key == key.public_key()
    assert csr.public_bytes(serialization.Encoding.PEM) == pem

    for tampered in (
        tamper_signature(pem),
        _with_other_request(pem, key, algorithm, rsa_padding),
    ):
        assert not x509.load_pem_x509_csr(tampered).is_signature_valid
        with pytest.raises(InvalidCsr, match="signature does not verify"):
            load_verified_csr(tampered)


def test_a_csr_naming_another_key_is_refused() -> None:
    """A request signed by one key that names another (its SubjectPublicKeyInfo swapped for
    one of the same size): the key it names did not sign it."""
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    der = x509.load_pem_x509_csr(_csr(key, hashes.SHA256(), None)).public_bytes(
        serialization.Encoding.DER
    )
    mine, theirs = (
        k.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        for k in (key, other)
    )
    assert der.count(mine) == 1
    claimed = x509.load_der_x509_csr(der.replace(mine, theirs))
    assert not claimed.is_signature_valid
    with pytest.raises(InvalidCsr, match="signature does not verify"):
        load_verified_csr(claimed.public_bytes(serialization.Encoding.PEM))
