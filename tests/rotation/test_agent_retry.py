"""The agent's retries while Trellis is unreachable, on the suite's ``FixedClock``: the agent is
real (``ca.agent.Agent``, its ``WorkloadClient`` connecting to a closed loopback port), only its
sleeping is replaced by moving the clock."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import itertools
import logging
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from ca.agent import Agent, AgentConfig, Held
from ca.clock import FixedClock
from ca.config import Context
from ca.durations import Ttl
from ca.errors import AuthenticationFailed
from ca.grants import admin_grant
from ca.identity import SpiffeId
from ca.issue import mint_svid
from ca.keys import KeyType
from ca.serverconn import ServerUrl
from ca.serving import ensure_server_certificate
from ca.workload import SvidFiles, write_svid
from tests.conftest import TRUST_DOMAIN, free_port
from tests.fakeserver import FakeServer, fake_server, http_answer
from tests.rotation.rotkit import SQLITE_ONLY


def _minted_on_disk(ctx: Context, tmp_path: Path, seconds: int) -> tuple[SvidFiles, dt.datetime]:
    """An SVID of ``seconds`` for ``spiffe://<td>/w`` in the agent's directory: its files and
    its notAfter."""
    key = KeyType.EC_P256.generate()
    grant = admin_grant(ctx, SpiffeId.parse(f"spiffe://{TRUST_DOMAIN}/w"), "test")
    svid = mint_svid(ctx, grant, key, Ttl(seconds))
    files = SvidFiles(tmp_path / "svid")
    write_svid(files, svid.certificate_pem + svid.chain_pem, key, svid.bundle_pem)
    return files, svid.certificate.not_valid_after_utc


class Recording(Agent):
    """Notes when each renewal is attempted."""

    attempts: list[dt.datetime]

    def renew(self) -> Held:
        self.attempts.append(self.clock.now())
        return super().renew()


@SQLITE_ONLY
def test_retries_close_in_on_expiry_while_the_server_is_down(
    drill_ctx: Context, clock: FixedClock, tmp_path: Path
) -> None:
    """A 2-minute SVID, the server down from before the renewal: exponential back-off alone
    (1, 2, 4 … 32 s) slept past notAfter, so a server back 22 s before it was never tried
    again in time. The retries come closer as expiry nears, and none sleeps past it."""
    files, not_after = _minted_on_disk(drill_ctx, tmp_path, 120)
    config = AgentConfig(
        ServerUrl.parse(f"https://127.0.0.1:{free_port()}"), files.bundle, files.directory
    )
    agent = Recording(
        config, clock=clock, sleep=lambda s: clock.advance(dt.timedelta(seconds=s)),
        rng=random.Random(7),
    )  # fmt: skip
    agent.attempts = []

    with pytest.raises(AuthenticationFailed, match="expired and could not be renewed"):
        agent.run()  # no --token: once the SVID has expired, the agent gives up

    before = [t for t in agent.attempts if t < not_after]
    assert len(before) >= 8, agent.attempts
    back = not_after - dt.timedelta(seconds=22)
    retried = [t for t in before if t >= back]  # the server is back: tried well in time
    assert retried and not_after - retried[0] >= dt.timedelta(seconds=15), agent.attempts
    for earlier, later in itertools.pairwise(before):
        left = (not_after - earlier).total_seconds()
        gap = (later - earlier).total_seconds()
        assert gap <= max(2.0, left / 2), (earlier, later, agent.attempts)


class FullDisk(Agent):
    """The first renewal's files cannot be written (ENOSPC); later ones reach the closed port."""

    attempts: list[dt.datetime]

    def renew(self) -> Held:
        self.attempts.append(self.clock.now())
        if len(self.attempts) == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.files.directory))
        return super().renew()


@SQLITE_ONLY
def test_a_file_it_cannot_write_is_retried_not_fatal(
    drill_ctx: Context, clock: FixedClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk at a renewal ended the agent (an OSError out of run), and with it the
    workload's renewals; it is now a warning and a retry like an unreachable server."""
    files, _ = _minted_on_disk(drill_ctx, tmp_path, 120)
    config = AgentConfig(
        ServerUrl.parse(f"https://127.0.0.1:{free_port()}"), files.bundle, files.directory
    )
    agent = FullDisk(
        config, clock=clock, sleep=lambda s: clock.advance(dt.timedelta(seconds=s)),
        rng=random.Random(7),
    )  # fmt: skip
    agent.attempts = []
    with caplog.at_level(logging.WARNING, logger="trellis.agent"):
        agent.run(stop=lambda: len(agent.attempts) >= 3)
    assert len(agent.attempts) == 3
    assert any("No space left on device" in r.getMessage() for r in caplog.records), caplog.text


# --- bootstrapping again while the server cannot be reached ------------------------------------

DOWN = http_answer(b'{"detail": "down"}', "503 Service Unavailable")
REVOKED = http_answer(
    b'{"detail": "certificate 1f is revoked: it cannot be renewed"}', "401 Unauthorized"
)


class RefusedThenGone(Agent):
    """Renewal ``refused_at`` is refused for good (revoked), the ones before find the server
    down; once refused, the server is gone (its port closed) when the join token is tried."""

    attempts: list[dt.datetime]
    refused_at: int
    server: FakeServer
    gone: Callable[[], None]

    def renew(self) -> Held:
        self.attempts.append(self.clock.now())
        if len(self.attempts) == self.refused_at:
            self.server.answer = REVOKED
        try:
            return super().renew()
        finally:
            if len(self.attempts) == self.refused_at:
                self.gone()


def _retries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "; retrying in" in r.getMessage()]


@SQLITE_ONLY
@pytest.mark.parametrize("refused_at", [1, 2], ids=["at-start", "at-a-renewal"])
def test_a_bootstrap_again_that_cannot_reach_the_server_is_retried(
    drill_ctx: Context,
    clock: FixedClock,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    refused_at: int,
) -> None:
    """A renewal refused for good sends the agent to its join token at once; a server it could
    not reach for that ended the agent (exit 8) instead of the back-off any outage gets."""
    files, _ = _minted_on_disk(drill_ctx, tmp_path, 120)
    tls = ensure_server_certificate(drill_ctx)
    with contextlib.ExitStack() as running:
        server = running.enter_context(fake_server(tls.cert_path, tls.key_path, answer=DOWN))
        config = AgentConfig(
            ServerUrl.parse(server.url), tls.bundle_path, files.directory, token="join-secret"
        )
        agent = RefusedThenGone(
            config, clock=clock, sleep=lambda s: clock.advance(dt.timedelta(seconds=s)),
            rng=random.Random(7),
        )  # fmt: skip
        agent.attempts, agent.refused_at, agent.server = [], refused_at, server
        agent.gone = running.close
        with caplog.at_level(logging.WARNING, logger="trellis.agent"):
            agent.run(stop=lambda: len(_retries(caplog)) >= 3)  # returns once stopped: no exit
    assert len(agent.attempts) == refused_at, agent.attempts
    assert "bootstrapping again with the join token" in caplog.text
    again = _retries(caplog)
    assert all("Connection refused" in line for line in again), again
    assert [line.rsplit(" ", 2)[-2] for line in again] == ["1", "2", "4"], again


@SQLITE_ONLY
def test_a_bootstrap_after_expiry_that_cannot_reach_the_server_is_retried(
    drill_ctx: Context, clock: FixedClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The SVID expires during the outage: the join token is tried, and the outage goes on. The
    agent exited 8 on it, although the token would work once the server is back."""
    files, not_after = _minted_on_disk(drill_ctx, tmp_path, 60)
    config = AgentConfig(
        ServerUrl.parse(f"https://127.0.0.1:{free_port()}"),
        files.bundle,
        files.directory,
        token="join-secret",
    )
    agent = Agent(
        config, clock=clock, sleep=lambda s: clock.advance(dt.timedelta(seconds=s)),
        rng=random.Random(7),
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="trellis.agent"):
        agent.run(stop=lambda: clock.now() > not_after + dt.timedelta(minutes=5))
    assert "the SVID has expired: bootstrapping again with the join token" in caplog.text
    after = caplog.text.split("bootstrapping again with the join token", 1)[1]
    assert after.count("; retrying in") >= 5, caplog.text
