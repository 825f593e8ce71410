"""Helpers for the Istio tests: the ``trellis`` CLI run in-process, istiod's workload signing
imitated with cryptography, openssl, and a mutual TLS 1.3 handshake on loopback.

istiod signs workload certificates (istio/istio security/pkg/pki/util/generate_cert.go) with
an empty subject and a critical URI SAN ``spiffe://<td>/ns/<ns>/sa/<sa>``, critical
basicConstraints cA=false, critical keyUsage digitalSignature (+keyEncipherment for RSA),
EKU serverAuth+clientAuth, a lifetime clamped to its CA's, and hands the workload the chain
leaf + ``cert-chain.pem``; sidecars use RSA-2048 keys by default.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from ca.keys import KeyType, PrivateKey
from ca.pem import certs_pem, private_key_pem
from cli.main import main

TIMEOUT = 10
TLS_ROLES = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class Cli:
    """``trellis --data-dir D --database-url U ...`` in this process (``main`` is the same entry
    point as the installed script: exit codes and one-line errors included)."""

    data_dir: Path
    database_url: str
    capsys: pytest.CaptureFixture[str]

    def __call__(self, *args: str) -> Result:
        self.capsys.readouterr()
        argv = ["--data-dir", str(self.data_dir), "--database-url", self.database_url, *args]
        try:
            main(argv)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        out, err = self.capsys.readouterr()
        return Result(code, out, err)

    def ok(self, *args: str) -> str:
        result = self(*args)
        assert result.code == 0, f"trellis {' '.join(args)}: {result.err}"
        return result.out


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)


def openssl_verify(
    root: Path,
    leaf: Path,
    untrusted: Path | None = None,
    purpose: str | None = None,
    at: dt.datetime | None = None,
) -> subprocess.CompletedProcess[str]:
    args = ["verify", "-x509_strict", "-CAfile", str(root)]
    if at is not None:
        args += ["-attime", str(int(at.timestamp()))]
    if untrusted is not None:
        args += ["-untrusted", str(untrusted)]
    if purpose is not None:
        args += ["-purpose", purpose]
    return openssl(*args, str(leaf))


def public_key_pem(path: Path, kind: str) -> str:
    """The public key of a certificate or private key file, as openssl prints it."""
    args = ["x509", "-in", str(path), "-pubkey", "-noout"] if kind == "cert" else [
        "pkey", "-in", str(path), "-pubout"
    ]  # fmt: skip
    result = openssl(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def crls(pem: bytes) -> list[x509.CertificateRevocationList]:
    """Every CRL of a PEM file such as ``ca-crl.pem``, in order."""
    marker = b"-----BEGIN X509 CRL-----"
    return [x509.load_pem_x509_crl(marker + block) for block in pem.split(marker)[1:]]


def load_key(data: bytes) -> PrivateKey:
    key = serialization.load_pem_private_key(data, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    return key


def istiod_sign(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    spiffe_id: str,
    *,
    key_type: KeyType = KeyType.RSA_2048,
    ttl: dt.timedelta = dt.timedelta(hours=1),
) -> tuple[x509.Certificate, PrivateKey]:
    """A workload certificate as istiod issues it from the plug-in CA intermediate."""
    key = key_type.generate()
    now = dt.datetime.now(dt.UTC)
    rsa_key = isinstance(key, rsa.RSAPrivateKey)
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=rsa_key,
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(now - dt.timedelta(minutes=1), ca_cert.not_valid_before_utc))
        .not_valid_after(min(now + ttl, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage(TLS_ROLES), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True
        )
    )
    return builder.sign(ca_key, hashes.SHA256()), key  # type: ignore[arg-type]


@dataclass(frozen=True)
class Peer:
    """A TLS endpoint: what it presents (leaf first) and the only roots it trusts."""

    name: str
    chain: tuple[x509.Certificate, ...]
    key: PrivateKey
    trust_pem: bytes


@dataclass
class Side:
    peer_uris: list[str] = field(default_factory=list)
    version: str | None = None
    received: bytes | None = None
    error: BaseException | None = None


def _context(peer: Peer, server_side: bool, directory: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # SPIFFE: the peer is named by its URI SAN, read below
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    stem = f"{'server' if server_side else 'client'}-{peer.name.rsplit('/', 1)[-1]}"
    chain, key = directory / f"{stem}-chain.pem", directory / f"{stem}-key.pem"
    chain.write_bytes(certs_pem(peer.chain))
    key.write_bytes(private_key_pem(peer.key))
    context.load_cert_chain(chain, key)
    context.load_verify_locations(cadata=peer.trust_pem.decode())
    return context


def _uris(peer: dict[str, Any] | None) -> list[str]:
    return [value for kind, value in (peer or {}).get("subjectAltName", ()) if kind == "URI"]


def handshake(server: Peer, client: Peer, directory: Path) -> tuple[Side, Side]:
    """One mutual TLS 1.3 connection on 127.0.0.1 (a kernel-chosen port), a ping and a pong."""
    server_ctx, client_ctx = _context(server, True, directory), _context(client, False, directory)
    server_side, client_side = Side(), Side()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(TIMEOUT)

        def serve() -> None:
            try:
                connection, _ = listener.accept()
                connection.settimeout(TIMEOUT)
                with server_ctx.wrap_socket(connection, server_side=True) as tls:
                    server_side.peer_uris = _uris(tls.getpeercert())
                    server_side.version = tls.version()
                    server_side.received = tls.recv(64)
                    tls.sendall(b"pong")
            except (OSError, ssl.SSLError) as exc:
                server_side.error = exc

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as raw,
                client_ctx.wrap_socket(raw) as tls,
            ):
                client_side.peer_uris = _uris(tls.getpeercert())
                client_side.version = tls.version()
                tls.sendall(b"ping")
                client_side.received = tls.recv(64)
        except (OSError, ssl.SSLError) as exc:
            client_side.error = exc
        thread.join(TIMEOUT)
    assert not thread.is_alive(), "the server thread hung"
    return server_side, client_side


def assert_connected(server: Side, client: Side, server_id: str, client_id: str) -> None:
    assert server.error is None and client.error is None, (server.error, client.error)
    assert server.version == client.version == "TLSv1.3"
    assert server.peer_uris == [client_id] and client.peer_uris == [server_id]
    assert server.received == b"ping" and client.received == b"pong"


def assert_refused(server: Side, client: Side) -> None:
    """Whoever verifies the impostor's chain fails it (TLS 1.3: a client may only learn that
    the server refused its certificate from the alert on its first read)."""
    errors = f"{server.error} {client.error}"
    assert "certificate verify failed" in errors or "unknown ca" in errors, errors
    assert server.received is None and client.received in (None, b"")
