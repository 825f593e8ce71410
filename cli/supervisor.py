"""The process ``trellis serve --workers N`` becomes once its start-up checks have passed.

``serve`` checks the CA, performs overdue transitions, unlocks every key and prepares the serving
certificate: that needs the whole CA in memory (~100 MiB). Then it replaces itself (``exec``, so
the process id, and with it systemd's and Kubernetes' view of the service, stays the same) with
this module, which imports only uvicorn: it binds the socket, starts the workers, restarts any
that die and stops them on SIGTERM. The workers serve requests and one of them runs the scheduled
jobs (``api.asgi``).

Invoked as ``python -m cli.supervisor '<json>'`` with uvicorn's options.

Each worker listens on a socket of its own, all bound to the same port with ``SO_REUSEPORT``, so
the kernel spreads new connections over the workers. With one shared socket, whichever worker
woke first accepted every queued connection: 16 keep-alive clients connecting at once all landed
on one worker, which then did all the work on one core while the other idled (seen in the
benchmark as a throughput that halved from one run to the next).
"""

from __future__ import annotations

import json
import logging
import socket
import sys

from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess
from uvicorn.supervisors.multiprocess import Process

from ca.logs import configure_logging
from cli.tlsreload import ReloadingConfig

logger = logging.getLogger("uvicorn.error")

__all__ = ["PerWorkerSockets", "command", "listening_sockets", "main"]


def listening_sockets(host: str, port: int, count: int, backlog: int) -> list[socket.socket]:
    """``count`` sockets listening on one address; the kernel balances connections over them."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sockets = []
    for _ in range(count):
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.set_inheritable(True)
        sockets.append(sock)
    return sockets


class PerWorkerSockets(Multiprocess):
    """uvicorn's supervisor (signals, health pings, restarts), with worker ``i`` always given
    socket ``i``: the three places uvicorn 0.54 creates a worker, slot-aware."""

    def __init__(self, config: ReloadingConfig, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)
        self.slot_sockets = sockets

    def _worker(self, slot: int) -> Process:
        process = Process(self.config, [self.slot_sockets[slot]])
        process.start()
        return process

    def init_processes(self) -> None:
        self.processes = [self._worker(slot) for slot in range(self.processes_num)]

    def keep_subprocess_alive(self) -> None:
        for slot, process in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()
            process.join()
            if process.exitcode == STARTUP_FAILURE:  # broken app, TLS or bind: would repeat
                logger.error("worker [%s] failed to start, stopping", process.pid)
                self.should_exit.set()
                return
            logger.info("worker [%s] died; starting another", process.pid)
            self.processes[slot] = self._worker(slot)

    def restart_all(self) -> None:
        """SIGHUP: replace each worker in turn, the new one on the same socket."""
        for slot, old in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new = self._worker(slot)
            if not new.wait_until_ready(self.config.timeout_worker_healthcheck, self.should_exit):
                new.kill()
                new.join()
                return
            old.terminate()
            old.join()
            self.processes[slot] = new


def command(options: dict[str, object]) -> list[str]:
    """The argv ``serve`` execs into."""
    return [sys.executable, "-m", "cli.supervisor", json.dumps(options)]


def main(argv: list[str]) -> None:
    (encoded,) = argv
    options = json.loads(encoded)
    configure_logging()
    logging.getLogger("trellis.serve").info(
        "supervising %d workers on %s:%d", options["workers"], options["host"], options["port"]
    )
    config = ReloadingConfig(
        "api.asgi:app_from_environment",
        factory=True,
        **options,
    )
    sockets = listening_sockets(config.host, config.port, config.workers, config.backlog)
    PerWorkerSockets(config, sockets).run()


if __name__ == "__main__":
    main(sys.argv[1:])
