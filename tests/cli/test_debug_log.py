"""What ``ca`` logs during a CLI command (cli.launch.OneLineLog), with and without
``TRELLIS_DEBUG``: a failure Trellis caught and recorded as unforeseen has a traceback that a
command run by hand had nowhere to show (its record said "see the server log")."""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
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
    """The log records of a ``serve`` stopped once audit-seal (every 2 s) has run twice more,
    or, sooner, once a repeated result of it has been logged at debug (the first is info):
    that record is what the test looks for, and without it two runs show it is not coming."""
    database = Path(cli.env["TRELLIS_DATABASE_URL"].removeprefix("sqlite:///"))
    with cli.serving(log, "--workers", workers) as serve:
        before = _audit_seal_runs(database)
        wait_for(
            lambda: (
                _audit_seal_runs(database) >= before + 2 or _repeated(_records(log, running=True))
            ),
            "two runs of audit-seal",
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
    cli = Trellis(tmp_path / "var", f"sqlite:///{tmp_path / 'trellis.db'}")
    cli.set_up("init", "--trust-domain", "example.org")
    for debug in (False, True):
        if debug:
            cli.env["TRELLIS_DEBUG"] = "1"
        records = _served(cli, tmp_path / f"serve-{debug}.log", workers)
        debugs = [r for r in records if r["level"] == "debug"]
        assert [r for r in debugs if not r["logger"].startswith("trellis.")] == [], debugs
        assert bool(_repeated(records)) is debug, records
