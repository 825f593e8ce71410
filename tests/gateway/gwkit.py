"""Helpers for the gateway tests: partner CSRs, the gateway-certificate assertion, the openssl
thumbprint pipeline, a header-recording upstream and a private nginx process.

nginx is always started with ``-c`` our own configuration and ``-g 'daemon off; pid ...;
error_log ...;'`` so it never touches the system's pid file or logs, and only that process is
ever signalled.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.server
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from ca.gateway import URN_PREFIX
from tests.conftest import free_port
from tests.processes import terminate
from tests.tlsfiles import loopback_server_tls

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def partner_csr(
    key: PrivateKey | None = None,
    *,
    common_name: str = "whatever",
    sans: Sequence[x509.GeneralName] = (),
) -> tuple[PrivateKey, bytes]:
    """A CSR as partner tooling writes it: a subject of its own choosing, maybe SANs."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    csr = builder.sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.PEM)


def assert_gateway_leaf(
    cert: x509.Certificate,
    consumer: str,
    issuer: x509.Certificate,
    *,
    public_key: object | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> None:
    """Every extension of a gateway client certificate, with its criticality; nothing else."""
    cert.verify_directly_issued_by(issuer)
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, consumer)])
    ext = {e.oid: e for e in cert.extensions}
    assert set(ext) == {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
    }
    basic = ext[ExtensionOID.BASIC_CONSTRAINTS]
    assert basic.critical and isinstance(basic.value, x509.BasicConstraints)
    assert basic.value.ca is False
    usage = ext[ExtensionOID.KEY_USAGE]
    assert usage.critical and isinstance(usage.value, x509.KeyUsage)
    assert usage.value.digital_signature and not usage.value.key_cert_sign
    assert not usage.value.crl_sign and not usage.value.key_agreement
    eku = ext[ExtensionOID.EXTENDED_KEY_USAGE]
    assert not eku.critical and list(eku.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]  # type: ignore[call-overload]
    san = ext[ExtensionOID.SUBJECT_ALTERNATIVE_NAME]
    assert not san.critical and isinstance(san.value, x509.SubjectAlternativeName)
    assert list(san.value) == [x509.UniformResourceIdentifier(URN_PREFIX + consumer)]
    if public_key is not None:
        assert cert.public_key() == public_key
    if not_before is not None:
        assert cert.not_valid_before_utc == not_before
    if not_after is not None:
        assert cert.not_valid_after_utc == not_after


def openssl_x5t(pem: Path) -> str:
    """The thumbprint as an operator computes it: openssl DER → SHA-256 → base64url."""
    result = subprocess.run(
        [
            "bash",
            "-o",
            "pipefail",
            "-c",
            f"openssl x509 -in '{pem}' -outform DER | openssl dgst -sha256 -binary | base64 "
            "| tr '+/' '-_' | tr -d '=\\n'",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)


def self_signed_server(directory: Path) -> tuple[Path, Path, Path]:
    """The gateway's own TLS server certificate (a stand-in for the web PKI): CA, cert, key."""
    return loopback_server_tls(directory, file_names=("web-ca.pem", "server.crt", "server.key"))


@dataclass
class Upstream:
    """A plain-HTTP backend on 127.0.0.1 that records the headers of every request."""

    port: int
    seen: list[dict[str, str]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client_certificate(self, index: int = -1) -> x509.Certificate:
        escaped = self.seen[index]["x-ssl-client-cert"]
        return x509.load_pem_x509_certificate(urllib.parse.unquote(escaped).encode())


@contextmanager
def upstream() -> Iterator[Upstream]:
    state = Upstream(free_port())

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.seen.append({k.lower(): v for k, v in self.headers.items()})
            body = b"upstream ok\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", state.port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@dataclass
class Nginx:
    """Our own nginx: its configuration, pid file and error log all live in ``directory``."""

    directory: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def globals(self) -> str:
        # info: "start worker process" (what ``reload`` waits for) and client verify errors
        return f"pid {self.directory / 'nginx.pid'}; error_log {self.directory / 'err.log'} info;"

    @property
    def config(self) -> Path:
        return self.directory / "nginx.conf"

    def write_config(self, server_block: str) -> None:
        temp = self.directory / "temp"
        temp.mkdir(parents=True, exist_ok=True)
        (self.directory / "gateway.conf").write_text(server_block)
        # As root, nginx's workers would run as "nobody", which cannot enter pytest's 0700 dirs.
        user = "user root;\n" if os.geteuid() == 0 else ""
        self.config.write_text(
            f"{user}worker_processes 1;\n"
            "events { worker_connections 64; }\n"
            "http {\n"
            f"    access_log {self.directory / 'access.log'};\n"
            + "".join(
                f"    {kind}_temp_path {temp / kind};\n"
                for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
            )
            + f"    include {self.directory / 'gateway.conf'};\n"
            "}\n"
        )

    def _command(self, *extra: str) -> list[str]:
        assert NGINX is not None
        return [NGINX, "-p", str(self.directory), "-c", str(self.config), *extra]

    def check(self) -> None:
        result = subprocess.run(
            self._command("-t", "-g", self.globals), capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr

    def start(self) -> None:
        self.check()
        # ``nginx -t`` leaves a pid file behind: readiness is the port accepting connections.
        (self.directory / "nginx.pid").unlink(missing_ok=True)
        self.process = subprocess.Popen(
            self._command("-g", "daemon off; " + self.globals),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self._listening():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("nginx did not start: " + self.error_log())
            time.sleep(0.05)
        while not (self.directory / "nginx.pid").exists():
            assert time.monotonic() < deadline, "nginx wrote no pid file"
            time.sleep(0.05)

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def _workers(self) -> list[str]:
        return re.findall(r"start worker process (\d+)", self.error_log())

    def reload(self) -> None:
        """``nginx -s reload`` against our own pid file; returns once every old worker has
        exited, so no request can reach a worker that still holds the old CRL."""
        old = self._workers()
        result = subprocess.run(
            self._command("-g", self.globals, "-s", "reload"),
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 10
        while len(self._workers()) == len(old) or not all(
            f"worker process {pid} exited" in self.error_log() for pid in old
        ):
            assert time.monotonic() < deadline, "nginx did not reload: " + self.error_log()
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is None:
            return
        terminate(self.process)

    def error_log(self) -> str:
        path = self.directory / "err.log"
        return path.read_text(errors="replace") if path.exists() else ""


@dataclass(frozen=True)
class Reply:
    status: int
    body: str


def curl(url: str, web_ca: Path, *args: str) -> Reply:
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            str(web_ca),
            "-w",
            "\n%{http_code}",
            *args,
            url,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    body, _, status = result.stdout.rpartition("\n")
    return Reply(int(status), body)


def load_crls(pem: bytes) -> list[x509.CertificateRevocationList]:
    """Every CRL of a multi-CRL PEM file (cryptography reads one at a time)."""
    end = b"-----END X509 CRL-----"
    blocks = [block + end for block in pem.split(end) if block.strip()]
    return [x509.load_pem_x509_crl(block.strip() + b"\n") for block in blocks]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
