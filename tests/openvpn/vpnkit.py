"""Helpers for the OpenVPN tests: reading a .ovpn profile, normalising it for golden files, and
checking VPN certificates extension by extension."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from typer.testing import CliRunner

from cli.common import STATE
from cli.main import app
from tests.cli.test_walkthrough import Trellis

DATA = Path(__file__).parent / "data"
_BLOCK = re.compile(r"^<([a-z0-9-]+)>\n(.*?)^</\1>\n", re.S | re.M)
_PEM = re.compile(r"-----BEGIN ([A-Za-z0-9 -]+)-----\n.*?-----END \1-----\n", re.S)


class InProcessTrellis(Trellis):
    """``trellis ARGS`` without a new interpreter: the same Typer app, environment and data."""

    def run(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        result = CliRunner().invoke(app, list(args), env=self.env)
        STATE.close()
        if ok and result.exit_code != 0:
            raise AssertionError(f"trellis {' '.join(args)} failed: {result.output}") from (
                result.exception
            )
        return subprocess.CompletedProcess(args, result.exit_code, result.output, "")

    def process(self) -> Trellis:
        return Trellis(self.data_dir, self.env["TRELLIS_DATABASE_URL"])


def openvpn_binary() -> str | None:
    """``openvpn`` lives in /usr/sbin, which is not on every user's PATH."""
    return shutil.which("openvpn") or shutil.which("openvpn", path="/usr/sbin:/usr/local/sbin")


@dataclass(frozen=True)
class Profile:
    directives: list[str]  # option lines, comments dropped, in order
    blocks: dict[str, str]  # inline files: ca, cert, key, tls-crypt-v2 / tls-crypt

    def certificates(self, block: str) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self.blocks[block].encode())

    def private_key(self) -> object:
        return serialization.load_pem_private_key(self.blocks["key"].encode(), None)


def parse_profile(text: str | bytes) -> Profile:
    if isinstance(text, bytes):
        text = text.decode()
    blocks = {match.group(1): match.group(2) for match in _BLOCK.finditer(text)}
    rest = _BLOCK.sub("", text)
    directives = [line for line in rest.splitlines() if line and not line.startswith("#")]
    return Profile(directives, blocks)


def replace_block(text: str, block: str, content: str) -> str:
    """The same profile with one inline block's content replaced (the rest byte for byte)."""
    pattern = re.compile(rf"^<{block}>\n.*?^</{block}>\n", re.S | re.M)
    assert pattern.search(text), block
    return pattern.sub(lambda _m: f"<{block}>\n{content}</{block}>\n", text, count=1)


def normalise(text: str | bytes) -> str:
    """Golden-file form: PEM bodies, serials and instants replaced by stable markers."""
    if isinstance(text, bytes):
        text = text.decode()
    text = _PEM.sub(lambda m: f"[{m.group(1)}]\n", text)
    text = re.sub(r"\b[0-9a-f]{30,40}\b", "SERIAL", text)
    text = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "INSTANT", text)
    return re.sub(r"(?m)^[0-9a-f]{32}$", "HEX", text)


def common_name(cert: x509.Certificate) -> str:
    value = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(value, str)
    return value


def assert_vpn_leaf(cert: x509.Certificate, issuer: x509.Certificate, cn: str, eku: str) -> None:
    """A single-purpose TLS leaf: CN, critical BasicConstraints cA=false, critical KeyUsage
    without CA bits, exactly one EKU, no SPIFFE ID anywhere, issued (and signed) by ``issuer``."""
    assert common_name(cert) == cn
    cert.verify_directly_issued_by(issuer)
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and not basic.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not usage.value.key_cert_sign and not usage.value.crl_sign
    wanted = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        wanted[eku]
    ]
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        return
    assert not san.get_values_for_type(x509.UniformResourceIdentifier)


def crls_in(pem: bytes) -> list[x509.CertificateRevocationList]:
    blocks = re.findall(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----\n", pem, re.S)
    assert b"".join(blocks) == pem, "nothing but CRLs in the file"
    return [x509.load_pem_x509_crl(block) for block in blocks]
