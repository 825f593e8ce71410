"""Durations as written by operators: ``30s``, ``15m``, ``1h``, ``7d``, ``10y`` (365 days)."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from ca.errors import InvalidInput

__all__ = ["MIN_SVID_TTL", "Ttl", "svid_ttl"]

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


# The shortest SVID life an entry may give or a caller ask for. An agent renews at half-life
# and retries no faster than once a second: a 1-second SVID (0.07 s of it left once notAfter
# was cut to a whole second) expired before each renewal, and every expiry spent a join-token
# use. Five seconds leaves it 2.5 s to renew and a retry; the drills' 6 to 20-second SVIDs fit.
MIN_SVID_TTL = Ttl(5)


def svid_ttl(ttl: Ttl, what: str) -> Ttl:
    """``ttl`` if it is at least ``MIN_SVID_TTL``; ``InvalidInput`` naming ``what`` otherwise."""
    if ttl < MIN_SVID_TTL:
        raise InvalidInput(
            f"{what} {ttl} is shorter than the minimum SVID lifetime, {MIN_SVID_TTL}"
        )
    return ttl
