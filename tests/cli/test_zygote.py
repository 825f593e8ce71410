"""The tests' ``trellis`` runner (tests/zygote.py) answers as the real executable does: a test
that passes through a forked child would pass against ``exec`` too."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests import zygote
from tests.cli.test_walkthrough import Trellis


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["entry", "list", "--json"],
        ["entry", "show", "no-such-entry"],  # a domain error: one line, exit 5
        ["entry", "create"],  # click's usage error, exit 2
        ["certs", "list", "--limit", "0"],
        ["no-such-command"],
    ],
)
def test_a_forked_command_answers_as_the_executable_does(trellis: Trellis, args: list[str]) -> None:
    forked = zygote.run(args, env=trellis.env)
    real = zygote.run(args, env=trellis.env, real=True)
    assert (forked.returncode, forked.stdout, forked.stderr) == (
        real.returncode,
        real.stdout,
        real.stderr,
    )


def test_a_forked_command_has_the_callers_directory_environment_and_files(tmp_path: Path) -> None:
    """A relative ``--data-dir`` is the caller's ``cwd``'s; the environment is the caller's,
    not the zygote's; the process is not the zygote (its own pid, so its own files)."""
    env = {**os.environ, "TRELLIS_KEY_PASSPHRASE": "zygote-test-passphrase"}
    env.pop("TRELLIS_DATA_DIR", None)
    env.pop("TRELLIS_DATABASE_URL", None)
    done = zygote.run(["--data-dir", "here", "init", "--trust-domain", "z.example"], env=env,
                      cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE((tmp_path / "here").stat().st_mode) == 0o700
    shown = zygote.run(
        ["authority", "status", "--json"], env={**env, "TRELLIS_DATA_DIR": str(tmp_path / "here")}
    )
    assert shown.returncode == 0, shown.stderr
    assert '"trust_domain": "z.example"' in shown.stdout


def test_a_command_past_its_timeout_is_killed(trellis: Trellis, tmp_path: Path) -> None:
    """As ``subprocess.run(timeout=...)``: ``TimeoutExpired``, and the command gone."""
    fifo = tmp_path / "csr.fifo"
    os.mkfifo(fifo)  # reading a CSR from it blocks until a writer comes: none does
    trellis.set_up("gateway", "init")
    trellis.set_up("gateway", "consumer", "add", "acme")
    with pytest.raises(subprocess.TimeoutExpired):
        zygote.run(
            ["gateway", "cert", "issue", "acme", "--csr", str(fifo), "--out", str(tmp_path / "c")],
            env=trellis.env,
            timeout=2,
        )
    # the child held the FIFO's reading end open: once it is killed, a writer finds no reader
    deadline = time.monotonic() + 5
    while True:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError as error:
            assert error.errno == errno.ENXIO
            break
        assert time.monotonic() < deadline, "the command still reads its CSR"
        time.sleep(0.05)


def test_python_settings_of_its_own_send_a_command_to_the_executable(trellis: Trellis) -> None:
    """``PYTHON*`` variables act when an interpreter starts, which a forked child skipped: such
    a command runs the real executable (here: warnings as errors reach the command)."""
    env = {**trellis.env, "PYTHONWARNINGS": "error::DeprecationWarning"}
    assert not zygote._the_zygote().serves(env)
    assert zygote._the_zygote().serves(trellis.env)
    assert zygote.run(["entry", "list"], env=env).returncode == 0
