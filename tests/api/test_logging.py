"""Structured logs: JSON lines carrying the request id the response also returns."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from ca.logs import JsonFormatter, _RequestId
from tests.api.restkit import Rest


def test_access_log_lines_are_json_with_the_request_id(
    rest: Rest, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.handler.addFilter(_RequestId())
    with caplog.at_level(logging.INFO, logger="trellis.access"):
        response = rest.client.get("/v1/entries", headers={**rest.admin, "X-Request-ID": "req-77"})
    assert response.headers["x-request-id"] == "req-77"
    records = [r for r in caplog.records if r.name == "trellis.access"]
    assert records, "no access log line"
    line = json.loads(JsonFormatter().format(records[-1]))
    assert line["request_id"] == "req-77"
    assert line["status"] == 200 and line["message"] == "GET /v1/entries 200"
    assert line["level"] == "info" and "time" in line and line["ms"] >= 0


def test_an_insane_request_id_is_replaced_and_still_returned(rest: Rest) -> None:
    response = rest.client.get("/healthz", headers={"X-Request-ID": "x" * 200 + "\n"})
    returned = response.headers["x-request-id"]
    assert returned and len(returned) == 32 and returned.isalnum()
    problem = rest.client.get("/v1/entries", headers={"X-Request-ID": "req-78"})
    assert problem.status_code == 401 and problem.json()["request_id"] == "req-78"


def test_configured_json_lines_carry_the_message_and_extras_only() -> None:
    """As a server logs: ``configure_logging`` switches off the caller, thread and process
    lookups (they are not shown); a line still has its fields, and nothing left empty."""
    script = (
        "import logging\n"
        "from ca.logs import REQUEST_ID, configure_logging\n"
        "configure_logging(json_lines=True)\n"
        "REQUEST_ID.set('req-9')\n"
        "logging.getLogger('trellis.access').info('%s %d', 'GET /x', 200, extra={'ms': 1.5})\n"
        "logging.getLogger('trellis.access').debug('below the level')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    line = json.loads(lines[0])
    assert set(line) == {"time", "level", "logger", "message", "ms", "request_id"}
    assert line["message"] == "GET /x 200" and line["ms"] == 1.5 and line["request_id"] == "req-9"
    assert line["level"] == "info" and line["logger"] == "trellis.access"
