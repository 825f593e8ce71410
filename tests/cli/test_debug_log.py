"""What ``ca`` logs during a CLI command (cli.launch.OneLineLog), with and without
``TRELLIS_DEBUG``: a failure Trellis caught and recorded as unforeseen has a traceback that a
command run by hand had nowhere to show (its record said "see the server log")."""

from __future__ import annotations

import logging

import pytest

from cli.launch import OneLineLog, debugging


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
