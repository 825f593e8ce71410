"""The process ``trellis serve --workers N`` becomes once its start-up checks have passed.

``serve`` checks the CA, performs overdue transitions, unlocks every key and prepares the serving
certificate: that needs the whole CA in memory (~100 MiB). Then it replaces itself (``exec``, so
the process id, and with it systemd's and Kubernetes' view of the service, stays the same) with
this module, which imports only uvicorn: it binds the socket, starts the workers, restarts any
that die and stops them on SIGTERM. The workers serve requests and one of them runs the scheduled
jobs (``api.asgi``).

Invoked as ``python -m cli.supervisor '<json>' FD`` with uvicorn's options and the listening
socket ``serve`` bound (and reported failing to bind) before it replaced itself.

The supervisor alone accepts connections and hands each to the worker holding the fewest
(``Dispatcher``; the descriptor travels over a Unix socket pair, ``SCM_RIGHTS``), which then does
the TLS handshake and serves it. Clients keep their connections open for many requests, so where
a connection lands decides a worker's share of the load for as long as it lives:

* one listening socket shared by the workers: whichever woke first accepted every queued
  connection, so 16 keep-alive clients connecting at once all landed on one worker, which did all
  the work on one core while the other idled;
* a listening socket per worker (``SO_REUSEPORT``, used before): the kernel picks one by a hash
  of the addresses, so the 16 split 8/8 one time and 3/13 the next, and an API gateway's two
  pooled connections often shared a worker.

Counting needs no round trip: the supervisor counts what it handed out and each worker counts,
in shared memory, the connections it is done with, as soon as its loop sees them end.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import multiprocessing
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess
from uvicorn.supervisors.multiprocess import Process

from ca.errors import TrellisError
from ca.logs import configure_logging, debugging
from cli.tlsreload import ReloadingConfig

logger = logging.getLogger("uvicorn.error")

__all__ = ["Dispatcher", "HandingSupervisor", "StartLimit", "command", "main"]

# How often the dispatcher looks up from accept() to notice a shutdown.
POLL_SECONDS = 0.2
# The first connection after a quiet spell waits this long before it is handed out. Clients that
# reconnect (a restarted gateway, a load generator's next run) close their old connections a few
# milliseconds before opening new ones, and a worker counts a close only when its loop next
# turns: handed out at once, the new connections would go by counts still holding the old ones.
QUIET_SECONDS, SETTLE_SECONDS = 0.5, 0.02
# A worker that does not take a connection from its socket pair within this (hung, or its
# buffer full) loses it to the next worker.
HAND_TIMEOUT = 1.0
# A worker could not start: 'trellis serve' fails as a single process does on the same cause
# (cli.common.EXIT_CODES[Unavailable]; that module is too heavy to import here).
EXIT_UNAVAILABLE = 8
# Workers that die before they are ready this many times within this many seconds, whatever
# killed them, stop the service, as systemd's StartLimitBurst= and StartLimitIntervalSec= stop
# a unit (docs/operations.md, "How requests are served").
START_LIMIT_BURST, START_LIMIT_SECONDS = 5, 60.0


# --- in the supervisor --------------------------------------------------------------------------


@dataclass
class Slot:
    """One worker as the dispatcher sees it: where to send connections and how many it holds."""

    channel: socket.socket  # the supervisor's end of the worker's socket pair
    finished: Any  # the worker's count of connections it is done with (shared memory)
    handed: int = 0

    @property
    def load(self) -> int:
        return self.handed - int(self.finished.value)


class Dispatcher(threading.Thread):
    """Accepts every connection and hands it to the worker with the fewest open ones."""

    def __init__(self, listener: socket.socket, slots: int) -> None:
        super().__init__(name="dispatcher", daemon=True)
        self.listener = listener
        self.slots: list[Slot | None] = [None] * slots
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def install(self, index: int, slot: Slot) -> None:
        """Route new connections for position ``index`` to ``slot`` (a new or restarted worker)."""
        with self.lock:
            old, self.slots[index] = self.slots[index], slot
        if old is not None:
            old.channel.close()

    def stop(self) -> None:
        """No more connections: the kernel refuses them from now on instead of queueing them."""
        self.stopping.set()
        self.join(timeout=2 * POLL_SECONDS + 1)
        self.listener.close()

    def run(self) -> None:
        self.listener.setblocking(False)
        last = 0.0
        while not self.stopping.is_set():
            readable, _, _ = select.select([self.listener], [], [], POLL_SECONDS)
            if not readable:
                continue
            if time.monotonic() - last > QUIET_SECONDS:
                self.stopping.wait(SETTLE_SECONDS)
            last = time.monotonic()
            while True:
                try:
                    connection, _ = self.listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:  # EMFILE and the like: log, back off, keep serving
                    logger.warning("cannot accept a connection: %s", exc)
                    self.stopping.wait(POLL_SECONDS)
                    break
                with connection:
                    try:
                        self.hand(connection)
                    except Exception:  # never let one connection stop the accepting
                        logger.exception("cannot hand a connection to a worker")

    def hand(self, connection: socket.socket) -> bool:
        # Under the lock throughout: a channel closed by ``install`` while a send is under way
        # could have its descriptor number reused by the next socket pair.
        with self.lock:
            candidates = sorted(
                (slot for slot in self.slots if slot is not None), key=lambda s: s.load
            )
            for slot in candidates:
                try:
                    socket.send_fds(slot.channel, [b"c"], [connection.fileno()])
                except OSError:  # that worker is gone or stuck; its restart installs a new slot
                    continue
                slot.handed += 1
                return True
        logger.warning("no worker took a connection; closed it")
        return False


class StartLimit:
    """Counts the workers that died before they were ready. One killed by a signal while it
    started (SIGKILL from an operator, the OOM killer) is replaced; but one killed on every
    start (a segfault in the code it loads, a memory limit it always exceeds) was replaced
    forever, a new one every second, and the service never exited for systemd's
    ``Restart=on-failure`` to see. ``burst`` such deaths within ``seconds`` are that."""

    def __init__(
        self, burst: int, seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.burst, self.seconds, self.clock = burst, seconds, clock
        self.deaths: collections.deque[float] = collections.deque(maxlen=burst)

    def reached(self) -> bool:
        """Records one more death before readiness: whether it makes ``burst`` in ``seconds``."""
        self.deaths.append(self.clock())
        return len(self.deaths) == self.burst and self.deaths[-1] - self.deaths[0] <= self.seconds


def _death(status: int) -> str:
    """How a worker ended, as a line can say it: 'killed by SIGKILL', 'exit status 1'."""
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-status).name}"
        return f"killed by signal {-status}"
    return f"exit status {status}"


class HandingSupervisor(Multiprocess):
    """uvicorn's supervisor (signals, health pings, restarts) with a ``Dispatcher`` in front: the
    three places uvicorn 0.54 creates a worker give it a socket pair and install it."""

    def __init__(self, config: ReloadingConfig, listener: socket.socket) -> None:
        super().__init__(config, [])
        self.dispatcher = Dispatcher(listener, self.processes_num)
        self.failed = False  # a worker could not start: the service exits EXIT_UNAVAILABLE
        self.start_limit = StartLimit(START_LIMIT_BURST, START_LIMIT_SECONDS)

    def _worker(self) -> tuple[Process, Slot]:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        mine.settimeout(HAND_TIMEOUT)
        spawn = multiprocessing.get_context("spawn")
        finished, ready = spawn.RawValue("Q", 0), spawn.RawValue("B", 0)
        process = HandedProcess(self.config, theirs, finished, ready)
        process.start()
        theirs.close()  # the worker has its own copy now
        return process, Slot(mine, finished)

    def init_processes(self) -> None:
        for index in range(self.processes_num):
            process, slot = self._worker()
            self.processes.append(process)
            self.dispatcher.install(index, slot)
        self.dispatcher.start()

    def terminate_all(self) -> None:
        self.dispatcher.stop()
        super().terminate_all()

    def keep_subprocess_alive(self) -> None:
        """Replaces a worker that died after it was ready. One that exited by itself before
        (a failure of its own, not a signal) would fail the same way on every start, as
        gunicorn's "Worker failed to boot" does: its settings, its data dir, its passphrase or
        its code. Restarted, it failed again every few seconds, forever, and the service never
        exited for systemd's ``Restart=on-failure`` to see. A worker killed by a signal while it
        started (an operator, the OOM killer) is replaced, up to the ``StartLimit``."""
        for index, process in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            timeout = self.config.timeout_worker_healthcheck
            if process.is_alive(timeout=timeout):
                continue
            # Still running, it missed the health check: hung (or stopped, SIGSTOP), killed
            # here. Said so: "died" read as a crash of its own, with nothing to look for.
            hung = process.process.is_alive()
            process.kill()
            process.join()
            status, ready = process.exitcode or 0, bool(process.ready.value)
            if hung:
                logger.warning(
                    "worker [%s] did not answer its health check within %g s (hung or"
                    " stopped): killed",
                    process.pid,
                    timeout,
                )
            if status == STARTUP_FAILURE or (status > 0 and not ready):
                self._stop(
                    "worker [%s] cannot start (its line above says why): stopping", process.pid
                )
                return
            if ready:
                logger.info("worker [%s] died; starting another", process.pid)
            elif self.start_limit.reached():
                self._stop(
                    "workers died before they were ready %d times within %d s (the last,"
                    " [%s]: %s): stopping",
                    START_LIMIT_BURST,
                    START_LIMIT_SECONDS,
                    process.pid,
                    _death(status),
                )
                return
            else:
                logger.warning(
                    "worker [%s] died before it was ready (%s); starting another",
                    process.pid,
                    _death(status),
                )
            self.processes[index], slot = self._worker()
            self.dispatcher.install(index, slot)

    def _stop(self, message: str, *args: object) -> None:
        logger.error(message, *args)
        self.failed = True
        self.should_exit.set()

    def restart_all(self) -> None:
        """SIGHUP: replace each worker in turn; new connections go to the new one once it is
        ready, the old one finishes the requests it has. A new one that does not start (a
        serving pair that does not load) abandons the restart, the old workers serving on, in a
        warning: that was silent, the worker's own line the only trace."""
        for index, old in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new, slot = self._worker()
            timeout = self.config.timeout_worker_healthcheck
            if not new.wait_until_ready(timeout, self.should_exit):
                hung = new.process.is_alive()
                new.kill()
                new.join()
                slot.channel.close()
                if not self.should_exit.is_set():
                    status = new.exitcode or 0
                    why = (
                        f"not ready within {timeout} s"
                        if hung
                        else "its line above says why"
                        if status == STARTUP_FAILURE
                        else _death(status)
                    )
                    logger.warning(
                        "SIGHUP: abandoned the restart of the workers: worker [%s] did not start"
                        " (%s); %d of %d replaced, the old ones keep serving",
                        new.pid,
                        why,
                        index,
                        len(self.processes),
                    )
                return
            self.dispatcher.install(index, slot)
            old.terminate()
            old.join()
            self.processes[index] = new


# --- in a worker -------------------------------------------------------------------------------


class HandedProcess(Process):
    """A uvicorn worker process whose server takes connections from the supervisor."""

    def __init__(
        self, config: uvicorn.Config, channel: socket.socket, finished: Any, ready: Any
    ) -> None:
        # Before start(): the process object travels to the child. ``ready``, shared memory,
        # is set once the worker has started and serves: the supervisor's only sure way to
        # tell a worker that never started from one that crashed after serving.
        self.finished, self.ready = finished, ready
        super().__init__(config, [channel])

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = HandedServer(self.config, self.finished, self.ready)
        return self._server

    def target(self, sockets: list[socket.socket] | None = None) -> None:
        """The worker's life, its failures as log lines: Python printed an uncaught exception
        as a raw traceback among the JSON lines. One that would repeat on every start (the
        serving certificate cannot be loaded, or anything else before it is ready) is
        ``STARTUP_FAILURE``, which stops the supervisor; restarted, the worker died again every
        second, forever, and systemd's ``Restart=on-failure`` never saw the service fail. The
        reason is one line: a Trellis error's own sentence, else the exception's type and text
        with its traceback attached (a bug, or an install broken under the service)."""
        configure_logging(debug=debugging())  # what it logs before the app's factory does
        try:
            super().target(sockets)
        except Exception as exc:
            if self.ready.value:
                logger.exception("worker [%d] failed", os.getpid())
                sys.exit(1)
            known = isinstance(exc, TrellisError)
            reason = exc.detail if known else f"{type(exc).__name__}: {exc}"
            logger.error(
                "worker [%d] cannot start: %s",
                os.getpid(),
                " ".join(reason.split()),  # pydantic's and libpq's texts span lines
                exc_info=None if known else exc,
            )
            sys.exit(STARTUP_FAILURE)


class HandedServer(uvicorn.Server):
    """uvicorn's server, with no listening socket: it serves the connections that arrive on its
    socket pair, exactly as it would serve accepted ones."""

    def __init__(self, config: uvicorn.Config, finished: Any, ready: Any) -> None:
        super().__init__(config)
        self.finished, self.ready = finished, ready
        self.channel: socket.socket | None = None
        self.adopting: set[asyncio.Task[None]] = set()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        (channel,) = sockets or []
        await super().startup(sockets=[])  # the lifespan (the app's start-up); no listener
        finished = self.finished
        base: Any = self.config.http_protocol_class

        class Counted(base):  # type: ignore[misc]
            """Counts itself done however the connection ends."""

            made = False

            def connection_made(self, transport: Any) -> None:
                self.made = True
                super().connection_made(transport)

            def connection_lost(self, exc: Exception | None) -> None:
                try:
                    super().connection_lost(exc)
                finally:
                    finished.value += 1

        self.protocol_class = Counted
        channel.setblocking(False)
        self.channel = channel
        asyncio.get_running_loop().add_reader(channel.fileno(), self._receive)
        self.ready.value = 1

    def _receive(self) -> None:
        assert self.channel is not None
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.channel, 1, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                data, fds = b"", []
                logger.error("lost the supervisor's socket pair: %s", exc)
            if not data:  # the supervisor is gone: nobody hands out connections any more
                self._close_channel()
                self.should_exit = True
                return
            if not fds:  # dropped by the kernel (this process is out of descriptors)
                logger.warning("a connection handed over was lost: no descriptor left")
                self.finished.value += 1
                continue
            connection = socket.socket(fileno=fds[0])
            task = asyncio.get_running_loop().create_task(self._adopt(connection))
            self.adopting.add(task)
            task.add_done_callback(self.adopting.discard)

    async def _adopt(self, connection: socket.socket) -> None:
        config, protocol = self.config, None

        def create_protocol() -> asyncio.Protocol:
            nonlocal protocol
            protocol = self.protocol_class(
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )
            return protocol

        with contextlib.suppress(OSError):
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                create_protocol, connection, ssl=config.ssl
            )
        except Exception as exc:  # a client that fails its handshake is routine
            logger.debug("connection failed before its first request: %s", exc)
            connection.close()
            if protocol is None or not protocol.made:
                self.finished.value += 1

    def _close_channel(self) -> None:
        if self.channel is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self.channel.fileno())
            self.channel.close()
            self.channel = None

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._close_channel()
        await super().shutdown(sockets=[])


def command(options: dict[str, object], listener: int) -> list[str]:
    """The argv ``serve`` execs into; ``listener``: the descriptor of its bound socket."""
    return [sys.executable, "-m", "cli.supervisor", json.dumps(options), str(listener)]


def main(argv: list[str]) -> None:
    encoded, descriptor = argv
    options = json.loads(encoded)
    configure_logging(debug=debugging())
    logging.getLogger("trellis.serve").info(
        "supervising %d workers on %s:%d", options["workers"], options["host"], options["port"]
    )
    config = ReloadingConfig(
        "api.asgi:app_from_environment",
        factory=True,
        **options,
    )
    listener = socket.socket(fileno=int(descriptor))
    listener.listen(config.backlog)
    supervisor = HandingSupervisor(config, listener)
    supervisor.run()
    if supervisor.failed:
        sys.exit(EXIT_UNAVAILABLE)


if __name__ == "__main__":
    main(sys.argv[1:])
