"""Ctrl-C: a real SIGINT to real ``trellis`` processes ends a command with one line,
``trellis: interrupted``, and exit 130, wherever it lands (importing, waiting on a server that
never answers), with nothing half-written; ``trellis agent`` takes it as a stop (exit 0)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from ca.config import Context
from ca.serving import ensure_server_certificate
from tests.ca.svidkit import SQLITE_ONLY, enrol, svid_dir_listing
from tests.cli.test_walkthrough import TRELLIS
from tests.conftest import PASSPHRASE
from tests.fakeserver import fake_server
from tests.processes import stopped_by_sigterm

INTERRUPTED = ["trellis: interrupted"]


def _sigint_as_at_a_terminal() -> None:
    """A command started in the background by a non-interactive shell (``make test &``, a CI
    runner's job) inherits SIGINT ignored, which ``trellis`` rightly keeps ignored: the tests
    start it as a terminal would, with SIGINT's default disposition."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(
    args: list[str],
    ready: Callable[[Path], bool],
    tmp_path: Path,
    env: dict[str, str] | None = None,
) -> tuple[int, list[str]]:
    """Start ``trellis *args``, SIGINT it once ``ready(stderr file)``: its exit status and the
    lines of its stderr."""
    log = tmp_path / "stderr.log"
    with log.open("w") as err:
        process = subprocess.Popen(
            [TRELLIS, *args],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            preexec_fn=_sigint_as_at_a_terminal,
        )
    status, _took = stopped_by_sigterm(
        process, lambda: ready(log), log, within=30, signum=signal.SIGINT
    )
    return status, log.read_text().splitlines()


@SQLITE_ONLY
def test_svid_renew_interrupted_while_the_server_is_silent(ctx: Context, tmp_path: Path) -> None:
    """The peer accepts and never answers: Ctrl-C was exit 130 with nothing said (Typer's own
    handling), or a traceback while the command was still importing."""
    web = enrol(ctx, "spiffe://example.org/web")
    files = web.on_disk(tmp_path / "svid")
    before = svid_dir_listing(files.directory)
    tls = ensure_server_certificate(ctx)
    with fake_server(tls.cert_path, tls.key_path, silent=True) as server:
        args = ["svid", "renew", "--server", server.url, "--dir", str(files.directory)]
        status, lines = _interrupt(args, lambda _log: server.accepted > 0, tmp_path)
    assert (status, lines) == (130, INTERRUPTED)
    assert svid_dir_listing(files.directory) == before  # the SVID, its key and bundle as they were


@SQLITE_ONLY
def test_svid_request_interrupted_writes_nothing(ctx: Context, tmp_path: Path) -> None:
    tls = ensure_server_certificate(ctx)
    out = tmp_path / "out"
    with fake_server(tls.cert_path, tls.key_path, silent=True) as server:
        args = ["svid", "request", "--server", server.url, "--bundle", str(tls.bundle_path)]
        args += ["--token", "trellis-join-secret", "--out", str(out)]
        status, lines = _interrupt(args, lambda _log: server.accepted > 0, tmp_path)
    assert (status, lines) == (130, INTERRUPTED)
    assert not out.exists()


def _importing(log: Path) -> bool:
    """``-X importtime`` has reported SQLAlchemy, the first of the command's heavy imports
    (``cli.main``): the rest (Typer, pydantic, cryptography, the models) take most of a second
    more."""
    return any(line.split("|")[-1].strip() == "sqlalchemy" for line in log.read_text().splitlines())


def test_a_command_interrupted_while_it_imports(tmp_path: Path) -> None:
    """Any command: this is before Typer runs, where a KeyboardInterrupt was a traceback."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1", "TRELLIS_DATA_DIR": str(tmp_path)}
    # On a loaded host the test can see SQLAlchemy's line too late: the command has finished
    # its imports and exited 7 (no database here) before the signal. That is the test losing
    # the race, not the command failing it: try again, a few times.
    for _ in range(5):
        status, lines = _interrupt(["certs", "list"], _importing, tmp_path, env=env)
        if status != 7:
            break
    assert status == 130, lines
    assert lines[-1:] == INTERRUPTED and not any("Traceback" in line for line in lines), lines


@SQLITE_ONLY
def test_sigint_stops_the_agent_during_a_request(ctx: Context, tmp_path: Path) -> None:
    """Ctrl-C is a stop for the agent, as SIGTERM is (docs/rotation.md): exit 0."""
    tls = ensure_server_certificate(ctx)
    with fake_server(tls.cert_path, tls.key_path, silent=True) as server:
        args = ["agent", "--server", server.url, "--bundle", str(tls.bundle_path)]
        args += ["--dir", str(tmp_path / "svid"), "--token", "trellis-join-secret"]
        status, lines = _interrupt(args, lambda _log: server.accepted > 0, tmp_path)
    assert status == 0, lines
    assert "stopped" in lines[-1], lines
    assert not (tmp_path / "svid" / "svid.pem").exists()


# Runs ``trellis`` in-process with a SIGINT sent to itself as the command finishes: while the
# database is closed (``Context.close``: the pool's connections) or from an atexit hook, in the
# interpreter's shutdown. The moment is what a Ctrl-C at a terminal hits only by chance.
_LANDING = """
import atexit, os, signal, sys
from ca.config import Context
from cli.launch import main

def sigint():
    os.kill(os.getpid(), signal.SIGINT)

if sys.argv[1] == "closing":
    close = Context.close
    def closing(self):
        sigint()
        close(self)
    Context.close = closing
else:
    atexit.register(sigint)
sys.argv = ["trellis", *sys.argv[2:]]
main()
"""


@SQLITE_ONLY
def test_a_sigint_once_the_command_is_done_is_ignored(ctx: Context, tmp_path: Path) -> None:
    """Regression: a Ctrl-C landing as a command finished (its answer printed, its work
    committed) was a traceback from inside SQLAlchemy's pool and 'trellis: interrupted', exit
    130, or a death by SIGINT: the command exits with its own status, nothing more said."""
    settings = ctx.settings
    env = {
        **os.environ,
        "TRELLIS_DATA_DIR": str(settings.data_dir),
        "TRELLIS_DATABASE_URL": settings.database_url,
        "TRELLIS_KEY_PASSPHRASE": PASSPHRASE,
    }
    python = str(Path(TRELLIS).with_name("python"))
    for moment in ("closing", "shutdown"):
        for args, status in ((["authority", "status", "--json"], 0), (["certs", "show", "00"], 2)):
            done = subprocess.run(
                [python, "-c", _LANDING, moment, *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                preexec_fn=_sigint_as_at_a_terminal,
                check=False,
            )
            assert done.returncode == status, (moment, args, done.stderr)
            assert "Traceback" not in done.stderr and "interrupted" not in done.stderr
            if status == 0:
                assert json.loads(done.stdout)["name"] == "mesh" and done.stderr == ""
            else:
                assert done.stderr.startswith("trellis: ") and len(done.stderr.splitlines()) == 1
