"""The workload's HTTPS connection to Trellis: the server is authenticated before a byte of the
request (and the join token or renewal proof in its header) leaves.

Chain verification to the pinned bundle, with the host name, proves only that the peer holds
*some* certificate of the trust domain, and every workload holds one, with whatever DNS names its
entry lists. So, like go-spiffe's ``tlsconfig.AuthorizeID`` (an authorizer run after the chain is
verified), the peer must also be ``spiffe://<td>/trellis/server``: the identity
``ca.entries.check_not_reserved`` keeps out of every entry and that only ``trellis serve`` is
issued. ``<td>`` is the trust domain of the bundle's roots (a Trellis root carries its trust
domain's ID, X509-SVID §3.1): the bundle is how a workload recognises Trellis at all.

http.client rather than httpx: the request is written on the very socket that was checked (httpx
connects and sends in one call, with no place between the handshake and the first byte), the
connection is never reopened behind our back (``auto_open`` off), and no proxy is taken from the
environment.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509

from ca import errors
from ca.identity import SERVER_PATH, SpiffeId

__all__ = ["Answer", "ServerConnection", "ServerUrl"]

CONNECT_TIMEOUT = 5.0  # seconds, for the TCP connection and each step of the handshake
READ_TIMEOUT = 15.0  # seconds, for each read or write once connected
MAX_ANSWER = 1 << 20  # bytes: an SVID with its chain and bundle is a few kB


@dataclass(frozen=True, slots=True)
class ServerUrl:
    """``--server``: where Trellis listens. Only https: the join token and the renewal proof
    travel in a header."""

    host: str
    port: int
    path: str = ""  # a prefix the routes are under, without a trailing slash

    @classmethod
    def parse(cls, text: str) -> ServerUrl:
        problem = f"--server {text[:128]!r} must be an https:// URL with a host (https://host:port)"
        if not text.isascii() or not text.isprintable() or " " in text:
            raise errors.InvalidInput(problem)
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError:
            raise errors.InvalidInput(problem) from None
        if (
            parts.scheme.lower() != "https"
            or not parts.hostname
            or "@" in parts.netloc
            or parts.query
            or parts.fragment
        ):
            raise errors.InvalidInput(problem)
        return cls(parts.hostname, port or 443, parts.path.rstrip("/"))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}{self.path}"


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _spiffe_id(uri: str) -> SpiffeId | None:
    try:
        return SpiffeId.parse(uri)
    except errors.InvalidSpiffeId:
        return None


class ServerConnection:
    """Requests to one Trellis server, trusting only ``bundle`` and only its server identity."""

    def __init__(self, url: ServerUrl, bundle: Path, bundle_name: str) -> None:
        self.url = url
        unreadable = errors.InvalidInput(f"{bundle_name}: cannot read the trust bundle")
        try:
            pem = bundle.read_bytes()
            roots = x509.load_pem_x509_certificates(pem)
            self._tls = ssl.create_default_context(cadata=pem.decode("ascii"))
        except (OSError, ValueError, ssl.SSLError):  # UnicodeDecodeError is a ValueError
            raise unreadable from None
        ids = {_spiffe_id(uri) for root in roots for uri in _uri_sans(root)}
        domains = {i.trust_domain for i in ids if i is not None and i.is_trust_domain_id}
        if not domains:
            raise errors.InvalidInput(
                f"{bundle_name}: no root of a SPIFFE trust domain in it (not a Trellis bundle)"
            )
        self.server_ids = frozenset(SpiffeId.from_path(td, SERVER_PATH) for td in domains)

    def _authenticate(self, tls: ssl.SSLSocket) -> None:
        """The authorizer: the verified peer must be Trellis's server identity."""
        der = tls.getpeercert(binary_form=True)
        uris = _uri_sans(x509.load_der_x509_certificate(der)) if der else []
        if len(uris) == 1 and _spiffe_id(uris[0]) in self.server_ids:
            return
        expected = " or ".join(sorted(str(i) for i in self.server_ids))
        held = ", ".join(uris)[:200] or "no SPIFFE ID"
        raise errors.Unavailable(
            f"{self.url} is not Trellis: its certificate is {held}, not {expected}; "
            "nothing was sent to it"
        )

    def _connect(self) -> ssl.SSLSocket:
        raw = socket.create_connection((self.url.host, self.url.port), timeout=CONNECT_TIMEOUT)
        try:
            tls = self._tls.wrap_socket(raw, server_hostname=self.url.host)
        except BaseException:
            raw.close()
            raise
        return tls

    def exchange(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        """One request on a fresh connection whose peer was authenticated first."""
        try:
            tls = self._connect()
        except OSError as exc:  # ssl.SSLCertVerificationError included: no trusted chain
            raise errors.Unavailable(f"cannot reach {self.url}: {exc}") from None
        connection = http.client.HTTPConnection(self.url.host, self.url.port)
        connection.auto_open = 0  # never a second, unchecked connection
        connection.sock = tls
        try:
            self._authenticate(tls)
            tls.settimeout(READ_TIMEOUT)
            connection.request(method, self.url.path + path, body=body, headers=dict(headers or {}))
            response = connection.getresponse()
            content = response.read(MAX_ANSWER + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise errors.Unavailable(f"cannot reach {self.url}: {exc}") from None
        finally:
            connection.close()
        if len(content) > MAX_ANSWER:
            raise errors.Unavailable(f"{self.url} answered more than {MAX_ANSWER} bytes")
        return Answer(response.status, content)
