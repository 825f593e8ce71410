"""Time as a dependency.

Validity windows are the heart of a CA, so nothing in ``ca`` reads the wall clock directly: it is
handed a ``Clock``. Tests pass a ``FixedClock`` and assert exact notBefore/notAfter values.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["Clock", "FixedClock", "SystemClock", "utc"]


def utc(value: dt.datetime) -> dt.datetime:
    """Normalise to an aware UTC datetime (naive values are taken to be UTC already)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


class Clock(Protocol):
    def now(self) -> dt.datetime:
        """The current time, timezone-aware UTC, whole seconds (X.509 times have no fractions)."""
        ...


class SystemClock:
    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC).replace(microsecond=0)


@dataclass
class FixedClock:
    """A clock that only moves when told to."""

    current: dt.datetime = field(default_factory=lambda: dt.datetime(2026, 1, 1, tzinfo=dt.UTC))

    def now(self) -> dt.datetime:
        return utc(self.current).replace(microsecond=0)

    def advance(self, delta: dt.timedelta) -> None:
        self.current = self.current + delta
