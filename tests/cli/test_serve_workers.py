"""``trellis serve --workers 2`` spreads keep-alive connections over its workers: each worker has
a listening socket of its own (``SO_REUSEPORT``), so a burst of connections is not all accepted
by whichever worker woke first (``cli.supervisor``). Checked on the real server, by asking the
kernel which process holds each established connection."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path

from tests.cli.test_walkthrough import Trellis

CONNECTIONS = 16


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def sockets_on(port: int, state: str) -> set[str]:
    """Inodes of TCP sockets whose local port is ``port`` in ``state`` (01 established, 0A
    listening), from the kernel's tables."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == state:
                inodes.add(fields[9])
    return inodes


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_connections_are_spread_over_the_workers(tmp_path: Path) -> None:
    cli = Trellis(tmp_path / "var", f"sqlite:///{tmp_path / 'trellis.db'}")
    cli.run("init", "--trust-domain", "example.org")
    with cli.serving(tmp_path / "serve.log", "--workers", "2") as serve:
        tls, port, pid = serve.tls, serve.port, serve.process.pid
        connections = []
        # A burst, as wrk or a restarted Envoy opens them: every TCP connection is queued on
        # the server before any TLS handshake or request (then each is used once).
        raw = [socket.create_connection(("127.0.0.1", port)) for _ in range(CONNECTIONS)]
        for sock in raw:
            connection = http.client.HTTPSConnection("127.0.0.1", port, context=tls)
            connection.sock = tls.wrap_socket(sock, server_hostname="127.0.0.1")
            connections.append(connection)
        for connection in connections:
            connection.request("GET", "/healthz")
            assert connection.getresponse().read()

        listen = sockets_on(port, "0A")
        workers = [p for p in children(pid) if socket_inodes(p) & listen]
        assert len(workers) == 2
        # Each worker listens on a socket of its own (a shared one would be one inode in both).
        listening = [socket_inodes(p) & listen for p in workers]
        assert all(len(mine) == 1 for mine in listening) and listening[0] != listening[1]
        # And the kernel spread the burst over both (all on one: 2 in 65,536 by chance).
        established = sockets_on(port, "01")
        held = {p: len(socket_inodes(p) & established) for p in workers}
        assert sum(held.values()) == CONNECTIONS and min(held.values()) >= 1, held
        for connection in connections:
            connection.close()


def test_workers_log_each_request_once(tmp_path: Path) -> None:
    """Trellis writes one access line per request (``trellis.access``, with the request id);
    uvicorn's own access logger, which workers would otherwise propagate to the same handler,
    writes none."""
    cli = Trellis(tmp_path / "var", f"sqlite:///{tmp_path / 'trellis.db'}")
    cli.run("init", "--trust-domain", "example.org")
    log = tmp_path / "serve.log"
    with cli.serving(log, "--workers", "2") as serve:
        for _ in range(4):
            connection = http.client.HTTPSConnection("127.0.0.1", serve.port, context=serve.tls)
            connection.request("GET", "/healthz", headers={"X-Request-ID": "logged-once"})
            assert connection.getresponse().status == 200
            connection.close()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("request_id") == "logged-once"]
    assert [line["logger"] for line in mine] == ["trellis.access"] * 4
