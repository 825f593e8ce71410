"""Stopping the servers the tests and benchmarks start (Trellis, OpenBao, nginx, openvpn)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["stopped_by_sigterm", "terminate"]


def terminate(process: subprocess.Popen[Any], grace: float = 10.0) -> int:
    """SIGTERM, up to ``grace`` seconds for a clean exit (a server's own shutdown is part of
    what the tests exercise), then SIGKILL. Returns the exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(10)


def stopped_by_sigterm(
    process: subprocess.Popen[Any],
    ready: Callable[[], bool],
    log: Path,
    *,
    within: float,
    settle: float = 0.0,
    signum: signal.Signals = signal.SIGTERM,
) -> tuple[int, float]:
    """Once ``ready()`` (at most ``within`` seconds; the process must not exit meanwhile) and
    ``settle`` seconds more, SIGTERM ``process`` (or send it ``signum``: SIGINT is Ctrl-C): its
    exit status and how many seconds it took to exit. ``log`` (the process's output) is what a
    failed wait shows."""
    try:
        deadline = time.monotonic() + within
        while not ready():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        time.sleep(settle)
        signalled = time.monotonic()
        process.send_signal(signum)
        status = process.wait(30)
        return status, time.monotonic() - signalled
    finally:
        terminate(process)
