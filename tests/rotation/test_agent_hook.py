"""The ``--exec`` hook runs for a bounded time and never past a stop. The agent waited for it with
no bound: with ``--exec "sleep 25"`` a SIGTERM took 23 s to stop it, a hook longer than the SVID's
life let it expire unrenewed, and the expired SVID then read back after the hook ended the agent
(``the SVID just written cannot be read back``, exit 1). The agent here is real, its server's
part done in-process (``LocalClient``); the hooks are real processes."""

from __future__ import annotations

import datetime as dt
import logging
import random
import time
from pathlib import Path
from typing import Any

import pytest

from ca.agent import AgentConfig, ReloadCommand
from ca.clock import FixedClock
from ca.config import Context
from ca.durations import Ttl
from ca.serverconn import ServerUrl
from tests.ca.svidkit import SQLITE_ONLY, Local, LocalClient, enrol


def _agent(
    ctx: Context, clock: FixedClock, tmp_path: Path, hook: object, ttl: Ttl | None = None
) -> Local:
    files = enrol(ctx, "spiffe://example.org/w").on_disk(tmp_path / "svid")
    config = AgentConfig(
        ServerUrl.parse("https://127.0.0.1:1"),
        files.bundle,
        files.directory,
        exec_command=hook,  # type: ignore[arg-type]
    )
    agent = Local(
        config, clock=clock, sleep=lambda s: clock.advance(dt.timedelta(seconds=s)),
        rng=random.Random(7),
    )  # fmt: skip
    agent.client = LocalClient(ctx, ttl=ttl)
    return agent


def _gone(pid: int) -> bool:
    """No such process, or a zombie waiting for a parent that is not this one to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _child(pid_file: Path) -> int:
    deadline = time.monotonic() + 5
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline, "the hook never started"
        time.sleep(0.02)
    return int(pid_file.read_text())


@SQLITE_ONLY
def test_a_stop_ends_a_running_hook_at_once(
    ctx: Context, clock: FixedClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pid_file = tmp_path / "sleep.pid"
    # A shell and its child: the whole group goes, not only the process the agent started.
    hook = ReloadCommand.parse(f"sh -c 'sleep 8 & echo $! > {pid_file}; wait'")
    agent = _agent(ctx, clock, tmp_path, hook)
    stop_at: list[float] = []

    def stop() -> bool:
        if not stop_at and pid_file.exists():
            stop_at.append(time.monotonic() + 0.3)  # a SIGTERM while the hook runs
        return bool(stop_at) and time.monotonic() >= stop_at[0]

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="trellis.agent"):
        agent.run(stop=stop)
    assert stop_at, "the hook never ran"
    took = time.monotonic() - stop_at[0]
    assert took < 1.0, f"stopped {took:.1f} s after the stop ({time.monotonic() - started:.1f})"
    assert "stopped with the agent" in caplog.text
    assert _gone(_child(pid_file))


@SQLITE_ONLY
def test_a_hook_that_overruns_is_killed_and_the_agent_goes_on(
    ctx: Context,
    clock: FixedClock,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("ca.agent.HOOK_LIMIT", 1.0)
    agent = _agent(ctx, clock, tmp_path, ReloadCommand.parse("sleep 8"))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="trellis.agent"):
        agent.run(once=True)  # returns: the SVID was renewed, the hook's fate is a warning
    took = time.monotonic() - started
    assert took < 3.0, f"took {took:.1f} s"
    assert "reload command sleep did not finish within 1 s: killed" in caplog.text
    assert agent.client.renewals == 1


class Recorded:
    """A hook that takes longer than the new SVID's life (the clock moves past its notAfter),
    and notes the limit it was given."""

    def __init__(self, clock: FixedClock) -> None:
        self.clock = clock
        self.limits: list[float] = []

    def run(self, **bounds: Any) -> None:
        self.limits.append(bounds.get("limit", -1.0))
        self.clock.advance(dt.timedelta(hours=2))


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("ttl", "limit"), [(None, 30.0), (Ttl(8), 2.0)], ids=["an-hour:cap", "8s:a-quarter"]
)
def test_the_svid_is_read_back_before_the_hook(
    ctx: Context,
    clock: FixedClock,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    ttl: Ttl | None,
    limit: float,
) -> None:
    """The hook's limit: a quarter of the fresh SVID's life, at most ``ca.agent.HOOK_LIMIT``
    (30 s), so the renewal at half-life is never waited out."""
    hook = Recorded(clock)
    agent = _agent(ctx, clock, tmp_path, hook, ttl)
    with caplog.at_level(logging.WARNING, logger="trellis.agent"):
        agent.run(once=True)
    # The SVID had expired when it was read back: an InternalError, or at start a warning.
    assert "cannot be read back" not in caplog.text
    assert agent.client.renewals == 1
    assert hook.limits == [limit]
