"""A CSR's PEM is one request and no other PEM block (``ca.csr._decoded``): cryptography reads
the first PEM block it finds and drops what follows, so a second request was accepted and
ignored. Explanatory text around the block is allowed (RFC 7468 §5.2)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import serialization

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
