"""What ``ca`` logs during a CLI command (cli.launch.OneLineLog), with and without
``TRELLIS_DEBUG``: a failure Trellis caught and recorded as unforeseen has a traceback that a
command run by hand had nowhere to show (its record said "see the server log")."""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cli.launch import OneLineLog, debugging
from tests.cli.test_serve_workers import wait_for
from tests.cli.test_walkthrough import Trellis


def _logged(handler: OneLineLog, capsys: pytest.CaptureFixture[str]) -> str:
    log = logging.getLogger("trellis.test-debug-log")
    log.propagate, log.level = False, logging.DEBUG
    log.addHandler(handler)
    try:
        log.info("refreshing partner.org")
        try:
            raise RuntimeError("a bug")
        except RuntimeError:
            log.exception("federation partner.org: the refresh failed unexpectedly")
        log.warning("a plain\n  two-line warning")
    finally:
        log.removeHandler(handler)
    return capsys.readouterr().err


def test_a_caught_traceback_is_announced_not_printed(capsys: pytest.CaptureFixture[str]) -> None:
    assert _logged(OneLineLog(), capsys) == (
        "error: federation partner.org: the refresh failed unexpectedly"
        " (TRELLIS_DEBUG=1 shows its traceback)\n"
        "warning: a plain two-line warning\n"
    )


def test_with_trellis_debug_info_lines_and_the_traceback_follow(
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = _logged(OneLineLog(debug=True), capsys).splitlines()
    assert err[0] == "info: refreshing partner.org"
    assert err[1] == "error: federation partner.org: the refresh failed unexpectedly"
    assert err[2] == "Traceback (most recent call last):"
    assert err[-2] == "RuntimeError: a bug" and err[-1] == "warning: a plain two-line warning"


@pytest.mark.parametrize(("value", "on"), [("", False), ("0", False), ("1", True), ("yes", True)])
def test_trellis_debug_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str, on: bool
) -> None:
    monkeypatch.setenv("TRELLIS_DEBUG", value)
    assert debugging() is on


def _served(cli: Trellis, log: Path, workers: str) -> list[dict[str, str]]:
    """The log records of the first ``serve`` of an instance, stopped once audit-seal (every
    2 s) has run three times, or once a debug record of it is in the log, what the test wants.
    Its first run seals what init and serve's start recorded, its second says "sealed 0", and
    the third, repeating that, is the first logged at debug: right after it is recorded, long
    before the SIGTERM that seeing the record sends takes effect."""
    database = Path(cli.env["TRELLIS_DATABASE_URL"].removeprefix("sqlite:///"))
    assert _audit_seal_runs(database) == 0
    with cli.serving(log, "--workers", workers) as serve:
        wait_for(
            lambda: _audit_seal_runs(database) >= 3 or _repeated(_records(log, running=True)),
            "three runs of audit-seal",
        )
        serve.process.terminate()
        assert serve.process.wait(30) == 0, log.read_text()
    return _records(log)


def _records(log: Path, *, running: bool = False) -> list[dict[str, str]]:
    """Its JSON records; ``running``: the last line may still be being written, and is left."""
    lines = [line for line in log.read_text().splitlines(keepends=True) if line.startswith("{")]
    if running and lines and not lines[-1].endswith("\n"):
        lines.pop()
    return [json.loads(line) for line in lines]


def _repeated(records: list[dict[str, str]]) -> list[dict[str, str]]:
    """audit-seal's result logged again: at debug, as a result that repeats is."""
    return [
        r for r in records if r["level"] == "debug" and r["message"].startswith("job audit-seal: ")
    ]


def _audit_seal_runs(database: Path) -> int:
    """From the job's record: a ``trellis jobs list`` a poll took a second of the CPU the
    server being watched runs on, and saw a run that much later."""
    with contextlib.closing(sqlite3.connect(database)) as connection:
        runs = connection.execute("SELECT SUM(runs) FROM job_run WHERE name = 'audit-seal'")
        return int(runs.fetchone()[0] or 0)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_logs_trellis_debug_records_with_trellis_debug(tmp_path: Path, workers: str) -> None:
    """``serve`` had no way to show a debug record: the scheduler's traceback of a database
    outage, logged once at debug, was seen by nobody. With ``TRELLIS_DEBUG=1`` its log has
    Trellis's own (here a scheduled job's result that repeats, audit-seal's every 2 s), in the
    workers too, and still none of uvicorn's, SQLAlchemy's or asyncio's; without, none."""
    # One instance each, served side by side: most of a serve's time here is waiting for
    # audit-seal's runs, which the other's start-up can use. Apart, as one's runs on a shared
    # database would stand in for the other's (a run is skipped within the interval of one).
    clis = {}
    for debug in (False, True):
        cli = Trellis(tmp_path / f"var-{debug}", f"sqlite:///{tmp_path / f'trellis-{debug}.db'}")
        cli.set_up("init", "--trust-domain", "example.org")
        if debug:
            cli.env["TRELLIS_DEBUG"] = "1"
        clis[debug] = cli
    with ThreadPoolExecutor(2) as pool:
        served = {
            debug: pool.submit(_served, cli, tmp_path / f"serve-{debug}.log", workers)
            for debug, cli in clis.items()
        }
    for debug, future in served.items():
        records = future.result()
        debugs = [r for r in records if r["level"] == "debug"]
        assert [r for r in debugs if not r["logger"].startswith("trellis.")] == [], debugs
        assert bool(_repeated(records)) is debug, records
