"""``trellis serve`` over its life: a serving key that is gone or not its certificate's, a
worker that cannot start, SIGHUP, and how it exits on SIGTERM and SIGINT (docs/operations.md).
Each test runs the real command."""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ca.pem import private_key_pem
from cli.supervisor import StartLimit
from tests.cli.test_serve_workers import wait_for, workers_of
from tests.cli.test_walkthrough import TRELLIS, Trellis
from tests.conftest import free_port
from tests.processes import terminate


def _initialised(tmp_path: Path) -> Trellis:
    cli = Trellis(tmp_path / "var", f"sqlite:///{tmp_path / 'trellis.db'}")
    cli.set_up("init", "--trust-domain", "example.org")
    return cli


def _two_ready_workers(supervisor: int, log: Path) -> list[int]:
    """The pids of a two-worker serve's workers once both are ready. /readyz answered from one
    of them; the other may still be starting (a loaded machine), and a test that kills it then
    meets a death before readiness. A worker is ready as it logs this (cli.supervisor:
    ``HandedServer.startup``)."""
    wait_for(lambda: len(workers_of(supervisor)) == 2, "two workers")
    wait_for(lambda: log.read_text().count("Application startup complete.") == 2, "ready")
    time.sleep(0.1)
    return workers_of(supervisor)


def test_serve_repairs_a_serving_key_that_is_gone_or_foreign(tmp_path: Path) -> None:
    """The banner printed, then 'trellis: No such file or directory' (or KEY_VALUES_MISMATCH),
    exit 8, on every start until someone removed server/tls.crt too."""
    cli = _initialised(tmp_path)
    with cli.serving(tmp_path / "first.log"):
        pass
    key = cli.data_dir / "server" / "tls.key"
    for damage, reason in (
        (key.unlink, "is missing"),
        (
            lambda: key.write_bytes(private_key_pem(ec.generate_private_key(ec.SECP256R1()))),
            "does not match the certificate",
        ),
    ):
        damage()
        log = tmp_path / "serve.log"
        with cli.serving(log) as serve:
            assert httpx.get(f"{serve.url}/healthz", verify=serve.tls).is_success
        assert f"issuing a new serving certificate: its key {key} {reason}" in log.read_text()


def test_a_worker_that_cannot_load_the_serving_key_stops_the_service(tmp_path: Path) -> None:
    """A worker restarted after server/tls.key went away died of FileNotFoundError and was
    started again, twice a second, forever, each with a raw traceback: the service never
    exited, so systemd's Restart=on-failure never fired. Now the worker says why in one log
    line and exits STARTUP_FAILURE, and the supervisor stops with exit 8."""
    cli = _initialised(tmp_path)
    log = tmp_path / "serve.log"
    key = cli.data_dir / "server" / "tls.key"
    with cli.serving(log, "--workers", "2") as serve:
        wait_for(lambda: len(workers_of(serve.process.pid)) == 2, "two workers")
        # A directory where the key goes: the server-certificate job (every 10 s in the other
        # worker) would repair a key that is merely missing before the replacement loads it.
        key.unlink()
        key.mkdir()
        os.kill(workers_of(serve.process.pid)[0], signal.SIGKILL)
        assert serve.process.wait(30) == 8, log.read_text()
    lines = log.read_text().splitlines()
    banner = [line for line in lines if not line.startswith("{")]
    assert len(banner) == 5 and banner[0] == "Trellis serving example.org", banner
    records = [json.loads(line) for line in lines if line.startswith("{")]
    errors = [
        r["message"] for r in records if r["level"] == "error" and "cannot start" in r["message"]
    ]
    assert len(errors) == 2, errors
    assert errors[0].endswith(
        f"cannot start: cannot load the serving certificate: {key}: Is a directory"
    )
    assert errors[1].endswith("cannot start (its line above says why): stopping")
    # the killed worker's replacement, and no more
    assert sum("starting another" in r["message"] for r in records) == 1


def test_sighup_reloads_a_single_process_instead_of_killing_it(tmp_path: Path) -> None:
    """SIGHUP (Python's default) killed a single-process server at once: the requests under
    way got EOF and nothing was logged, though docs/operations.md promised a replacement of
    the workers one by one. It now re-reads the serving pair and goes on serving."""
    cli = _initialised(tmp_path)
    log = tmp_path / "serve.log"
    with cli.serving(log) as serve:
        with httpx.Client(verify=serve.tls) as client:
            assert client.get(f"{serve.url}/healthz").is_success  # a connection kept open
            serve.process.send_signal(signal.SIGHUP)
            wait_for(lambda: "reloaded the serving certificate" in log.read_text(), "reload")
            assert serve.process.poll() is None
            assert client.get(f"{serve.url}/healthz").is_success  # on the same connection
        assert serve.process.poll() is None, log.read_text()
    assert "SIGHUP: a single process has no workers to replace" in log.read_text()


def test_a_sighup_restart_that_cannot_start_a_worker_says_it_was_abandoned(
    tmp_path: Path,
) -> None:
    """A worker a SIGHUP started that could not load the serving pair ended the restart
    silently, its own line the only trace. The old workers serve on, and a warning says so."""
    cli = _initialised(tmp_path)
    log = tmp_path / "serve.log"
    key = cli.data_dir / "server" / "tls.key"
    with cli.serving(log, "--workers", "2") as serve:
        wait_for(lambda: len(workers_of(serve.process.pid)) == 2, "two workers")
        before = sorted(workers_of(serve.process.pid))
        # A directory where the key goes: the server-certificate job cannot repair it.
        key.unlink()
        key.mkdir()
        serve.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP: abandoned" in log.read_text(), "the restart abandoned")
        assert httpx.get(f"{serve.url}/healthz", verify=serve.tls).is_success
        assert sorted(workers_of(serve.process.pid)) == before
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    (abandoned,) = [r for r in records if "SIGHUP: abandoned" in r["message"]]
    assert abandoned["level"] == "warning"
    # Why it did not start: its own line, or under load "not ready within 5 s" (uvicorn's
    # timeout_worker_healthcheck) before it got as far as the key.
    assert re.fullmatch(
        r"SIGHUP: abandoned the restart of the workers: worker \[\d+\] did not start"
        r" \((its line above says why|not ready within 5 s)\);"
        r" 0 of 2 replaced, the old ones keep serving",
        abandoned["message"],
    ), abandoned["message"]


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["term", "int"])
def test_a_stop_asked_for_by_a_signal_is_exit_0(
    tmp_path: Path, workers: str, signum: signal.Signals
) -> None:
    """A single process died of SIGTERM (uvicorn raised it again after its graceful stop) and
    exited 130 on SIGINT, where 'serve --workers 2' exited 0 on both: the same stop looked
    like a failure or not by the worker count. A graceful stop is exit 0 (docs/operations.md)."""
    cli = _initialised(tmp_path)
    log = tmp_path / "serve.log"
    with cli.serving(log, "--workers", workers) as serve:
        serve.process.send_signal(signum)
        assert serve.process.wait(30) == 0, log.read_text()
    assert "Traceback" not in log.read_text()
    assert "trellis: interrupted" not in log.read_text()


def _worker_errors(log: Path) -> list[str]:
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [r["message"] for r in records if r["level"] == "error" and "start" in r["message"]]


def test_a_worker_that_fails_before_it_is_ready_stops_the_service(tmp_path: Path) -> None:
    """A worker that crashed after serving is replaced; its replacement could not start (here
    the passphrase file is no longer readable: a volume not mounted, a file moved) and exited
    1, and the supervisor started another every few seconds, forever, each with a traceback:
    the service never exited, so systemd's Restart=on-failure never fired. Now the worker says
    why in one line and the supervisor stops with exit 8, as for a serving key it cannot load."""
    cli = Trellis(tmp_path / "var", f"sqlite:///{tmp_path / 'trellis.db'}")
    del cli.env["TRELLIS_KEY_PASSPHRASE"]  # init writes var/key-passphrase, which serve reads
    cli.set_up("init", "--trust-domain", "example.org")
    log = tmp_path / "serve.log"
    passphrase = cli.data_dir / "key-passphrase"
    with cli.serving(log, "--workers", "2") as serve:
        wait_for(lambda: len(workers_of(serve.process.pid)) == 2, "two workers")
        passphrase.rename(tmp_path / "moved-away")
        passphrase.mkdir()
        os.kill(workers_of(serve.process.pid)[0], signal.SIGKILL)
        assert serve.process.wait(30) == 8, log.read_text()
    errors = _worker_errors(log)
    assert len(errors) == 2, errors
    assert f"cannot start: cannot read the key passphrase file {passphrase}" in errors[0], errors
    assert errors[1].endswith("cannot start (its line above says why): stopping")
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert sum("starting another" in r["message"] for r in records) == 1
    assert "Traceback" not in log.read_text()


def test_workers_killed_on_every_start_stop_the_service(tmp_path: Path) -> None:
    """A worker killed by a signal before it was ready (a segfault, the OOM killer on every
    start) was replaced forever, a new one every second: the service never exited for
    systemd's Restart=on-failure to see. A worker killed once is still replaced, a ready one
    without counting; five deaths before readiness within 60 s stop the service, exit 8."""
    cli = _initialised(tmp_path)
    log = tmp_path / "serve.log"
    with cli.serving(log, "--workers", "2") as serve:
        first, other = _two_ready_workers(serve.process.pid, log)
        os.kill(first, signal.SIGKILL)  # a ready worker, killed by an operator: replaced
        seen, killed = {first, other}, 0
        # Each replacement, as soon as it appears: seconds before it has imported the app.
        while serve.process.poll() is None and killed < 20:
            new = set(workers_of(serve.process.pid)) - seen
            for pid in new:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            seen |= new
            time.sleep(0.02)
        assert serve.process.wait(30) == 8, log.read_text()
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    deaths = [r["message"] for r in records if "died" in r["message"]]
    assert deaths[0] == f"worker [{first}] died; starting another", deaths
    early = deaths[1:]
    assert len(early) == 5 and killed == 5, deaths
    assert all(
        d.endswith("died before it was ready (killed by SIGKILL); starting another")
        for d in early[:4]
    ), early
    assert early[4].startswith("workers died before they were ready 5 times within 60 s (the")
    assert early[4].endswith(": killed by SIGKILL): stopping"), early
    assert [r["level"] for r in records if r["message"] == early[4]] == ["error"]
    assert "Traceback" not in log.read_text()


def test_a_hung_worker_is_killed_and_said_to_be_hung(tmp_path: Path) -> None:
    """A worker that stops answering (SIGSTOP here; a deadlock, a stuck syscall) is killed by
    the supervisor's health check after 5 s and replaced, as uvicorn does; the log said only
    "died", as if it had crashed by itself."""
    cli = _initialised(tmp_path)
    log = tmp_path / "serve.log"
    with cli.serving(log, "--workers", "2") as serve:
        stopped, other = _two_ready_workers(serve.process.pid, log)
        os.kill(stopped, signal.SIGSTOP)
        wait_for(lambda: stopped not in workers_of(serve.process.pid), "killed", seconds=30)
        wait_for(lambda: len(workers_of(serve.process.pid)) == 2, "replaced")
        assert other in workers_of(serve.process.pid)
        assert serve.process.poll() is None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    mine = f"worker [{stopped}] "
    said = [(r["level"], r["message"]) for r in records if r["message"].startswith(mine)]
    assert said == [
        (
            "warning",
            f"worker [{stopped}] did not answer its health check within 5 s (hung or stopped):"
            " killed",
        ),
        ("info", f"worker [{stopped}] died; starting another"),
    ], said


def test_the_start_limit_counts_deaths_within_its_window() -> None:
    """Deaths spread wider than the window (a worker the OOM killer takes now and then while
    it starts) never stop the service; the fifth within it does."""
    now = [0.0]
    limit = StartLimit(5, 60.0, clock=lambda: now[0])
    for when in (0, 20, 40, 50, 61, 81, 101):  # every five span 61 s
        now[0] = when
        assert not limit.reached(), when
    now[0] = 102  # 50, 61, 81, 101, 102
    assert limit.reached()


def test_workers_take_the_options_over_the_variables_they_override(tmp_path: Path) -> None:
    """``--workers 2`` beside a ``TRELLIS_WORKERS`` that is not a number: serve read the option,
    its workers the variable, which they refused; they were started again and again, and the
    service never served. The workers take what serve took."""
    cli = _initialised(tmp_path)
    cli.env.update(TRELLIS_WORKERS="two", TRELLIS_PORT="not-a-port")
    log = tmp_path / "serve.log"
    with cli.serving(log, "--workers", "2") as serve:
        wait_for(lambda: len(workers_of(serve.process.pid)) == 2, "two workers")
        assert httpx.get(f"{serve.url}/healthz", verify=serve.tls).is_success
    assert _worker_errors(log) == []


def _hangup_taken(pid: int) -> bool:
    """SIGHUP is ignored or caught by ``pid``: no longer its default, which kills."""
    fields = dict(
        line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    bit = 1 << (signal.SIGHUP - 1)
    return bool((int(fields["SigIgn"], 16) | int(fields["SigCgt"], 16)) & bit)


def _default_hangup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as a service manager starts it


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_while_serve_starts_never_kills_it(tmp_path: Path, workers: str) -> None:
    """SIGHUP was left at its default (death) until the server started: in the second or more
    ``serve`` spends importing, checking the CA, issuing its certificate and (``--workers``)
    starting the supervisor, a ``systemctl reload`` or a ``kill -HUP`` killed it. It is
    ignored from the entry point on, across the supervisor's ``exec``, until the server's own
    handler takes it."""
    cli = _initialised(tmp_path)
    log = tmp_path / "serve.log"
    port = free_port()
    with log.open("w") as out:
        process = subprocess.Popen(
            [TRELLIS, "serve", "--port", str(port), "--workers", workers],
            env=cli.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_default_hangup,
        )
    tls = ssl.create_default_context(cafile=str(cli.data_dir / "bundle.pem"))

    def banner() -> bool:
        return "Trellis serving" in log.read_text()

    def ready() -> bool:
        try:
            return httpx.get(f"https://127.0.0.1:{port}/readyz", verify=tls, timeout=2).is_success
        except httpx.HTTPError:
            return False

    try:
        wait_for(
            lambda: process.poll() is not None or _hangup_taken(process.pid) or banner(), "start"
        )
        assert process.poll() is None and not banner(), log.read_text()
        assert _hangup_taken(process.pid), "SIGHUP would kill serve while it starts"
        process.send_signal(signal.SIGHUP)  # while it imports and checks the CA
        wait_for(lambda: process.poll() is not None or banner(), "the banner", seconds=30)
        process.send_signal(signal.SIGHUP)  # while the server (the supervisor) starts
        wait_for(lambda: process.poll() is not None or ready(), "ready", seconds=30)
        assert process.poll() is None, log.read_text()
        process.send_signal(signal.SIGHUP)  # once it serves, as before: it goes on serving
        time.sleep(0.5)
        wait_for(lambda: process.poll() is not None or ready(), "ready again", seconds=30)
        assert process.poll() is None, log.read_text()
        process.terminate()
        assert process.wait(30) == 0, log.read_text()
    finally:
        terminate(process)


def test_a_start_refused_for_another_instances_database_writes_nothing(tmp_path: Path) -> None:
    """A data dir paired with another instance's database: start-up is refused (exit 8, a CA
    key is missing), but the scheduled transitions it ran first had already rewritten
    ``bundle.pem`` with the other instance's roots, and left one in an empty data dir.
    The keys are checked first now."""
    two = Trellis(tmp_path / "two", f"sqlite:///{tmp_path / 'two.db'}")
    two.set_up("init", "--trust-domain", "two.org")
    three = Trellis(tmp_path / "three", f"sqlite:///{tmp_path / 'three.db'}")
    three.set_up("init", "--trust-domain", "three.org")
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    bundle = (two.data_dir / "bundle.pem").read_bytes()
    for data_dir in (two.data_dir, empty):
        cli = Trellis(data_dir, three.env["TRELLIS_DATABASE_URL"])
        refused = cli.run("serve", "--port", str(free_port()), ok=False)
        assert refused.returncode == 8, refused
        assert refused.stderr.splitlines()[-1].startswith("trellis: CA key mesh-"), refused
        assert "is missing from the file key store" in refused.stderr
        assert "listening on" not in refused.stdout
    assert (two.data_dir / "bundle.pem").read_bytes() == bundle
    assert not (empty / "bundle.pem").exists() and not (empty / "server").exists()
