"""Logging: JSON lines when stderr is not a terminal (collectors parse them), readable text when
it is; every record made while serving a request carries that request's id.

``TRELLIS_DEBUG=1`` in the environment (``debugging``) has ``trellis serve`` lower Trellis's own
loggers (``trellis.*``) to DEBUG: what they log at that level (a database outage's traceback,
once; a scheduled job's result that repeats) was dropped, and nothing could show it. The root
stays at INFO, so uvicorn's, SQLAlchemy's and asyncio's debug records stay out. The workers of
``trellis serve --workers N`` inherit the variable with the rest of the environment.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import os
import sys

__all__ = ["CLI_REQUEST_PREFIX", "DEBUG_VARIABLE", "REQUEST_ID", "configure_logging", "debugging"]

DEBUG_VARIABLE = "TRELLIS_DEBUG"

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
# What a CLI command's request id starts with (``cli-<16 hex>``, ``cli.common.State``), and no
# REST request's may (``api.requestid``): in the audit trail it tells a change made on the host
# from one made over the API.
CLI_REQUEST_PREFIX = "cli-"
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
# One encoder for every record: ``json.dumps(..., default=str)`` builds a new one per call.
_ENCODE = json.JSONEncoder(default=str).encode


class _RequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if value is not None and key not in _STANDARD:
                document[key] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return _ENCODE(document)


def debugging() -> bool:
    """Whether ``TRELLIS_DEBUG`` asks for Trellis's debug records (any value but empty or 0)."""
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def configure_logging(
    *, json_lines: bool | None = None, level: int = logging.INFO, debug: bool = False
) -> None:
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    handler = logging.StreamHandler()
    handler.addFilter(_RequestId())
    handler.setFormatter(
        JsonFormatter()
        if json_lines
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    # Neither format shows where a call was made from, nor the thread, process or task: not
    # looking them up saves a fifth of a record's cost, which the access log pays per request
    # (the logging HOWTO's "Optimization" section names these switches).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # type: ignore[attr-defined,unused-ignore]  # 3.12 on
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if debug:
        logging.getLogger("trellis").setLevel(logging.DEBUG)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # trellis.access logs each request, with its request id; uvicorn's line would repeat it.
    # Without a handler of its own or propagation, uvicorn does not even format it.
    logging.getLogger("uvicorn.access").propagate = False
