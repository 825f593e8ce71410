"""The server of a single-process ``trellis serve`` (the default: ``make run``, the systemd
unit, ``--workers 1``): uvicorn's, with SIGHUP handled and a stop's exit status that of
``--workers N`` (docs/operations.md, "Shutdown").

* SIGHUP killed the process at once (Python's default): the requests under way got EOF, and
  nothing was logged. With no workers to replace, it re-reads the serving certificate and key
  from disk, as each worker does on its restart, and the server goes on.
* SIGTERM and SIGINT stop it gracefully, then uvicorn raised the signal again: SIGTERM's death
  by signal 15 and SIGINT's exit 130 said the service failed where the supervisor's was exit 0.
  A graceful stop asked for is now exit 0 either way, which is what systemd expects of a stop.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from types import FrameType

import uvicorn

from cli.tlsreload import ReloadingConfig

__all__ = ["SingleServer"]

log = logging.getLogger("trellis.serve")


class SingleServer(uvicorn.Server):
    def __init__(self, config: ReloadingConfig) -> None:
        super().__init__(config)
        self.reloading = config

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        previous = signal.signal(signal.SIGHUP, self._hangup)
        try:
            super().run(sockets)
        finally:
            signal.signal(signal.SIGHUP, previous)

    async def _serve(self, sockets: list[socket.socket] | None = None) -> None:
        await super()._serve(sockets)
        self._captured_signals.clear()  # stopped as asked: not raised again on the way out

    def _hangup(self, signum: int, frame: FrameType | None) -> None:
        # Off the handler: it interrupts the main thread wherever it is, a log call included.
        threading.Thread(target=self._reload, name="sighup", daemon=True).start()

    def _reload(self) -> None:
        if self.reloading.ssl is None:  # --no-tls, or not started yet: nothing to re-read
            log.info("SIGHUP: ignored (a single process has no workers to replace)")
            return
        log.info("SIGHUP: a single process has no workers to replace; reloading the certificate")
        self.reloading.reload_tls()
