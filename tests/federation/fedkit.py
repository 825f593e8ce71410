"""Helpers for the federation tests: a partner trust domain, SPIFFE bundle documents built by
hand (good and broken), CA certificates that load but are malformed inside, and
``BundleServer``, a tiny HTTPS server whose answer a test sets (a stand-in for a partner's
bundle endpoint, honest or not)."""

from __future__ import annotations

import datetime as dt
import json
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.authority import AuthorityParams, Issuer, init_authority
from ca.clock import FixedClock
from ca.config import Context, Settings, build_context
from ca.durations import Ttl
from ca.federation import Endpoint
from ca.files import write_private
from ca.grants import admin_grant, server_grant
from ca.identity import SpiffeId, TrustDomain
from ca.issue import IssuedSvid, issue_for_key, mint_svid
from ca.jwks import bundle_jwks
from ca.keys import KeyType
from ca.pem import private_key_pem
from ca.serving import ServerTls, ensure_server_certificate
from tests.conftest import migrated_sqlite
from tests.selfsigned import self_signed

PASSPHRASE = "test-passphrase-not-secret"
PARTNER = TrustDomain.parse("b.test")
PARTNER_SERVER = SpiffeId.parse("spiffe://b.test/trellis/server")


def make_context(data_dir: Path, clock: FixedClock, **settings: Any) -> Context:
    return build_context(
        Settings(
            data_dir=data_dir,
            database_url=migrated_sqlite(data_dir / "trellis.db"),
            key_passphrase=PASSPHRASE,  # type: ignore[arg-type]
            **settings,
        ),
        clock=clock,
    )


@dataclass
class Partner:
    """Another Trellis (its own data dir and database) for trust domain ``b.test``."""

    ctx: Context
    issuer: Issuer

    @property
    def roots(self) -> list[x509.Certificate]:
        return list(self.issuer.roots)

    def jwks(self, sequence: int | None = 1, certs: Sequence[x509.Certificate] = ()) -> bytes:
        document = bundle_jwks(list(certs) or self.roots, sequence or 0, 300)
        if sequence is None:
            del document["spiffe_sequence"]
        return json.dumps(document).encode()

    def server_tls(self) -> ServerTls:
        """Its serving certificate, ``spiffe://b.test/trellis/server`` with IP SAN 127.0.0.1."""
        return ensure_server_certificate(self.ctx)

    def server_cert(self, directory: Path, dns: Sequence[str]) -> tuple[Path, Path]:
        """A ``spiffe://b.test/trellis/server`` SVID for the DNS names given and no IP address:
        (chain file, key file)."""
        key = KeyType.EC_P256.generate()
        grant = server_grant(self.ctx, list(dns), [], Ttl(3600))
        svid = issue_for_key(self.ctx, grant, key.public_key())
        directory.mkdir(parents=True, exist_ok=True)
        chain, key_file = directory / "tls.crt", directory / "tls.key"
        chain.write_bytes(svid.certificate_pem + svid.chain_pem)
        write_private(key_file, private_key_pem(key))
        return chain, key_file

    def mint(self, path: str = "/ns/default/sa/api") -> IssuedSvid:
        spiffe_id = SpiffeId.from_path(PARTNER, path)
        key = KeyType.EC_P256.generate()
        return mint_svid(self.ctx, admin_grant(self.ctx, spiffe_id, "tests"), key)


def make_partner(data_dir: Path, clock: FixedClock, trust_domain: TrustDomain = PARTNER) -> Partner:
    ctx = make_context(data_dir, clock)
    return Partner(ctx, init_authority(ctx, AuthorityParams(trust_domain)))


def nested(depth: int) -> bytes:
    """A JWK Set whose ``keys`` is ``depth`` arrays deep: small, but deeper than the JSON
    parser's recursion limit."""
    return b'{"keys":' + b"[" * depth + b"]" * depth + b"}"


# (extension OID, its DER value) added before signing; basic-constraints-twice renames its
# stand-in extension 2.5.29.99 to 2.5.29.19 (BasicConstraints) after signing.
_MALFORMED = {
    "bad-san": ("2.5.29.17", b"\x30\x03\x02\x01\x00"),  # a SEQUENCE of INTEGER, not GeneralNames
    "basic-constraints-twice": ("2.5.29.99", b"\x30\x03\x01\x01\xff"),
}


# Relationships ``federation add`` refuses for their URL or bootstrap bundle (REST: 400, CLI:
# exit 2): hosts that are no IDNA, ports outside 1..65535, bootstrap CAs that do not parse.
# ``bootstrap``: None for the partner's roots, a ``malformed_ca`` kind, or "nested" (a JWK Set
# nested too deeply).
MALFORMED_ADDS = pytest.mark.parametrize(
    ("url", "bootstrap", "reason"),
    [
        ("https://xn--a.org/b", None, "is not a URL"),
        ("https://xn--zz.org/b", None, "is not a URL"),
        ("https://127.0.0.1:99999/b/cur", None, "port 99999 is not in 1..65535"),
        ("https://127.0.0.1:0/b", None, "port 0 is not in 1..65535"),
        ("https://exa mple.org/b", None, "'exa%20mple.org' is not a host name or an IP"),
        ("https://a..b/b", None, "'a..b' is not a host name or an IP address"),
        ("https://exa_mple.org/b", None, "'exa_mple.org' is not a host name or an IP address"),
        ("https://b.test/", "bad-san", "the certificate is malformed"),
        ("https://b.test/", "basic-constraints-twice", "the certificate is malformed"),
        ("https://b.test/", "nested", "nested too deeply"),
    ],
    ids=["fail/idna-xn--a", "fail/idna-xn--zz", "fail/port-99999", "fail/port-0",
         "fail/host-space", "fail/host-empty-label", "fail/host-underscore",
         "fail/bootstrap-bad-san", "fail/bootstrap-bc-twice", "fail/bootstrap-nested"],
)  # fmt: skip


def malformed_ca(kind: str) -> x509.Certificate:
    """A self-signed CA certificate that loads but whose extensions do not parse (cryptography
    decodes them on first use): ``bad-san`` or ``basic-constraints-twice``."""
    oid, value = _MALFORMED[kind]
    cert, _ = self_signed(
        f"malformed {kind}",
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), False),
        ],
        valid_from=-dt.timedelta(days=1),
        lifetime=dt.timedelta(days=30),
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    if kind == "basic-constraints-twice":  # the signature breaks; nothing checks it that far
        stand_in, basic_constraints = bytes.fromhex("0603551d63"), bytes.fromhex("0603551d13")
        assert der.count(stand_in) == 1
        der = der.replace(stand_in, basic_constraints)
    return x509.load_der_x509_certificate(der)


@dataclass
class FakeFetch:
    """Answers every fetch with the next queued body and records the endpoints it was given."""

    bodies: list[bytes] = field(default_factory=list)
    seen: list[Endpoint] = field(default_factory=list)

    def __call__(self, endpoint: Endpoint) -> bytes:
        self.seen.append(endpoint)
        return self.bodies.pop(0)


@dataclass
class Answer:
    status: int = 200
    body: bytes = b"{}"
    headers: dict[str, str] = field(default_factory=dict)
    drip: float = 0.0  # seconds between bytes of the status line and headers (a slow server)
    hold: threading.Event | None = None  # answer only once it is set (at most 10 s): in flight


class BundleServer:
    """HTTPS on 127.0.0.1 (a free port, or the one given) with the certificate and key given;
    a GET gets ``self.routes[path]`` if there is one, else ``self.answer``."""

    def __init__(self, cert: Path, key: Path, port: int = 0) -> None:
        self.answer = Answer()
        self.routes: dict[str, Answer] = {}
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                answer = outer.routes.get(self.path, outer.answer)
                if answer.hold is not None:
                    answer.hold.wait(10)
                self.send_response(answer.status)
                for name, value in {"Content-Type": "application/json", **answer.headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer.body)))
                if answer.drip:
                    self._drip(b"".join(self._headers_buffer) + b"\r\n", answer)
                    return
                self.end_headers()
                self.wfile.write(answer.body)

            def _drip(self, head: bytes, answer: Answer) -> None:
                """At most 30 s of it, and only while the client is there."""
                stop = time.monotonic() + 30
                try:
                    for index in range(len(head)):
                        if time.monotonic() > stop:
                            return
                        self.wfile.write(head[index : index + 1])
                        time.sleep(answer.drip)
                    self.wfile.write(answer.body)
                except OSError:
                    pass  # the client gave up

            def log_message(self, format: str, *args: Any) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/bundle"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)
