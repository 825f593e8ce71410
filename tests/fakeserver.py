"""A TLS server on loopback that poses as Trellis, for the workload client's tests: it presents
whatever certificate it is given (a workload's SVID, the real serving certificate), records every
byte a client sends after the handshake, and answers as told (a canned response, nothing at all,
or one byte at a time)."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["FakeServer", "fake_server", "http_answer"]


def http_answer(
    body: bytes, status: str = "200 OK", content_type: str = "application/json"
) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


@dataclass
class FakeServer:
    port: int
    answer: bytes = b""  # sent once the request's head has arrived
    trickle: float | None = None  # seconds between the answer's bytes; None: all at once
    silent: bool = False  # accept, then say nothing (not even the TLS handshake)
    received: list[bytes] = field(default_factory=list)  # per connection, after the handshake
    accepted: int = 0  # TCP connections
    handshakes: int = 0
    finished: int = 0  # connections done with, by either side

    def settled(self, timeout: float = 5.0) -> None:
        """Wait until every accepted connection is done with: a client that refused the
        certificate returns while this side may still be finishing its handshake."""
        deadline = time.monotonic() + timeout
        while self.finished < self.accepted and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.finished == self.accepted, (self.accepted, self.finished)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def everything(self) -> bytes:
        return b"".join(self.received)


def _serve_one(server: FakeServer, tls: ssl.SSLSocket, stop: threading.Event) -> None:
    got = bytearray()
    server.received.append(b"")
    index = len(server.received) - 1
    tls.settimeout(0.2)
    while not stop.is_set() and b"\r\n\r\n" not in got:
        try:
            chunk = tls.recv(65536)
        except TimeoutError:
            continue
        except (OSError, ssl.SSLError):
            break
        if not chunk:
            break
        got += chunk
        server.received[index] = bytes(got)
    try:
        if server.trickle is None:
            tls.sendall(server.answer)
        else:
            for byte in server.answer:
                if stop.wait(server.trickle):
                    break
                tls.sendall(bytes([byte]))
        # The rest of a body (up to Content-Length) is not awaited before answering: closing
        # on it unread would reset a connection the client may still be reading the answer
        # from. Read on until the client closes (it has the answer), or 0.1 s passes quietly;
        # a fixed 0.1 s held every next connection up that long.
        tls.settimeout(0.1)
        while tls.recv(65536):
            pass
    except OSError:  # the quiet 0.1 s (TimeoutError), or the client going away
        pass


def _accept(
    server: FakeServer, listener: socket.socket, context: ssl.SSLContext, stop: threading.Event
) -> None:
    listener.settimeout(0.1)
    while not stop.is_set():
        try:
            raw, _ = listener.accept()
        except TimeoutError:
            continue
        server.accepted += 1
        if server.silent:
            stop.wait()
            raw.close()
            continue
        try:
            raw.settimeout(5)
            with context.wrap_socket(raw, server_side=True) as tls:
                server.handshakes += 1
                _serve_one(server, tls, stop)
        except (OSError, ssl.SSLError):  # a client that refused our certificate
            raw.close()
        finally:
            server.finished += 1


@contextmanager
def fake_server(chain: Path, key: Path, **behaviour: object) -> Iterator[FakeServer]:
    """Serve on a free loopback port until the block ends."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain, key)
    listener = socket.create_server(("127.0.0.1", 0))
    server = FakeServer(listener.getsockname()[1], **behaviour)  # type: ignore[arg-type]
    stop = threading.Event()
    thread = threading.Thread(target=_accept, args=(server, listener, context, stop), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(5)
        listener.close()
