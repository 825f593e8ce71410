"""The process ``trellis serve --workers N`` becomes once its start-up checks have passed.

``serve`` checks the CA, performs overdue transitions, unlocks every key and prepares the serving
certificate: that needs the whole CA in memory (~100 MiB). Then it replaces itself (``exec``, so
the process id, and with it systemd's and Kubernetes' view of the service, stays the same) with
this module, which imports only uvicorn: it binds the socket, starts the workers, restarts any
that die and stops them on SIGTERM. The workers serve requests and one of them runs the scheduled
jobs (``api.asgi``).

Invoked as ``python -m cli.supervisor '<json>'`` with uvicorn's options.
"""

from __future__ import annotations

import json
import logging
import sys

from uvicorn.supervisors import Multiprocess

from ca.logs import configure_logging
from cli.tlsreload import ReloadingConfig

__all__ = ["command", "main"]


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
        log_config=None,  # keep the JSON/text handlers configure_logging installed
        access_log=False,
        server_header=False,
        **options,
    )
    # What uvicorn.run does for workers, but with our Config so each worker reloads TLS.
    Multiprocess(config, sockets=[config.bind_socket()]).run()


if __name__ == "__main__":
    main(sys.argv[1:])
