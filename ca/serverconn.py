"""The workload's HTTPS connection to Trellis: the server is authenticated before a byte of the
request (and the join token or renewal proof in its header) leaves.

Chain verification to the pinned bundle, with the host name, proves only that the peer holds
*some* certificate of the trust domain, and every workload holds one, with whatever DNS names its
entry lists. So, like go-spiffe's ``tlsconfig.AuthorizeID`` (an authorizer run after the chain is
verified), the peer must also be ``spiffe://<td>/trellis/server``: the identity
``ca.entries.check_not_reserved`` keeps out of every entry, so that Trellis's own CAs issue it
to ``trellis serve`` alone. ``<td>`` is the trust domain of the bundle's roots (a Trellis root
carries its trust domain's ID, X509-SVID §3.1): the bundle is how a workload recognises Trellis.

The identity alone is not enough: in SPIFFE's model any CA under the trust domain's root may
sign any SPIFFE ID of the trust domain (name constraints cannot limit a URI's path), and
Trellis hands such a CA out with its key: the Istio plug-in intermediate istiod signs mesh
workloads with (``ca.istio``). So the peer's certificate must also not be issued by one. Its
issuer name is the subject of the CA OpenSSL verified it with (OpenSSL builds the chain by
names; Python 3.11's ssl shows no verified chain), and Trellis alone names the CAs under its
roots: ``ca.profiles.is_istio_subject`` tells an Istio intermediate's subject, read as OpenSSL
compares names. What the server answers is then checked too (``ca.workload``): an SVID that
chains to the bundle sent with it, a bundle that keeps a root the client trusts.

http.client rather than httpx: the request is written on the very socket that was checked (httpx
connects and sends in one call, with no place between the handshake and the first byte), the
connection is never reopened behind our back (``auto_open`` off), and no proxy is taken from the
environment.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509

from ca import errors
from ca.checks import uri_sans
from ca.csr import no_port_to_reach
from ca.identity import SERVER_PATH, SpiffeId
from ca.profiles import is_istio_subject
from ca.redact import without_userinfo

__all__ = ["Answer", "ServerConnection", "ServerUrl", "Stopped"]

CONNECT_TIMEOUT = 5.0  # seconds, for the TCP connection and each step of the handshake
READ_TIMEOUT = 15.0  # seconds, for each read or write once connected
TOTAL_TIMEOUT = 30.0  # seconds, for a whole request: connection, handshake, request, answer
POLL = 0.1  # seconds between two looks at the stop flag while a request runs
MAX_ANSWER = 1 << 20  # bytes: an SVID with its chain and bundle is a few kB


class Stopped(Exception):
    """A request abandoned because the caller's ``stop()`` became true (the agent's SIGTERM)."""


@dataclass(frozen=True, slots=True)
class ServerUrl:
    """``--server``: where Trellis listens. Only https: the join token and the renewal proof
    travel in a header."""

    host: str
    port: int
    path: str = ""  # a prefix the routes are under, without a trailing slash

    @classmethod
    def parse(cls, text: str) -> ServerUrl:
        """``text`` as a URL, else ``InvalidInput``, whose message never repeats a user name or
        password in it (``ca.redact.without_userinfo``): it goes to a terminal or a pod's log.
        There is none to give: Trellis's clients authenticate with a join token or their SVID,
        and one sent in the URL was refused with a message repeating it. A port of 0, or a ':'
        with none after it, is refused as ``TRELLIS_PUBLIC_URL`` refuses it; both meant 443."""
        shown = without_userinfo(text)[:128]
        problem = f"--server {shown!r} must be an https:// URL with a host (https://host:port)"
        if not text.isascii() or not text.isprintable() or " " in text:
            raise errors.InvalidInput(problem)
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError:
            raise errors.InvalidInput(problem) from None
        if "@" in parts.netloc:
            raise errors.InvalidInput(
                f"--server {shown!r}: a user name or password has no place in it (Trellis is"
                " authenticated to by a join token or an SVID): give https://host:port"
            )
        if parts.scheme.lower() != "https" or not parts.hostname or parts.query or parts.fragment:
            raise errors.InvalidInput(problem)
        if no_port_to_reach(parts):
            raise errors.InvalidInput(
                f"--server {shown!r}: a port of 0, or a ':' with no port: give 1 to 65535, or"
                " none for 443"
            )
        return cls(parts.hostname, port or 443, parts.path.rstrip("/"))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}{self.path}"


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes


def _spiffe_id(uri: str) -> SpiffeId | None:
    try:
        return SpiffeId.parse(uri)
    except errors.InvalidSpiffeId:
        return None


class ServerConnection:
    """Requests to one Trellis server, trusting only ``bundle`` and only its server identity."""

    def __init__(
        self, url: ServerUrl, bundle: Path, bundle_name: str, total_timeout: float = TOTAL_TIMEOUT
    ) -> None:
        self.url = url
        self.bundle_name = bundle_name
        self.total_timeout = total_timeout
        unreadable = errors.InvalidInput(f"{bundle_name}: cannot read the trust bundle")
        try:
            pem = bundle.read_bytes()
            roots = x509.load_pem_x509_certificates(pem)
            self.tls = ssl.create_default_context(cadata=pem.decode("ascii"))
        except (OSError, ValueError, ssl.SSLError):  # UnicodeDecodeError is a ValueError
            raise unreadable from None
        ids = {_spiffe_id(uri) for root in roots for uri in uri_sans(root)}
        domains = {i.trust_domain for i in ids if i is not None and i.is_trust_domain_id}
        if not domains:
            raise errors.InvalidInput(
                f"{bundle_name}: no root of a SPIFFE trust domain in it (not a Trellis bundle)"
            )
        self.server_ids = frozenset(SpiffeId.from_path(td, SERVER_PATH) for td in domains)
        self.roots = frozenset(roots)  # what a bundle the server hands out must keep one of

    def authenticate(self, tls: ssl.SSLSocket) -> None:
        """The authorizer: the verified peer must be Trellis's server identity, issued by a CA
        of Trellis's own, not by an Istio plug-in intermediate (``ca.profiles.is_istio_subject``:
        the peer's issuer is the subject of the CA OpenSSL verified it with)."""
        der = tls.getpeercert(binary_form=True)
        cert = x509.load_der_x509_certificate(der) if der else None
        uris = uri_sans(cert) if cert is not None else []
        if cert is None or len(uris) != 1 or _spiffe_id(uris[0]) not in self.server_ids:
            expected = " or ".join(sorted(str(i) for i in self.server_ids))
            held = ", ".join(uris)[:200] or "no SPIFFE ID"
            raise errors.Unavailable(
                f"{self.url} is not Trellis: its certificate is {held}, not {expected}; "
                "nothing was sent to it"
            )
        if is_istio_subject(cert.issuer):
            issuer = " ".join(cert.issuer.rfc4514_string().split())[:200]
            raise errors.Unavailable(
                f"{self.url} is not Trellis: its certificate {uris[0]} was issued by an Istio"
                f" plug-in intermediate ({issuer}), which can sign any SPIFFE ID of the trust"
                " domain, and Trellis's is never signed by one; nothing was sent to it"
            )

    def exchange(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        *,
        stop: Callable[[], bool] = lambda: False,
    ) -> Answer:
        """One request on a fresh connection whose peer was authenticated first.

        It runs in a worker thread while this one watches the clock and ``stop``: the socket's
        timeouts are per operation, so a peer trickling a byte every few seconds would hold a
        request for ever, and a signal handler can only set a flag, which a blocked read does
        not look at. Past ``total_timeout``, or once ``stop()`` is true, the socket is shut down
        under the worker (which then ends) and :class:`Stopped` or ``Unavailable`` is raised."""
        call = _Call(self, method, path, body, dict(headers or {}))
        worker = threading.Thread(target=call.run, name="trellis-request", daemon=True)
        worker.start()
        deadline = time.monotonic() + self.total_timeout
        while not call.done.wait(POLL):
            if stop():
                call.abort()
                raise Stopped
            if time.monotonic() >= deadline:
                call.abort()
                raise errors.Unavailable(
                    f"{self.url} gave no complete answer within {self.total_timeout:g} s"
                )
        if call.failure is not None:
            raise call.failure
        if call.answer is None:  # run() sets one or the other; never a bare assert here
            raise errors.InternalError(f"the request to {self.url} ended with no answer")
        return call.answer


def _unsendable(url: ServerUrl, exc: Exception) -> errors.TrellisError:
    """Anything else the worker meets, as a typed error for the waiting thread: left alone it
    ended the worker with a traceback and no answer, which the caller then took for one. Its
    message is never repeated: http.client's refusal of a header (``ValueError: Invalid header
    value b'Bearer ...'``) quotes the header, and with it the join token or renewal proof.
    A ``ValueError`` (``UnicodeEncodeError`` included) is that, or another part of the request
    that http.client or ssl will not encode: the caller's input. Anything else is a bug here."""
    what = type(exc).__name__
    if isinstance(exc, ValueError):
        return errors.InvalidInput(
            f"the request to {url} cannot be sent ({what}): a header or another part of it"
            " holds a character HTTP does not allow"
        )
    return errors.InternalError(f"the request to {url} failed before an answer ({what})")


class _Call:
    """One request, run by a worker thread; ``abort`` may be called from another."""

    def __init__(
        self, server: ServerConnection, method: str, path: str, body: bytes | None,
        headers: dict[str, str],
    ) -> None:  # fmt: skip
        self.server = server
        self.request = (method, server.url.path + path, body, headers)
        self.done = threading.Event()
        self.answer: Answer | None = None
        self.failure: errors.TrellisError | None = None
        self._lock = threading.Lock()
        self._aborted = False
        self._watch: socket.socket | None = None  # a duplicate of the connection's descriptor

    def abort(self) -> None:
        """Shut the connection down: shutdown(2) acts on the connection, not on the descriptor,
        so doing it through a duplicate ends a read blocked in the worker, without touching the
        SSL object the worker is using."""
        with self._lock:
            self._aborted = True
            if self._watch is not None:
                with contextlib.suppress(OSError):  # the worker was done with it already
                    self._watch.shutdown(socket.SHUT_RDWR)

    def run(self) -> None:
        url = self.server.url
        try:
            self.answer = self._exchange()
        except errors.TrellisError as exc:
            self.failure = exc
        except (OSError, http.client.HTTPException) as exc:  # SSLCertVerificationError too
            self.failure = errors.Unavailable(f"cannot reach {url}: {exc}")
        except Exception as exc:  # lost with the thread otherwise: see _unsendable
            self.failure = _unsendable(url, exc)
        finally:
            with self._lock:
                if self._watch is not None:
                    self._watch.close()
            self.done.set()

    def _exchange(self) -> Answer:
        url = self.server.url
        raw = socket.create_connection((url.host, url.port), timeout=CONNECT_TIMEOUT)
        with self._lock:
            if self._aborted:
                raw.close()
                raise errors.Unavailable("aborted")
            self._watch = raw.dup()
        try:
            tls = self.server.tls.wrap_socket(raw, server_hostname=url.host)
        except BaseException:
            raw.close()
            raise
        connection = http.client.HTTPConnection(url.host, url.port)
        connection.auto_open = 0  # never a second, unchecked connection
        connection.sock = tls
        try:
            self.server.authenticate(tls)
            tls.settimeout(READ_TIMEOUT)
            method, target, body, headers = self.request
            connection.request(method, target, body=body, headers=headers)
            response = connection.getresponse()
            content = response.read(MAX_ANSWER + 1)
        finally:
            connection.close()
        if len(content) > MAX_ANSWER:
            raise errors.Unavailable(f"{url} answered more than {MAX_ANSWER} bytes")
        return Answer(response.status, content)
