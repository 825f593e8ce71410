"""The ASGI entry point for worker processes (``trellis serve --workers N``).

Each worker builds its own context from the environment ``trellis serve`` exported (settings
are pydantic-settings, so ``TRELLIS_*`` variables carry everything); the database schema was
already migrated by the parent, so workers do not migrate.
"""

from __future__ import annotations

from fastapi import FastAPI

from api.app import create_app
from ca.config import Settings, build_context
from ca.logs import configure_logging

__all__ = ["app_from_environment"]


def app_from_environment() -> FastAPI:
    configure_logging()  # spawned workers start with no logging configuration
    return create_app(build_context(Settings(), migrate=False))
