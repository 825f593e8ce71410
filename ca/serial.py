"""Certificate serial numbers: positive, >= 64 random bits, <= 20 octets (RFC 5280 §4.1.2.2).

New serials start with the time they were made. Serials are the key of the certificate table and
of its status index; purely random keys put every new certificate on a different page of each,
so a commit of a few certificates wrote a dozen scattered index pages to the WAL, while keys that
grow with time land next to each other: about 7 % less CPU per issuance on SQLite, more as the
table grows (docs/benchmarks.md, change 34). The 96 random bits below the time keep serials
unpredictable and unique (CA/Browser Forum Baseline Requirements 7.1 ask for 64)."""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass

from ca.errors import InvalidInput

__all__ = ["Serial"]

_HEX = re.compile(r"^[0-9a-f]{1,40}$")
RANDOM_BITS = 96
_MARK = 1 << 150  # above every millisecond count of the next 500,000 years


@dataclass(frozen=True, slots=True, order=True)
class Serial:
    value: int

    def __post_init__(self) -> None:
        if not 0 < self.value < 2**159:
            raise InvalidInput("a serial number must be positive and fit in 20 octets")

    @classmethod
    def generate(cls, at: float | None = None) -> Serial:
        """``_MARK``, then the Unix time in milliseconds (now, or ``at`` in seconds), then
        ``RANDOM_BITS`` random bits: 151 bits, a positive DER INTEGER of 19 octets, always
        written with 38 hex digits, so the stored text sorts like the number."""
        millis = time.time_ns() // 1_000_000 if at is None else int(at * 1000)
        return cls(_MARK | millis << RANDOM_BITS | secrets.randbits(RANDOM_BITS))

    @classmethod
    def parse(cls, text: str) -> Serial:
        """Accept what operators paste: ``0A:1B``, ``0x0a1b`` or ``0a1b`` (any case)."""
        cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
        if not _HEX.match(cleaned):
            raise InvalidInput(f"invalid serial {text[:64]!r}: expected up to 40 hex digits")
        return cls(int(cleaned, 16))

    @property
    def hex(self) -> str:
        return format(self.value, "x")

    def __str__(self) -> str:
        return self.hex
