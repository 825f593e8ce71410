"""Structured logs: JSON lines carrying the request id the response also returns."""

from __future__ import annotations

import json
import logging

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
