"""The ASGI entry point for worker processes (``trellis serve --workers N``).

Each worker builds its own context from the environment ``trellis serve`` exported (settings
are pydantic-settings, so ``TRELLIS_*`` variables carry everything); the database schema was
already migrated by the parent, so workers do not migrate. One of the workers runs the scheduled
jobs: whichever holds the data directory's scheduler lock (``ca.scheduler.elect_scheduler``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from api.app import create_app, freeze_startup_heap
from ca.config import build_context, load_settings
from ca.logs import configure_logging, debugging
from ca.scheduler import elect_scheduler
from ca.store.db import SchemaPolicy

__all__ = ["SCHEDULER_LOCK", "app_from_environment"]

SCHEDULER_LOCK = "scheduler.lock"


def app_from_environment() -> FastAPI:
    configure_logging(debug=debugging())  # spawned workers start with no logging configuration
    # load_settings: a bad variable is one line naming it (cli.supervisor logs it), not pydantic's
    # dozen lines and a URL.
    ctx = build_context(load_settings(), schema=SchemaPolicy.TRUSTED, serving=True)
    app = create_app(ctx)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(application: Any) -> AsyncIterator[Any]:
        stop = elect_scheduler(ctx, ctx.settings.data_dir / SCHEDULER_LOCK)
        try:
            async with inner(application) as state:
                freeze_startup_heap()
                yield state
        finally:
            stop()

    app.router.lifespan_context = lifespan
    return app
