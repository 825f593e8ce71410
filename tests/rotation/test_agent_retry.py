"""The agent's retries while Trellis is unreachable, on the suite's ``FixedClock``: the agent is
real (``ca.agent.Agent``, its ``WorkloadClient`` connecting to a closed loopback port), only its
sleeping is replaced by moving the clock."""

from __future__ import annotations

import datetime as dt
import errno
import itertools
import logging
import random
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
from ca.workload import SvidFiles, write_svid
from tests.conftest import TRUST_DOMAIN, free_port
from tests.rotation.rotkit import SQLITE_ONLY


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
    key = KeyType.EC_P256.generate()
    grant = admin_grant(drill_ctx, SpiffeId.parse(f"spiffe://{TRUST_DOMAIN}/w"), "test")
    svid = mint_svid(drill_ctx, grant, key, Ttl(120))
    files = SvidFiles(tmp_path / "svid")
    write_svid(files, svid.certificate_pem + svid.chain_pem, key, svid.bundle_pem)
    not_after = svid.certificate.not_valid_after_utc
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
    key = KeyType.EC_P256.generate()
    grant = admin_grant(drill_ctx, SpiffeId.parse(f"spiffe://{TRUST_DOMAIN}/w"), "test")
    svid = mint_svid(drill_ctx, grant, key, Ttl(120))
    files = SvidFiles(tmp_path / "svid")
    write_svid(files, svid.certificate_pem + svid.chain_pem, key, svid.bundle_pem)
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
