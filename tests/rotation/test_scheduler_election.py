"""One scheduler per ``trellis serve``: with several workers, the worker holding the data
directory's ``scheduler.lock`` runs the jobs (``ca.scheduler.elect_scheduler``), and the serve
parent becomes a uvicorn-only supervisor (``cli.supervisor``).

Real processes and real ``flock``: the election is run in two Python processes, and in a real
``trellis serve --workers 2`` whose scheduling worker is killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from tests.cli.test_walkthrough import Trellis

CANDIDATE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from ca.scheduler import elect_scheduler

    class Started:
        def shutdown(self, wait):
            pass

    def start(ctx):
        print("leader", flush=True)
        return Started()

    elect_scheduler(None, Path(sys.argv[1]), retry_seconds=0.1, start=start)
    time.sleep(60)
    """
)


def candidate(lock: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CANDIDATE, str(lock)], stdout=subprocess.PIPE, text=True
    )


def wait_for_line(process: subprocess.Popen[str], seconds: float) -> str | None:
    """The next line ``process`` prints within ``seconds`` (None if it prints none)."""
    assert process.stdout is not None
    os.set_blocking(process.stdout.fileno(), False)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line:
            return line.strip()
        time.sleep(0.05)
    return None


def test_one_leader_among_processes_and_a_successor_when_it_dies(tmp_path: Path) -> None:
    lock = tmp_path / "scheduler.lock"
    first = candidate(lock)
    try:
        assert wait_for_line(first, 10) == "leader"
        second = candidate(lock)
        try:
            assert wait_for_line(second, 1.5) is None  # the lock is held: no second scheduler
            first.send_signal(signal.SIGKILL)  # dies without any clean-up: the kernel frees it
            first.wait(10)
            assert wait_for_line(second, 5) == "leader"
        finally:
            stop(second)
    finally:
        stop(first)


def stop(process: subprocess.Popen[str]) -> None:
    process.kill()
    process.wait(10)
    assert process.stdout is not None
    process.stdout.close()


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_text().split("\0")[:-1]


def children(pid: int) -> set[int]:
    return {int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def scheduler_leaders(log: Path) -> list[int]:
    return [
        int(json.loads(line)["message"].split("pid ")[1].split(")")[0])
        for line in log.read_text().splitlines()
        if "runs the scheduled jobs" in line
    ]


@pytest.mark.slow
def test_serve_with_workers_runs_one_scheduler_in_a_worker_and_replaces_it(tmp_path: Path) -> None:
    cli = Trellis(tmp_path / "var", f"sqlite:///{tmp_path / 'trellis.db'}")
    cli.set_up("init", "--trust-domain", "example.org")
    log = tmp_path / "serve.log"
    with cli.serving(log, "--workers", "2") as serving:
        serve, port, tls = serving.process, serving.port, serving.tls
        deadline = time.monotonic() + 30
        while not scheduler_leaders(log):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)

        assert cmdline(serve.pid)[1:3] == ["-m", "cli.supervisor"]  # the same pid, exec'd
        workers = {p for p in children(serve.pid) if "spawn_main" in " ".join(cmdline(p))}
        (leader,) = scheduler_leaders(log)
        assert leader in workers and len(workers) == 2

        os.kill(leader, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while len(scheduler_leaders(log)) < 2:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        successor = scheduler_leaders(log)[1]
        assert successor != leader and successor in children(serve.pid)
        assert httpx.get(f"https://127.0.0.1:{port}/readyz", verify=tls).is_success
        # The successor runs every job once it leads, one after the other: the first leader
        # was killed as soon as it said it led, so the runs are the successor's, and its last
        # jobs may still be running when it is seen to lead.
        deadline = time.monotonic() + 30
        while True:
            jobs = json.loads(cli.set_up("jobs", "list", "--json"))
            assert isinstance(jobs, list)
            if all(job["runs"] >= 1 for job in jobs):
                break
            assert time.monotonic() < deadline, jobs
            time.sleep(0.2)
        serve.terminate()
        assert serve.wait(30) == 0, log.read_text()  # a clean stop of supervisor and workers
