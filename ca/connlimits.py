"""How much a serving process lets each connection hold: the defaults of the
``TRELLIS_MAX_CONNECTIONS`` and ``TRELLIS_REQUEST_TIMEOUT`` settings (``ca.config``), in a
module of their own that imports nothing, so that ``trellis serve``'s supervisor, which passes
them to its workers (``cli.tlsreload``), does not load the settings machinery for two numbers:
importing ``ca.config`` there cost it 40 MiB of RSS (26 -> 66 MiB)."""

from __future__ import annotations

__all__ = ["MAX_CONNECTIONS", "REQUEST_TIMEOUT"]

# Open connections: under the 1,024 descriptors a process gets by default (systemd's and most
# shells' soft limit), with room for its database, log and TLS files. 500 connections each
# holding 30 KiB of an unfinished head took a worker's RSS from 109 to 165 MiB: two workers so
# held fit a pod of 512 MiB.
MAX_CONNECTIONS = 512
# Seconds a client has to send a request's head, and then as long for its body (at most 64 KiB).
REQUEST_TIMEOUT = 20.0
