"""A CSR's PEM is one request and no other PEM block (``ca.csr._decoded``): cryptography reads
the first PEM block it finds and drops what follows, so a second request was accepted and
ignored. Explanatory text around the block is allowed (RFC 7468 §5.2)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca.csr import decode_csr, load_verified_csr
from ca.errors import InvalidCsr
from tests.api.restkit import make_csr
from tests.selfsigned import self_signed


def _csr() -> str:
    return make_csr()[1]


def _certificate() -> str:
    cert, _ = self_signed("not a csr")
    return cert.public_bytes(serialization.Encoding.PEM).decode()


ACCEPTED: dict[str, Callable[[], str]] = {
    "ok/plain": _csr,
    "ok/whitespace-around": lambda: "\n  " + _csr() + "\n\n",
    "ok/crlf": lambda: _csr().replace("\n", "\r\n"),
    # RFC 7468 §7: parsers may accept the label older tools (Netscape, openssl -newhdr) wrote.
    "ok/legacy-label": lambda: _csr().replace("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST"),
    # RFC 7468 §5.2: parsers must not fail on explanatory text (openssl req -text writes it).
    "ok/leading-text": lambda: "Certificate Request:\n    Data:\n" + _csr(),
    "ok/trailing-text": lambda: _csr() + "and a note\n",
}

REFUSED: dict[str, tuple[Callable[[], str], str]] = {
    "fail/two-csrs": (lambda: _csr() + _csr(), "this holds 2 PEM blocks"),
    "fail/csr-then-certificate": (lambda: _csr() + _certificate(), "this holds 2 PEM blocks"),
    "fail/certificate-then-csr": (lambda: _certificate() + _csr(), "this holds 2 PEM blocks"),
    "fail/labels-differ": (
        lambda: _csr().replace("END CERTIFICATE REQUEST", "END NEW CERTIFICATE REQUEST"),
        "no other PEM block",
    ),
    "fail/empty": (lambda: "", "no other PEM block"),
}


@pytest.mark.parametrize("build", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_one_pem_csr_is_read(build: Callable[[], str]) -> None:
    pem = build().encode()
    assert decode_csr(pem).request.is_signature_valid
    load_verified_csr(pem)


@pytest.mark.parametrize(("build", "reason"), REFUSED.values(), ids=REFUSED.keys())
def test_anything_but_one_pem_csr_is_refused(build: Callable[[], str], reason: str) -> None:
    for read in (decode_csr, load_verified_csr):
        with pytest.raises(InvalidCsr) as caught:
            read(build().encode())
        assert reason in caught.value.detail


def _tlv(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(octets)]) + octets + content


def _elements(der: bytes) -> list[bytes]:
    """The DER elements one after another in ``der`` (each with its tag and length)."""
    found, at = [], 0
    while at < len(der):
        size, start = der[at + 1], at + 2
        if size & 0x80:
            count = size & 0x7F
            size, start = int.from_bytes(der[start : start + count], "big"), start + count
        found.append(der[at : start + size])
        at = start + size
    return found


def _inside(element: bytes) -> bytes:
    """The contents of one DER element."""
    return element[2 + (element[1] & 0x7F if element[1] & 0x80 else 0) :]


def test_a_second_extension_request_is_refused() -> None:
    """A request whose second extensionRequest attribute asks for another SPIFFE ID and a DNS
    name: cryptography read only the first, so an SVID was issued on what the first asked and
    the second was never judged. Built by hand (no builder makes one), signed by its own key."""
    key = ec.generate_private_key(ec.SECP256R1())

    def attributes(*names: x509.GeneralName) -> tuple[bytes, bytes]:
        request = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
            .sign(key, hashes.SHA256())
        )
        version, subject, spki, attribute_set = _elements(_inside(request.tbs_certrequest_bytes))
        return version + subject + spki, _inside(attribute_set)

    head, first = attributes(x509.UniformResourceIdentifier("spiffe://example.org/csr"))
    _, second = attributes(
        x509.UniformResourceIdentifier("spiffe://example.org/other"),
        x509.DNSName("evil.example.org"),
    )
    info = _tlv(0x30, head + _tlv(0xA0, first + second))
    ecdsa_with_sha256 = _tlv(0x30, _tlv(0x06, bytes.fromhex("2a8648ce3d040302")))
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    der = _tlv(0x30, info + ecdsa_with_sha256 + _tlv(0x03, b"\0" + signature))
    csr = x509.load_der_x509_csr(der)
    assert csr.is_signature_valid and len(list(csr.attributes)) == 2
    pem = csr.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(InvalidCsr, match="2 extensionRequest attributes"):
        decode_csr(pem)
    with pytest.raises(InvalidCsr, match="2 extensionRequest attributes"):
        load_verified_csr(pem)
    # one of them alone is a request like any other
    alone = _tlv(0x30, head + _tlv(0xA0, first))
    signature = key.sign(alone, ec.ECDSA(hashes.SHA256()))
    der = _tlv(0x30, alone + ecdsa_with_sha256 + _tlv(0x03, b"\0" + signature))
    decode_csr(x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM))
