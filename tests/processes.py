"""Stopping the servers the tests and benchmarks start (Trellis, OpenBao, nginx, openvpn)."""

from __future__ import annotations

import subprocess
from typing import Any

__all__ = ["terminate"]


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
