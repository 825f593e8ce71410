"""A uvicorn Config whose TLS certificate follows the file on disk.

uvicorn reads its certificate once per process. Trellis renews its own serving certificate (and
short-lived CAs rotate under a running server), so each process, worker processes included,
watches the file and loads a new chain into its live SSL context; new handshakes use it.

A pair that cannot be loaded at start-up is ``ServingTlsUnusable``, naming the file: ssl's own
errors did not (``No such file or directory``), and a worker of ``serve --workers N`` that
died of one was started again, forever, each time with a traceback (``cli.supervisor``).

It also carries the limits ``cli.http``'s protocol enforces, which uvicorn's Config has no
options for, to every process that serves: the supervisor builds its workers' from JSON.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import uvicorn

from ca.connlimits import MAX_CONNECTIONS, REQUEST_TIMEOUT
from ca.errors import Unavailable

log = logging.getLogger("trellis.serve")
WATCH_SECONDS = 5.0
# The key and the certificate are two files, renewed one after the other (by the scheduler, even
# while a worker starts): a load between the two writes sees a mismatched pair. Wait it out.
LOAD_ATTEMPTS, LOAD_PAUSE = 40, 0.05
_T = TypeVar("_T")
# Mozilla's "intermediate" TLS 1.2 suites, as RFC 9325 §4.2 recommends: forward secret and AEAD
# only. Python's default (uvicorn passes "TLSv1") let TLS 1.2 clients pick CBC suites with
# HMAC-SHA1/SHA2 (ECDHE-ECDSA-AES256-SHA384 and the like). RSA suites are there for a serving key
# that is RSA; Trellis issues its own as EC P-256. TLS 1.3's suites are all AEAD and untouched.
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)


class ServingTlsUnusable(Unavailable):
    """The serving certificate and key cannot be loaded: every start would fail the same way
    until someone (or ``serve``, which re-issues them) puts a good pair in place."""


class ReloadingConfig(uvicorn.Config):
    def __init__(
        self,
        app: Any,
        *,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
        **options: Any,
    ) -> None:
        if options.get("ssl_certfile") and "ssl_context_factory" not in options:
            options["ssl_context_factory"] = _load_tls
        super().__init__(app, **options)
        self.max_connections = max_connections
        self.request_timeout = request_timeout

    def load(self) -> None:
        # Made here, not in __init__: the supervisor pickles its config to each worker.
        self.reloading = threading.Lock()  # the watcher and a SIGHUP, one live load at a time
        super().load()
        if self.ssl is not None and self.ssl_certfile and self.ssl_keyfile:
            thread = threading.Thread(target=self._watch, name="tls-reload", daemon=True)
            thread.start()

    def reload_tls(self) -> bool:
        """Loads the pair on disk into the live context now (the watcher does so within
        ``WATCH_SECONDS`` of a change); whether it did. A pair that does not load is a warning
        naming the file and leaves the old one serving: it is tried on a context of its own
        first, as a failed load leaves the new certificate beside the old key in the live one,
        which then fails every handshake. A mismatched pair is waited for, as at start-up: a
        renewal writes the key, then the certificate."""
        if self.ssl is None or not self.ssl_certfile:
            return False
        pair = (str(self.ssl_certfile), self.ssl_keyfile)
        with self.reloading:
            return self._reload(self.ssl, pair)

    def _reload(self, live: ssl.SSLContext, pair: tuple[str, str | None]) -> bool:
        def load() -> None:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(*pair)
            # A renewal's rename between the trial and this load fails it: tried again.
            live.load_cert_chain(*pair)

        try:
            _once_matched(load)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.warning("cannot reload the serving certificate: %s", _why(self, exc))
            return False
        log.info("reloaded the serving certificate")
        return True

    def _watch(self) -> None:
        """Reloads the pair once either file changes. It loaded the certificate into the live
        context itself: one that did not match its key stopped every handshake until the
        next renewal (for as long as the database or Vault was down)."""
        files = (Path(str(self.ssl_certfile)), Path(str(self.ssl_keyfile)))
        seen = _stamp(files)
        stop = threading.Event()
        while not stop.wait(WATCH_SECONDS):
            stamp = _stamp(files)
            if stamp != seen:
                # Tried once per change, not every round: a bad pair is one warning, and
                # the next write to either file (a renewal, an operator's fix) tries again.
                seen = stamp
                self.reload_tls()


def _stamp(files: tuple[Path, ...]) -> tuple[int | None, ...]:
    """The files' modification times; None for one that cannot be read."""
    stamps: list[int | None] = []
    for path in files:
        try:
            stamps.append(path.stat().st_mtime_ns)
        except OSError:
            stamps.append(None)
    return tuple(stamps)


def _load_tls(config: uvicorn.Config, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """uvicorn's context, TLS 1.2 or later with ``TLS12_CIPHERS``, with a mismatched pair waited
    for (a renewal under way) and any other failure named: ``ServingTlsUnusable``. Every
    process builds its context here, a worker of ``--workers N`` and one a SIGHUP restarts
    included; a reload loads a pair into the same context, which keeps its settings."""
    try:
        context = _once_matched(default)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ServingTlsUnusable(
            f"cannot load the serving certificate: {_why(config, exc)}"
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    return context


def _once_matched(load: Callable[[], _T]) -> _T:
    """``load()``, tried again for up to ``LOAD_ATTEMPTS`` while the pair on disk does not
    match: a renewal writes the key, then the certificate. Any other failure is raised."""
    for _ in range(LOAD_ATTEMPTS - 1):
        try:
            return load()
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" not in str(exc):
                raise
            time.sleep(LOAD_PAUSE)
    return load()


def _why(config: uvicorn.Config, exc: Exception) -> str:
    """``exc`` with the file it is about: ssl names none."""
    cert, key = str(config.ssl_certfile), str(config.ssl_keyfile or config.ssl_certfile)
    for path in dict.fromkeys((cert, key)):
        try:
            Path(path).read_bytes()
        except OSError as error:
            return f"{path}: {error.strerror or error}"
    if isinstance(exc, ssl.SSLError) and "KEY_VALUES_MISMATCH" in str(exc):
        return f"the key {key} does not match the certificate {cert}"
    reason = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else exc
    return f"{cert} with the key {key}: {reason}"
