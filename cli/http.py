"""uvicorn's httptools protocol, writing each response's head and body to the socket as one.

uvicorn writes a response's head and its body with two ``transport.write`` calls. Over TLS each
is a record of its own, and each is a ``write`` system call which, on loopback or any fast
network, also runs the receiving side's TCP work and wakes the client: two of everything per
response. ``Corked`` holds a response head back until the next write (the body, in the same
step of the same task) and writes both at once; a head with nothing after it in that turn of
the loop (``100 Continue``, a streamed body still to come) is written at the end of the turn.
Only heads wait: holding every write to the end of the turn delayed responses behind whatever
else the loop had ready (with PostgreSQL, the signing of the next requests), and cost 10 % of
the throughput there (docs/benchmarks.md, change 40).

``CorkedHttpToolsProtocol`` also bounds what a client can make the server hold, which uvicorn's
httptools protocol does not (its h11 limit does not apply here, and it has no read deadline):

* a request head (request line and headers) over ``MAX_HEAD`` bytes or ``MAX_HEADERS`` fields is
  answered 431 (414 for the URL alone) as soon as it is seen, and the connection closed;
* a head must arrive within ``request_timeout`` seconds of the connection's handshake or of its
  first byte after the previous response (until then uvicorn's keep-alive timeout applies), and
  the body within as long again after the head: else 408 and the connection is closed;
* past ``max_connections`` open connections in this process a new one is answered 503 and
  closed, before it can hold a descriptor for longer.

These refusals are problem documents like the application's (``api.problems``), as is a
request that does not parse (400).
"""

from __future__ import annotations

import asyncio
import http
import logging
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.problems import problem_response
from ca.connlimits import MAX_CONNECTIONS, REQUEST_TIMEOUT

__all__ = ["MAX_HEAD", "MAX_HEADERS", "Corked", "CorkedHttpToolsProtocol"]

log = logging.getLogger("trellis.serve")

# A request head's bytes (request line and header fields), nginx's default for a whole head
# (large_client_header_buffers 4 8k); Trellis's own requests send a few hundred. Counted as
# received, so that a connection holds at most this much of a head plus one read.
MAX_HEAD = 32 * 1024
# Header fields in a head: each costs Python objects worth ~20 times its smallest size.
MAX_HEADERS = 100
# Seconds a refused connection is given to take its answer and close: a TLS transport closing
# waits for the client's close_notify, for 30 s, holding the descriptor; a client that sends
# none is cut off after this.
CLOSE_GRACE = 2.0


class Corked:
    """A transport that writes a response head together with what follows it. Everything else
    (closing, flow control, extra info) is the transport's own; closing writes a held head
    first."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._head: bytes | None = None
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        data = bytes(data)
        if self._head is not None:
            data, self._head = self._head + data, None
        elif data.startswith(b"HTTP/") and data.endswith(b"\r\n\r\n"):
            self._head = data
            self._loop.call_soon(self._flush)
            return
        self._transport.write(data)

    def _flush(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            if not self._transport.is_closing():
                self._transport.write(head)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a head that is refused: the arguments
    of ``problem_response``."""

    def __init__(self, status: int, code: str, title: str, detail: str) -> None:
        super().__init__(detail)
        self.problem = (status, code, title, detail)


def _head_too_large(detail: str) -> _Refused:
    return _Refused(431, "header-too-large", "Request header too large", detail)


class CorkedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # ``cli.tlsreload.ReloadingConfig`` carries Trellis's settings; a plain uvicorn Config
        # gets the defaults.
        self.request_timeout: float = getattr(self.config, "request_timeout", REQUEST_TIMEOUT)
        self.max_connections: int = getattr(self.config, "max_connections", MAX_CONNECTIONS)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase = "idle"  # "head": from a message's first byte; "body": after its head
        self._head_bytes = 0  # of the head being received, counted per read while incomplete
        self._header_bytes = 0  # of its header fields, counted as the parser completes them
        self._lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(Corked(transport))  # type: ignore[arg-type]
        if len(self.connections) > self.max_connections:
            log.warning("refused a connection: %d open", len(self.connections) - 1)
            self._refuse(503, "too-many-connections", "Too many connections", "retry later")
            return
        self._arm()  # the head deadline: nothing has arrived yet

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return  # refused or timed out: the rest is never read
        self._unset_keepalive_if_required()
        if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # a head begins, after the keep-alive wait or on a new connection
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as error:
            if not isinstance(error.__context__, _Refused):
                raise
            log.info("refused a request: %s", error.__context__)
            self._refuse(*error.__context__.problem)
            return
        except httptools.HttpParserError:
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._phase == "head":
            # Still incomplete: the parser holds the partial field, which its callbacks have not
            # counted yet. (A read that also ended a pipelined request before counts whole.)
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._refuse(
                    *_head_too_large(f"request heads are limited to {MAX_HEAD} bytes").problem
                )

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, "invalid-request", "Invalid request", msg)

    # Parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase, self._head_bytes, self._header_bytes = "head", 0, 0
        if self._deadline is None:
            self._arm()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > MAX_HEAD:
            raise _Refused(
                414, "uri-too-long", "URI too long", f"request URLs are limited to {MAX_HEAD} bytes"
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4  # ": " and CRLF
        if len(self.headers) >= MAX_HEADERS:
            raise _head_too_large(f"requests are limited to {MAX_HEADERS} header fields")
        if len(self.url) + self._header_bytes > MAX_HEAD:
            raise _head_too_large(f"request heads are limited to {MAX_HEAD} bytes")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._phase = "body"
        self._arm()  # the body deadline, from the end of the head
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._phase = "idle"
        self._disarm()
        super().on_message_complete()

    # Deadlines and refusals

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        what = "body" if self._phase == "body" else "head"
        log.info("closed a connection: no complete request %s in %gs", what, self.request_timeout)
        if self._phase == "body" and self.cycle is not None and self.cycle.response_started:
            self._close()  # answered already (without waiting for the body)
            return
        self._refuse(
            408,
            "request-timeout",
            "Request timeout",
            f"the request {what} did not arrive within {self.request_timeout:g} seconds",
        )

    def _refuse(self, status: int, code: str, title: str, detail: str) -> None:
        """Answer ``status`` with a problem document unless a response is under way (one of an
        earlier, pipelined request's: it would be cut into), and close the connection. The
        request's application task, if any, sees the client gone."""
        self._disarm()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:
                self._close()
                return
            cycle.disconnected = True  # whatever the application still sends is dropped
            cycle.message_event.set()
        if not self.transport.is_closing():
            body = problem_response(status, code, title, detail).body
            head = (
                f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
                "content-type: application/problem+json\r\n"
                f"content-length: {len(body)}\r\n"
                "connection: close\r\n\r\n"
            )
            self.transport.write(head.encode("ascii") + bytes(body))
            self._close()

    def _close(self) -> None:
        self.transport.close()
        self.loop.call_later(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        if not self._lost:
            self.transport.abort()
