"""The CSR's proof of possession (``ca.csr.load_verified_csr``) verifies the signature with the
key it read once (``ca.keys.verify_signed``). Its verdict must be cryptography's own
(``is_signature_valid``) for every key type and signature scheme a CSR may use, signed or
tampered with, in the signature or in the signed request; and it refuses, naming the algorithm,
every digest but SHA-256, SHA-384 and SHA-512 (MD5 and SHA-1 signatures can be forged)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding

from ca.csr import load_verified_csr
from ca.errors import InvalidCsr
from ca.keys import KeyType, PrivateKey
from tests.ca.svidkit import openssl_rsa_pss_csr, tamper_signature

WEB = "spiffe://example.org/web"
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)

# (id, key type, hash, RSA padding)
SCHEMES = [
    ("ec-p256-sha256", KeyType.EC_P256, hashes.SHA256(), None),
    ("ec-p256-sha384", KeyType.EC_P256, hashes.SHA384(), None),
    ("ec-p384-sha384", KeyType.EC_P384, hashes.SHA384(), None),
    ("rsa-2048-pkcs1", KeyType.RSA_2048, hashes.SHA256(), None),
    ("rsa-2048-pss", KeyType.RSA_2048, hashes.SHA256(), PSS),
    ("rsa-2048-sha512", KeyType.RSA_2048, hashes.SHA512(), None),
    ("ec-p384-sha512", KeyType.EC_P384, hashes.SHA512(), None),
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


# (id, key type, openssl digest option, the algorithm the refusal names). openssl signs with
# MD5 and SHA-1, which cryptography refuses to; SHA-224 and SHA-3 it verifies but Trellis refuses.
WEAK = [
    ("rsa/sha1", KeyType.RSA_2048, "-sha1", "sha1WithRSAEncryption"),
    ("rsa/md5", KeyType.RSA_2048, "-md5", "md5WithRSAEncryption"),
    ("rsa/sha224", KeyType.RSA_2048, "-sha224", "sha224WithRSAEncryption"),
    # Regression: the SHA-3 ones were named by their OID (2.16.840.1.101.3.4.3.14).
    ("rsa/sha3-256", KeyType.RSA_2048, "-sha3-256", "id-rsassa-pkcs1-v1_5-with-sha3-256"),
    ("rsa/sha3-512", KeyType.RSA_2048, "-sha3-512", "id-rsassa-pkcs1-v1_5-with-sha3-512"),
    (
        "rsa-pss/sha1",
        KeyType.RSA_2048,
        "-sha1 -sigopt rsa_padding_mode:pss",
        "rsassaPss with SHA1",
    ),
    ("ec/sha1", KeyType.EC_P256, "-sha1", "ecdsa-with-SHA1"),
    ("ec/sha224", KeyType.EC_P256, "-sha224", "ecdsa-with-SHA224"),
    ("ec/sha3-256", KeyType.EC_P256, "-sha3-256", "id-ecdsa-with-sha3-256"),
    ("ec/sha3-384", KeyType.EC_P384, "-sha3-384", "id-ecdsa-with-sha3-384"),
]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl binary is not installed")
@pytest.mark.parametrize(
    ("key_type", "options", "name"), [w[1:] for w in WEAK], ids=[w[0] for w in WEAK]
)
def test_a_csr_signed_with_a_weak_digest_is_refused_naming_it(
    key_type: KeyType, options: str, name: str, tmp_path: Path
) -> None:
    """Regression: an RSA CSR signed with SHA-1 was accepted (``is_signature_valid`` said
    False), and ECDSA-SHA1 and MD5-RSA ones were refused as "not signed by its own key"."""
    key = tmp_path / "key.pem"
    key.write_bytes(
        key_type.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    signed = subprocess.run(
        ["openssl", "req", "-new", "-key", str(key), *options.split(), "-subj", "/CN=web"],
        capture_output=True,
        timeout=30,
        check=True,
    )
    with pytest.raises(InvalidCsr) as refused:
        load_verified_csr(signed.stdout)
    assert f"signed with {name}, which is not accepted" in refused.value.detail
    assert "SHA-256" in refused.value.detail


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl binary is not installed")
def test_a_csr_for_an_rsa_pss_only_key_is_refused(tmp_path: Path) -> None:
    """Regression: a key made by ``openssl genpkey -algorithm RSA-PSS`` (SPKI id-RSASSA-PSS)
    was read as a plain RSA key and certified as rsaEncryption with keyEncipherment, dropping
    the restriction to PSS signatures (RFC 4055 §1.2). A PSS signature by an rsaEncryption key
    stays accepted (``SCHEMES``)."""
    csr = openssl_rsa_pss_csr(tmp_path)
    with pytest.raises(InvalidCsr, match=r"RSA-PSS key \(id-RSASSA-PSS\), which is not accepted"):
        load_verified_csr(csr)
