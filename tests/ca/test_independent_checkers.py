"""Trellis's SVIDs judged by code Trellis did not write.

Trellis checks its own certificates after signing (``ca.checks``); that proves nothing about
whether relying parties accept them. Here the judges are OpenSSL's ``verify`` (strict mode, both
TLS purposes), py-spiffe's X509-SVID parser, cryptography's Rust path builder, and a real TLS 1.3
mutual-TLS handshake through Python's ``ssl`` on loopback. Each acceptance is paired with a
rejection under a foreign bundle: an authority with the *same* names but other keys.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from ca.authority import AuthorityParams, Issuer, active_issuer, init_authority
from ca.clock import FixedClock
from ca.config import Context
from ca.identity import TrustDomain
from ca.keys import KeyType
from tests.ca.svidkit import SQLITE_ONLY, Workload, enrol, key_der, key_pem

# Certificate bytes do not depend on the store: every test here runs on SQLite only.
pytestmark = SQLITE_ONLY

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(
    OPENSSL is None, reason="the openssl command-line tool is not on PATH"
)
TIMEOUT = 10.0  # seconds; every socket and thread wait is bounded by it
WEB = "spiffe://example.org/web"
DB = "spiffe://example.org/db"
TD = TrustDomain("example.org")

# (issuer key type, workload key type): every signature and key algorithm at least once.
KEY_MATRIX = [
    pytest.param(KeyType.EC_P256, KeyType.EC_P256, id="issuer-ec-p256/subject-ec-p256"),
    pytest.param(KeyType.EC_P256, KeyType.RSA_2048, id="issuer-ec-p256/subject-rsa-2048"),
    pytest.param(KeyType.EC_P256, KeyType.ED25519, id="issuer-ec-p256/subject-ed25519"),
    pytest.param(KeyType.EC_P384, KeyType.EC_P384, id="issuer-ec-p384/subject-ec-p384"),
    pytest.param(KeyType.RSA_2048, KeyType.EC_P256, id="issuer-rsa-2048/subject-ec-p256"),
    pytest.param(KeyType.ED25519, KeyType.RSA_2048, id="issuer-ed25519/subject-rsa-2048"),
]


@dataclass(frozen=True)
class Pki:
    """PEM files as a relying party would be handed them."""

    directory: Path
    issuer: Issuer

    def write(self, name: str, data: bytes) -> Path:
        path = self.directory / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    @property
    def bundle(self) -> Path:
        return self.write("bundle.pem", self.issuer.bundle_pem)

    @property
    def chain(self) -> Path:
        return self.write("chain.pem", self.issuer.chain_pem)


def openssl_verify(
    pki: Pki, leaf: Workload, *args: str, bundle: Path | None = None, untrusted: bool = True
) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    command = [OPENSSL, "verify", "-x509_strict", *args, "-CAfile", str(bundle or pki.bundle)]
    if untrusted:
        command += ["-untrusted", str(pki.chain)]
    command.append(str(pki.write("leaf.pem", leaf.svid.certificate_pem)))
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, check=False)


@pytest.fixture
def pki(ctx: Context, tmp_path: Path) -> Pki:
    return Pki(tmp_path, active_issuer(ctx))


@pytest.fixture
def foreign_bundle(foreign_issuer: Issuer, tmp_path: Path) -> Path:
    path = tmp_path / "foreign-bundle.pem"
    path.write_bytes(foreign_issuer.bundle_pem)
    return path


# --- OpenSSL -------------------------------------------------------------------------------


@needs_openssl
@pytest.mark.parametrize("purpose", ["sslclient", "sslserver"])
@pytest.mark.parametrize(("issuer_key", "subject_key"), KEY_MATRIX)
def test_openssl_verify_accepts(
    bare_ctx: Context, tmp_path: Path, issuer_key: KeyType, subject_key: KeyType, purpose: str
) -> None:
    issuer = init_authority(bare_ctx, AuthorityParams(TD, key_type=issuer_key))
    workload = enrol(bare_ctx, WEB, subject_key, dns_names=["web.example.org"])
    result = openssl_verify(Pki(tmp_path, issuer), workload, "-purpose", purpose)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": OK")


@needs_openssl
def test_openssl_verify_accepts_the_ca_chain(pki: Pki) -> None:
    assert OPENSSL is not None
    result = subprocess.run(
        [OPENSSL, "verify", "-x509_strict", "-CAfile", str(pki.bundle), str(pki.chain)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_openssl
@pytest.mark.parametrize("purpose", ["sslclient", "sslserver"])
def test_openssl_verify_rejects_a_foreign_bundle(
    ctx: Context, pki: Pki, foreign_bundle: Path, purpose: str
) -> None:
    workload = enrol(ctx, WEB)
    result = openssl_verify(pki, workload, "-purpose", purpose, bundle=foreign_bundle)
    assert result.returncode != 0
    assert "error" in (result.stdout + result.stderr).lower()
    # The same command with the right bundle passes: the bundle is what made the difference.
    assert openssl_verify(pki, workload, "-purpose", purpose).returncode == 0


@needs_openssl
def test_openssl_verify_needs_the_intermediate(ctx: Context, pki: Pki) -> None:
    result = openssl_verify(pki, enrol(ctx, WEB), "-purpose", "sslclient", untrusted=False)
    assert result.returncode != 0
    assert "unable to get local issuer certificate" in result.stdout + result.stderr


# --- py-spiffe -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "subject_key", [KeyType.EC_P256, KeyType.RSA_2048, KeyType.ED25519], ids=lambda k: k.value
)
def test_py_spiffe_parses_the_svid(ctx: Context, subject_key: KeyType) -> None:
    from spiffe import X509Svid

    workload = enrol(ctx, WEB, subject_key)
    issuer = active_issuer(ctx)
    for svid in (
        X509Svid.parse(workload.full_chain_pem, key_pem(workload.key)),
        X509Svid.parse_raw(workload.full_chain_der, key_der(workload.key)),
    ):
        assert str(svid.spiffe_id) == WEB
        assert svid.spiffe_id.trust_domain.name == "example.org"
        assert svid.spiffe_id.path == "/web"
        assert svid.leaf == workload.cert
        assert svid.cert_chain == [workload.cert, issuer.certificate]
        assert svid.private_key.public_key() == workload.key.public_key()


def test_py_spiffe_refuses_the_ca_certificate_as_an_svid(ctx: Context) -> None:
    """X509-SVID §4.1: a signing certificate must not be usable as a workload identity."""
    from spiffe import X509Svid
    from spiffe.svid.errors import InvalidLeafCertificateError

    issuer = active_issuer(ctx)
    workload = enrol(ctx, WEB)  # any key will do: the certificate is refused first
    with pytest.raises(InvalidLeafCertificateError):
        X509Svid.parse(issuer.chain_pem, key_pem(workload.key))


def test_py_spiffe_parses_the_bundle(ctx: Context) -> None:
    from spiffe import TrustDomain as SpiffeTrustDomain
    from spiffe import X509Bundle

    issuer = active_issuer(ctx)
    bundle = X509Bundle.parse(SpiffeTrustDomain("example.org"), issuer.bundle_pem)
    assert bundle.trust_domain.name == "example.org"
    assert bundle.x509_authorities == set(issuer.roots)


# --- cryptography's path builder (webpki-style policy) ---------------------------------------


# Its policy is the Web PKI's, where Ed25519 is not a permitted algorithm: those rows are left out.
@pytest.mark.parametrize(
    ("issuer_key", "subject_key"),
    [case for case in KEY_MATRIX if KeyType.ED25519 not in case.values],
)
def test_cryptography_verifier_accepts(
    bare_ctx: Context, clock: FixedClock, issuer_key: KeyType, subject_key: KeyType
) -> None:
    issuer = init_authority(bare_ctx, AuthorityParams(TD, key_type=issuer_key))
    workload = enrol(bare_ctx, WEB, subject_key, dns_names=["web.example.org"])
    builder = PolicyBuilder().store(Store(list(issuer.roots))).time(clock.now())

    client = builder.build_client_verifier().verify(workload.cert, list(issuer.chain))
    assert x509.UniformResourceIdentifier(WEB) in client.subjects
    server = builder.build_server_verifier(x509.DNSName("web.example.org"))
    assert server.verify(workload.cert, list(issuer.chain)) == [
        workload.cert,
        issuer.certificate,
        *issuer.roots,
    ]


def test_cryptography_verifier_rejects_a_foreign_bundle(
    ctx: Context, clock: FixedClock, foreign_issuer: Issuer
) -> None:
    workload = enrol(ctx, WEB)
    verifier = (
        PolicyBuilder()
        .store(Store(list(foreign_issuer.roots)))
        .time(clock.now())
        .build_client_verifier()
    )
    with pytest.raises(VerificationError):
        verifier.verify(workload.cert, list(active_issuer(ctx).chain))


# --- a real mutual-TLS handshake -------------------------------------------------------------


def tls_context(
    server_side: bool, workload: Workload, bundle_pem: bytes, directory: Path
) -> ssl.SSLContext:
    """A SPIFFE-style endpoint: present the SVID chain, trust only ``bundle_pem``, identify the
    peer by its URI SAN rather than a hostname."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    side = "server" if server_side else "client"
    chain, key = directory / f"{side}-chain.pem", directory / f"{side}-key.pem"
    chain.write_bytes(workload.full_chain_pem)
    key.write_bytes(key_pem(workload.key))
    key.chmod(0o600)
    context.load_cert_chain(chain, key)
    context.load_verify_locations(cadata=bundle_pem.decode())
    return context


@dataclass
class Side:
    peer: dict[str, Any] | None = None
    version: str | None = None
    received: bytes | None = None
    error: BaseException | None = None


def uri_of(peer: dict[str, Any] | None) -> list[str]:
    assert peer is not None
    return [value for kind, value in peer.get("subjectAltName", ()) if kind == "URI"]


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # the kernel picks a free port: no race with other tests
    sock.listen(1)
    sock.settimeout(TIMEOUT)
    yield sock
    sock.close()


def run_handshake(
    listener: socket.socket, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> tuple[Side, Side]:
    server, client = Side(), Side()

    def serve() -> None:
        try:
            connection, _ = listener.accept()
            connection.settimeout(TIMEOUT)
            with server_ctx.wrap_socket(connection, server_side=True) as tls:
                server.peer, server.version = tls.getpeercert(), tls.version()
                server.received = tls.recv(64)
                tls.sendall(b"pong:" + server.received)
        except (OSError, ssl.SSLError) as exc:
            server.error = exc

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        port = listener.getsockname()[1]
        with (
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
            client_ctx.wrap_socket(raw) as tls,
        ):
            client.peer, client.version = tls.getpeercert(), tls.version()
            tls.sendall(b"ping")
            client.received = tls.recv(64)
    except (OSError, ssl.SSLError) as exc:
        client.error = exc
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "the server thread hung"
    return server, client


@pytest.mark.parametrize(
    ("server_key", "client_key"),
    [
        pytest.param(KeyType.EC_P256, KeyType.EC_P256, id="ec-p256/ec-p256"),
        pytest.param(KeyType.RSA_2048, KeyType.ED25519, id="rsa-2048/ed25519"),
        pytest.param(KeyType.ED25519, KeyType.EC_P384, id="ed25519/ec-p384"),
        pytest.param(KeyType.EC_P384, KeyType.RSA_2048, id="ec-p384/rsa-2048"),
    ],
)
def test_mutual_tls_handshake(
    ctx: Context,
    tmp_path: Path,
    listener: socket.socket,
    server_key: KeyType,
    client_key: KeyType,
) -> None:
    web = enrol(ctx, WEB, server_key)
    db = enrol(ctx, DB, client_key)
    bundle = active_issuer(ctx).bundle_pem

    server, client = run_handshake(
        listener,
        tls_context(True, web, bundle, tmp_path),
        tls_context(False, db, bundle, tmp_path),
    )

    assert server.error is None and client.error is None, (server.error, client.error)
    assert server.version == client.version == "TLSv1.3"
    assert uri_of(server.peer) == [DB], "the server identifies the client by its SPIFFE ID"
    assert uri_of(client.peer) == [WEB], "the client identifies the server by its SPIFFE ID"
    assert (server.received, client.received) == (b"ping", b"pong:ping")


def test_mutual_tls_fails_when_the_client_trusts_a_foreign_bundle(
    ctx: Context, tmp_path: Path, listener: socket.socket, foreign_issuer: Issuer
) -> None:
    web, db = enrol(ctx, WEB), enrol(ctx, DB)
    server, client = run_handshake(
        listener,
        tls_context(True, web, active_issuer(ctx).bundle_pem, tmp_path),
        tls_context(False, db, foreign_issuer.bundle_pem, tmp_path),
    )
    assert isinstance(client.error, ssl.SSLCertVerificationError), client.error
    assert client.peer is None and server.peer is None
    assert isinstance(server.error, ssl.SSLError), "the server sees the client's alert"
    assert server.received is None


def test_mutual_tls_fails_when_the_server_trusts_a_foreign_bundle(
    ctx: Context, tmp_path: Path, listener: socket.socket, foreign_issuer: Issuer
) -> None:
    web, db = enrol(ctx, WEB), enrol(ctx, DB)
    server, client = run_handshake(
        listener,
        tls_context(True, web, foreign_issuer.bundle_pem, tmp_path),
        tls_context(False, db, active_issuer(ctx).bundle_pem, tmp_path),
    )
    assert isinstance(server.error, ssl.SSLCertVerificationError), server.error
    assert server.received is None
    # TLS 1.3: the client finishes its side first and learns of the rejection on its next read.
    assert client.received in (None, b""), client.received
