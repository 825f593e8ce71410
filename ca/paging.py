"""Keyset pages of certificates, for a reader who continues a listing (REST ``next_after``,
the CLI's ``more: ... --after SERIAL``): ``ca.certs.certificate_page`` and
``ca.gateway.gateway_certificate_page`` page through here, so a limit is judged and a last page
is told the same way in both."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from ca.errors import InvalidInput
from ca.serial import Serial

__all__ = ["MAX_PAGE", "Page", "check_limit", "page"]

MAX_PAGE = 1000

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing, and the serial to continue after (None on the last page)."""

    items: list[T]
    next_after: Serial | None


def check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE:  # SQLite reads a negative LIMIT as none at all
        raise InvalidInput(f"limit must be between 1 and {MAX_PAGE}")


def page(limit: int, read: Callable[[int], list[T]], serial: Callable[[T], Serial]) -> Page[T]:
    """``read(n)``: at most n items in the listing's order, after the cursor. One item more
    than asked tells whether another page exists, so the last page says it is the last and a
    full one never leaves the reader guessing."""
    check_limit(limit)
    items = read(limit + 1)
    more, items = len(items) > limit, items[:limit]
    return Page(items, serial(items[-1]) if more else None)
