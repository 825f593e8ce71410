"""What a client can make ``trellis serve`` hold (cli/http.py): a request head is refused past
``MAX_HEAD`` bytes as soon as it gets there, a request that stops arriving is answered 408 and
closed after ``TRELLIS_REQUEST_TIMEOUT``, and connections past ``TRELLIS_MAX_CONNECTIONS`` are
answered 503. Real ``trellis serve`` processes, real TLS connections, raw bytes."""

from __future__ import annotations

import json
import select
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.http import MAX_HEAD, MAX_HEADERS
from tests.cli.test_walkthrough import Serving, Trellis

pytestmark = pytest.mark.slow


def new_trellis(where: Path) -> Trellis:
    cli = Trellis(where / "var", f"sqlite:///{where / 'trellis.db'}")
    cli.set_up("init", "--trust-domain", "example.org")
    return cli


@pytest.fixture
def trellis(tmp_path: Path) -> Trellis:
    return new_trellis(tmp_path)


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serving]:
    """One server for the tests that change no setting: each starts in about 3 s."""
    where = tmp_path_factory.mktemp("serving")
    with new_trellis(where).serving(where / "serve.log") as server:
        yield server


def connect(server: Serving) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return server.tls.wrap_socket(sock, server_hostname="127.0.0.1")


def read_to_close(conn: ssl.SSLSocket, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (a test fails, rather than
    hangs, on a server that keeps it open)."""
    conn.settimeout(timeout)
    received = b""
    while True:
        try:
            chunk = conn.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError):
            return received
        if not chunk:
            return received
        received += chunk


def status_and_problem(response: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    assert headers["content-type"] == "application/problem+json", response[:300]
    assert headers["connection"] == "close"
    problem = json.loads(body)
    assert problem["status"] == int(lines[0].split()[1])
    return problem["status"], problem


def request(conn: ssl.SSLSocket, head: bytes) -> bytes:
    conn.sendall(head)
    return read_to_close(conn)


def filler_headers(size: int) -> bytes:
    """``size`` bytes of ``X-Filler-N: v...`` header lines, each under 8 KiB."""
    lines, left, n = [], size, 0
    while left > 0:
        name = f"X-Filler-{n}: ".encode()
        value = b"v" * max(1, min(4000, left - len(name) - 2))
        lines.append(name + value + b"\r\n")
        left -= len(lines[-1])
        n += 1
    return b"".join(lines)


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("ok/head-just-under-the-limit", 200, None),
        ("fail/headers-over-the-limit", 431, "header-too-large"),
        ("fail/one-header-over-the-limit", 431, "header-too-large"),
        ("fail/too-many-headers", 431, "header-too-large"),
        ("fail/url-over-the-limit", 414, "uri-too-long"),
        ("fail/not-http", 400, "invalid-request"),
    ],
)
def test_request_heads_refused(serving: Serving, case: str, status: int, code: str | None) -> None:
    path, headers = b"/healthz", b""
    if case == "ok/head-just-under-the-limit":
        headers = filler_headers(MAX_HEAD - 200)
    elif case == "fail/headers-over-the-limit":
        headers = filler_headers(2 * MAX_HEAD)
    elif case == "fail/one-header-over-the-limit":
        headers = b"X-Big: " + b"v" * (MAX_HEAD + 1) + b"\r\n"
    elif case == "fail/too-many-headers":
        headers = b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS + 1))
    else:
        path = b"/healthz?" + b"q" * (MAX_HEAD + 1)
    head = b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + headers + b"\r\n"
    if case == "fail/not-http":
        head = b"GET / HTTP/1.1\r\nHost x\r\n\r\n"
    with connect(serving) as conn:
        response = request(conn, head)
    if code is None:
        assert response.startswith(b"HTTP/1.1 200 "), response[:200]
        return
    got, problem = status_and_problem(response)
    assert (got, problem["code"]) == (status, code)


def test_an_endless_head_is_refused_once_past_the_limit(serving: Serving) -> None:
    """The server answers while the client is still sending, having held no more than the
    limit and a read of it: the head was buffered whole before (16 MiB, RSS +219 MiB)."""
    piece = b"X-A: b\r\n" * 2048  # 16 KiB
    sent = 0
    with connect(serving) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        conn.settimeout(10)
        try:
            while sent < 16 * 1024 * 1024:
                conn.sendall(piece)
                sent += len(piece)
                if select.select([conn], [], [], 0.02)[0]:  # paced: the server keeps up
                    break
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # closed by the server: what it answered is still to be read
        response = read_to_close(conn)
    assert sent < 1024 * 1024, sent
    got, problem = status_and_problem(response)
    assert (got, problem["code"]) == (431, "header-too-large")


def test_a_request_that_stops_arriving_is_answered_408_and_closed(
    trellis: Trellis, tmp_path: Path
) -> None:
    """Before, each of these connections stayed open for as long as the client liked: 984 of
    them took the last descriptors of a process under ``ulimit -n 1024``."""
    trellis.env["TRELLIS_REQUEST_TIMEOUT"] = "1"
    stalls = {
        "nothing": b"",
        "half-a-head": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Half",
        "part-of-a-body": (
            b"POST /v1/svid HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"csr": '
        ),
    }
    # Two workers: the setting reaches the processes the supervisor starts (the other tests
    # run one process).
    with trellis.serving(tmp_path / "serve.log", "--workers", "2") as server:
        conns = {name: connect(server) for name in stalls}
        try:
            started = time.monotonic()
            for name, sent in stalls.items():
                conns[name].sendall(sent)
            answers = {name: read_to_close(conn, timeout=8) for name, conn in conns.items()}
            elapsed = time.monotonic() - started
            # A request sent in time, over a connection that waited once for its first byte.
            with connect(server) as conn:
                time.sleep(0.5)
                ok = request(conn, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        finally:
            for conn in conns.values():
                conn.close()
    assert elapsed < 6, elapsed  # 1 s, on a busy machine
    for name, answer in answers.items():
        got, problem = status_and_problem(answer)
        assert (got, problem["code"]) == (408, "request-timeout"), name
    assert "body" in str(problem["detail"])
    assert ok.startswith(b"HTTP/1.1 200 "), ok[:200]


def served(server: Serving) -> ssl.SSLSocket:
    """A connection that has been served a request, once the server has room for one (the
    connections of the readiness probe, or of the test, may take a moment to go)."""
    deadline = time.monotonic() + 10
    while True:
        conn = connect(server)
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        if conn.recv(65536).startswith(b"HTTP/1.1 200 "):
            return conn
        conn.close()
        assert time.monotonic() < deadline, "no connection served"
        time.sleep(0.1)


def test_connections_past_the_limit_are_answered_503(trellis: Trellis, tmp_path: Path) -> None:
    trellis.env["TRELLIS_MAX_CONNECTIONS"] = "2"
    with trellis.serving(tmp_path / "serve.log") as server:
        held = [served(server), served(server)]
        try:
            with connect(server) as third:
                got, problem = status_and_problem(read_to_close(third))
            assert (got, problem["code"]) == (503, "too-many-connections")
            held.pop().close()
            held.append(served(server))  # room again
        finally:
            for conn in held:
                conn.close()


@pytest.mark.parametrize("path", [b"/metrics%0A", b"/healthz%0d", b"/v1/crl/mesh/root.crl%0A"])
def test_a_path_with_a_control_character_is_an_unknown_path(serving: Serving, path: bytes) -> None:
    """As the server decodes it (httptools, then uvicorn's unquote): the path with the newline
    had been served as the route without it (``api.plainpath``)."""
    head = b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with connect(serving) as conn:
        response = request(conn, head)
    got, problem = status_and_problem(response)
    assert (got, problem["code"]) == (404, "not-found"), problem
    assert "a control character" in str(problem["detail"])
