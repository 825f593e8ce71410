"""Durations as written by operators: ``30s``, ``15m``, ``1h``, ``7d``, ``10y`` (365 days)."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from ca.errors import InvalidInput

__all__ = ["Ttl"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "y": 365 * 86400}
_PATTERN = re.compile(r"^([1-9][0-9]{0,9})([smhdy])$")
# Longer than any sane certificate and small enough that datetime arithmetic never overflows.
_MAX_SECONDS = 100 * 365 * 86400


@dataclass(frozen=True, slots=True, order=True)
class Ttl:
    """A positive lifetime in whole seconds."""

    seconds: int

    def __post_init__(self) -> None:
        if not 0 < self.seconds <= _MAX_SECONDS:
            raise InvalidInput(f"duration must be between 1s and 100y, got {self.seconds}s")

    @classmethod
    def parse(cls, text: str) -> Ttl:
        match = _PATTERN.match(text.strip())
        if match is None:
            raise InvalidInput(f"invalid duration {text[:32]!r}: write it like 30s, 15m, 1h or 7d")
        return cls(int(match.group(1)) * _UNITS[match.group(2)])

    @property
    def delta(self) -> dt.timedelta:
        return dt.timedelta(seconds=self.seconds)

    def __str__(self) -> str:
        for unit in ("y", "d", "h", "m"):
            if self.seconds % _UNITS[unit] == 0:
                return f"{self.seconds // _UNITS[unit]}{unit}"
        return f"{self.seconds}s"
