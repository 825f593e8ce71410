"""SIGTERM reaches the agent in the middle of a request: a kubelet waits 30 s before SIGKILL, and
a request to a peer that trickles its answer a byte at a time never reaches a per-read timeout
(each byte restarts it). Real ``trellis agent`` processes against real TLS peers on loopback."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from ca.config import Context
from ca.errors import Unavailable
from ca.serverconn import ServerConnection, ServerUrl
from ca.serving import ServerTls, ensure_server_certificate
from tests.cli.test_walkthrough import TRELLIS
from tests.fakeserver import FakeServer, fake_server, http_answer
from tests.processes import stopped_by_sigterm
from tests.rotation.rotkit import SQLITE_ONLY

ANSWER = http_answer(b'{"detail": "' + b"x" * 200 + b'"}', "503 Service Unavailable")


def _sigterm_during_request(tls: ServerTls, server: FakeServer, tmp_path: Path) -> float:
    """Start an agent that bootstraps from ``server``, SIGTERM it once the request is under way,
    and return how long it took to exit 0."""
    args = [TRELLIS, "agent", "--server", server.url, "--bundle", str(tls.bundle_path)]
    args += ["--dir", str(tmp_path / "svid"), "--token", "trellis-join-secret"]
    log = tmp_path / "agent.log"
    with log.open("w") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    status, took = stopped_by_sigterm(
        process,
        # connected to the silent peer; or the request sent, its answer trickling
        lambda: bool(server.accepted if server.silent else b"\r\n\r\n" in server.everything),
        log,
        within=20,
        settle=0.5,
    )
    assert status == 0, log.read_text()
    return took


@SQLITE_ONLY
def test_sigterm_stops_a_request_to_a_trickling_peer(ctx: Context, tmp_path: Path) -> None:
    tls = ensure_server_certificate(ctx)  # the peer is Trellis by its certificate
    with fake_server(tls.cert_path, tls.key_path, answer=ANSWER, trickle=0.5) as server:
        took = _sigterm_during_request(tls, server, tmp_path)
    assert took < 1.5, f"exited {took:.1f} s after SIGTERM"


@SQLITE_ONLY
def test_sigterm_stops_a_request_to_a_silent_peer(ctx: Context, tmp_path: Path) -> None:
    """The peer accepts the connection and never begins the handshake."""
    tls = ensure_server_certificate(ctx)
    with fake_server(tls.cert_path, tls.key_path, silent=True) as server:
        took = _sigterm_during_request(tls, server, tmp_path)
    assert took < 1.5, f"exited {took:.1f} s after SIGTERM"


@SQLITE_ONLY
def test_a_request_has_a_total_deadline(ctx: Context) -> None:
    """Without a stop, a trickling answer is cut at the request's total timeout."""
    tls = ensure_server_certificate(ctx)
    with fake_server(tls.cert_path, tls.key_path, answer=ANSWER, trickle=0.2) as server:
        connection = ServerConnection(
            ServerUrl.parse(server.url), tls.bundle_path, "--bundle", total_timeout=1.0
        )
        started = time.monotonic()
        with pytest.raises(Unavailable, match="no complete answer within 1 s"):
            connection.exchange("GET", "/v1/bundle")
        assert time.monotonic() - started < 1.5
