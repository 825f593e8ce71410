"""``cli.http``: the served protocol writes each response to its socket once, head and body
together, and serves keep-alive requests exactly as uvicorn's own does. Run on a real uvicorn
server in a subprocess; the kernel counts its write system calls (``/proc/<pid>/io``)."""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import free_port

REQUESTS = 200
SERVER = """
import sys, uvicorn

async def app(scope, receive, send):
    message = await receive()
    body = b"%d:" % len(message.get("body", b"")) + scope["path"].encode() * 40
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), http=sys.argv[1], lifespan="off",
            log_level="warning", access_log=False)
"""


@contextmanager
def serving(protocol: str) -> Iterator[tuple[int, int]]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", SERVER, protocol, str(port)])
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        yield process.pid, port
    finally:
        process.terminate()
        process.wait(timeout=10)


def writes(pid: int) -> int:
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["syscw"])


def writes_per_request(protocol: str) -> float:
    with serving(protocol) as (pid, port):
        connection = http.client.HTTPConnection("127.0.0.1", port)
        connection.request("GET", "/warm")
        connection.getresponse().read()
        before = writes(pid)
        for i in range(REQUESTS):
            body = b"b" * (i % 7)
            connection.request("POST", f"/r{i}", body=body)
            response = connection.getresponse()
            assert response.status == 200
            assert response.read() == f"{len(body)}:".encode() + f"/r{i}".encode() * 40
            assert response.getheader("content-type") == "text/plain"
        after = writes(pid)
        connection.close()
    return (after - before) / REQUESTS


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/<pid>/io (Linux)")
def test_a_response_is_one_write_where_uvicorn_makes_two() -> None:
    corked = writes_per_request("cli.http:CorkedHttpToolsProtocol")
    plain = writes_per_request("httptools")
    assert corked == pytest.approx(1.0, abs=0.05), corked
    assert plain >= 1.9, plain  # what it saves, so the test says why it exists
