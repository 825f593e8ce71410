"""PostgreSQL connections over TCP carry keepalive and user-timeout settings, read back from
the kernel on the sockets Trellis's engines opened (``ca.store.db.CONNECTION_DEFAULTS``).

The embedded server listens on a Unix socket only, where those settings do not apply, so the
connections go through a loopback TCP relay to it."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import sqlalchemy as sa

from ca.store.db import CONNECTION_DEFAULTS, autocommit_engine, connect
from tests.pgserver import make_postgres_database

pytestmark = pytest.mark.postgres


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def tcp_relay(unix_path: str) -> Iterator[int]:
    """127.0.0.1:<port> relayed to the server's Unix socket, for as long as the block runs."""
    listener = socket.create_server(("127.0.0.1", 0))
    stopping = threading.Event()
    opened: list[socket.socket] = []

    def serve() -> None:
        while not stopping.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(unix_path)
            opened.extend((client, upstream))
            for pair in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=pair, daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stopping.set()
        listener.close()
        for sock in opened:
            sock.close()


def _over_tcp(database_url: str, port: int, extra: str = "") -> str:
    base = database_url.partition("?")[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}?host=127.0.0.1&port={port}{extra}"


def _unix_socket(server_uri: str) -> str:
    directory = Path(parse_qs(urlsplit(server_uri).query)["host"][0])
    return str(next(directory.glob(".s.PGSQL.*")))


def _socket_settings(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as connection:
        fd = connection.connection.driver_connection.pgconn.socket  # type: ignore[union-attr]
        sock = socket.socket(fileno=socket.dup(fd))
        try:
            assert sock.family == socket.AF_INET  # the relay, not the Unix socket
            return {
                "keepalives": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                "keepalives_idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                "keepalives_interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                "keepalives_count": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                "tcp_user_timeout": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
            }
        finally:
            sock.close()


def test_both_pools_open_tcp_connections_with_keepalives_and_a_user_timeout(
    postgres_server: str,
) -> None:
    url = make_postgres_database(postgres_server)
    expected = {k: v for k, v in CONNECTION_DEFAULTS.items() if k != "connect_timeout"}
    with tcp_relay(_unix_socket(postgres_server)) as port:
        engine = connect(_over_tcp(url, port))
        reads = autocommit_engine(engine)
        try:
            assert reads is not engine
            assert _socket_settings(engine) == expected
            assert _socket_settings(reads) == expected
        finally:
            reads.dispose()
            engine.dispose()


def test_settings_in_the_database_url_win(postgres_server: str) -> None:
    url = make_postgres_database(postgres_server)
    with tcp_relay(_unix_socket(postgres_server)) as port:
        engine = connect(_over_tcp(url, port, "&keepalives_idle=45&tcp_user_timeout=12000"))
        try:
            settings = _socket_settings(engine)
        finally:
            engine.dispose()
    assert settings["keepalives_idle"] == 45
    assert settings["tcp_user_timeout"] == 12000
    assert settings["keepalives_count"] == CONNECTION_DEFAULTS["keepalives_count"]
