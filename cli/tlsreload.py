"""A uvicorn Config whose TLS certificate follows the file on disk.

uvicorn reads its certificate once per process. Trellis renews its own serving certificate (and
short-lived CAs rotate under a running server), so each process, worker processes included,
watches the file and loads a new chain into its live SSL context; new handshakes use it.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from pathlib import Path

import uvicorn

log = logging.getLogger("trellis.serve")
WATCH_SECONDS = 5.0
# The key and the certificate are two files, renewed one after the other (by the scheduler, even
# while a worker starts): a load between the two writes sees a mismatched pair. Wait it out.
LOAD_ATTEMPTS, LOAD_PAUSE = 40, 0.05


class ReloadingConfig(uvicorn.Config):
    def load(self) -> None:
        for attempt in range(LOAD_ATTEMPTS):
            try:
                super().load()
                break
            except ssl.SSLError as exc:
                if "KEY_VALUES_MISMATCH" not in str(exc) or attempt == LOAD_ATTEMPTS - 1:
                    raise
                time.sleep(LOAD_PAUSE)
        if self.ssl is not None and self.ssl_certfile and self.ssl_keyfile:
            thread = threading.Thread(target=self._watch, name="tls-reload", daemon=True)
            thread.start()

    def _watch(self) -> None:
        cert, key = Path(str(self.ssl_certfile)), Path(str(self.ssl_keyfile))
        seen = cert.stat().st_mtime
        stop = threading.Event()
        while not stop.wait(WATCH_SECONDS):
            try:
                mtime = cert.stat().st_mtime
                if mtime != seen and self.ssl is not None:
                    self.ssl.load_cert_chain(cert, key)
                    seen = mtime
                    log.info("reloaded the serving certificate")
            except (OSError, ValueError) as exc:  # mid-rename or a bad file: try again later
                log.warning("cannot reload the serving certificate: %s", exc)
