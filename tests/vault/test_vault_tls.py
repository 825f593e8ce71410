"""TLS to Vault: a private CA bundle and a client certificate, against an OpenBao listener that
requires one (certificates made here with cryptography, loopback only)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca.config import Settings
from ca.errors import Unavailable
from ca.keys import KeyType
from ca.keys.vault import VaultKeyBackend
from tests.ca.test_file_keys import raw_sign, verify
from tests.conftest import free_port
from tests.vault.openbao import OpenBao

NOW = dt.datetime.now(dt.UTC)


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    usage: x509.ObjectIdentifier | None,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(minutes=5))
        .not_valid_after(NOW + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write(
    directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> None:
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (directory / f"{name}.key").chmod(0o600)


@pytest.fixture(scope="module")
def tls_openbao(
    bao_path: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[OpenBao, str, Path]]:
    """A dev server with a second listener: TLS, client certificate required."""
    workdir = tmp_path_factory.mktemp("bao-tls")
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("Test Vault CA", ca_key, None, None)
    _write(workdir, "ca", ca, ca_key)
    _write(
        workdir,
        "server",
        _cert("vault", server_key, (ca, ca_key), ExtendedKeyUsageOID.SERVER_AUTH),
        server_key,
    )
    _write(
        workdir,
        "client",
        _cert("trellis", client_key, (ca, ca_key), ExtendedKeyUsageOID.CLIENT_AUTH),
        client_key,
    )
    port = free_port()
    listener = (
        f'listener "tcp" {{\n  address = "127.0.0.1:{port}"\n'
        f'  tls_cert_file = "{workdir / "server.pem"}"\n'
        f'  tls_key_file = "{workdir / "server.key"}"\n'
        f'  tls_client_ca_file = "{workdir / "ca.pem"}"\n'
        "  tls_require_and_verify_client_cert = true\n}\n"
    )
    server = OpenBao.dev(bao_path, workdir, listener)
    try:
        server.mount("transit", "transit")
        yield server, f"https://127.0.0.1:{port}", workdir
    finally:
        server.stop()


def test_sign_over_tls_with_a_client_certificate(tls_openbao: tuple[OpenBao, str, Path]) -> None:
    server, address, certs = tls_openbao
    backend = VaultKeyBackend.from_settings(
        Settings(
            vault_addr=address,
            vault_token=server.root_token,  # type: ignore[arg-type]
            vault_ca_cert=certs / "ca.pem",
            vault_client_cert=certs / "client.pem",
            vault_client_key=certs / "client.key",
        )
    )
    try:
        signer = backend.load(backend.create(KeyType.EC_P256, "tls"))
        verify(signer.public_key(), KeyType.EC_P256, raw_sign(signer, b"over TLS"), b"over TLS")
    finally:
        backend.connection.close()


@pytest.mark.parametrize(
    ("client_cert", "ca_cert", "reason"),
    [(False, True, "requires a client certificate"), (True, False, "certificate verify failed")],
    ids=["fail/no-client-cert", "fail/unknown-server-ca"],
)
def test_tls_failures_are_unavailable(
    tls_openbao: tuple[OpenBao, str, Path], client_cert: bool, ca_cert: bool, reason: str
) -> None:
    server, address, certs = tls_openbao
    settings = Settings(
        vault_addr=address,
        vault_token=server.root_token,  # type: ignore[arg-type]
        vault_ca_cert=certs / "ca.pem" if ca_cert else None,
        vault_client_cert=certs / "client.pem" if client_cert else None,
        vault_client_key=certs / "client.key" if client_cert else None,
    )
    backend = VaultKeyBackend.from_settings(settings)
    try:
        with pytest.raises(Unavailable, match=reason):
            backend.check()
    finally:
        backend.connection.close()
