"""Certificate serial numbers: positive, >= 64 random bits, <= 20 octets (RFC 5280 §4.1.2.2)."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from ca.errors import InvalidInput

__all__ = ["Serial"]

_HEX = re.compile(r"^[0-9a-f]{1,40}$")


@dataclass(frozen=True, slots=True, order=True)
class Serial:
    value: int

    def __post_init__(self) -> None:
        if not 0 < self.value < 2**159:
            raise InvalidInput("a serial number must be positive and fit in 20 octets")

    @classmethod
    def random(cls) -> Serial:
        """159 random bits (a positive DER INTEGER within 20 octets), never below 2**64."""
        while True:
            value = secrets.randbits(159)
            if value >= 2**64:
                return cls(value)

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
