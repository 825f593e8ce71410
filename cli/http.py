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
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["Corked", "CorkedHttpToolsProtocol"]


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


class CorkedHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(Corked(transport))  # type: ignore[arg-type]
