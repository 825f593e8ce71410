"""uvicorn's httptools protocol, writing each response to the socket in one piece.

uvicorn writes a response's head and its body with two ``transport.write`` calls. Over TLS each
is a record of its own, and each is a ``write`` system call which, on loopback or any fast
network, also runs the receiving side's TCP work and wakes the client: two of everything per
response. ``Corked`` gathers what the protocol writes during one turn of the event loop and
writes it once at the end of that turn, as ``TCP_CORK`` would in the kernel. Two workers at
c=16, six alternated pairs: 1,961 → 2,132 certs/s on average, one write per response instead of
1.5 (``strace -c``; docs/benchmarks.md, change 40).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["Corked", "CorkedHttpToolsProtocol"]


class Corked:
    """A transport that delays writes to the end of the loop's current turn, in order, as one.
    Everything else (closing, flow control, extra info) is the transport's own; closing writes
    what is pending first."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def _flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CorkedHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(Corked(transport))  # type: ignore[arg-type]
