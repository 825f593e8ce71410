"""What ``trellis`` shows while a long command runs: a progress bar on stderr for a person at a
terminal, and nothing new for a script (stderr a pipe, or ``--json``). Real processes, stderr
on a pseudo-terminal (Python's ``pty``) or on a pipe."""

from __future__ import annotations

import os
import pty
import subprocess
from pathlib import Path

from tests.ca.svidkit import SQLITE_ONLY
from tests.cli.test_walkthrough import TRELLIS, Trellis


def _on_a_terminal(trellis: Trellis, *args: str) -> tuple[str, str]:
    """(stdout, stderr) of ``trellis ARGS`` with its stderr on a pseudo-terminal."""
    leader, follower = pty.openpty()
    with subprocess.Popen(
        [TRELLIS, *args],
        env={**trellis.env, "TERM": "xterm", "COLUMNS": "100"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=follower,
    ) as process:
        os.close(follower)
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's last writer has gone
                break
            if not chunk:
                break
            shown += chunk
        os.close(leader)
        stdout = process.stdout.read() if process.stdout else b""
        assert process.wait(timeout=60) == 0, shown.decode(errors="replace")
    return stdout.decode(), shown.decode(errors="replace")


@SQLITE_ONLY
def test_backup_shows_progress_on_a_terminal_only(trellis: Trellis, tmp_path: Path) -> None:
    stdout, terminal = _on_a_terminal(trellis, "backup", "--out", str(tmp_path / "a.tgz"))
    assert "backing up" in terminal, terminal
    assert f"wrote {tmp_path / 'a.tgz'}" in stdout

    piped = trellis.run("backup", "--out", str(tmp_path / "b.tgz"))
    assert piped.stderr == ""
    assert piped.stdout == stdout.replace("a.tgz", "b.tgz")

    stdout, terminal = _on_a_terminal(trellis, "backup", "--out", str(tmp_path / "c.tgz"), "--json")
    assert "backing up" not in terminal and terminal.strip() == "", terminal
    assert stdout.startswith("{")


def test_audit_verify_shows_progress_on_a_terminal_only(trellis: Trellis) -> None:
    trellis.run("audit", "seal")
    stdout, terminal = _on_a_terminal(trellis, "audit", "verify")
    assert "verifying" in terminal, terminal
    piped = trellis.run("audit", "verify")
    assert (piped.stdout, piped.stderr) == (stdout, "")
