"""How long-running operations (backup, restore, revoking an identity, sealing and verifying the
audit trail, migrating) report how far they are, without ``ca`` knowing who shows it.

A ``Progress`` is called with the units done so far and the total, or None while the total is
not known: never fewer units than the call before, and, where a total is given, a last call with
done equal to it once the work is done. The CLI draws a bar from it on a terminal
(``cli.progress``); nothing else needs to pass one."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Progress", "report"]

Progress = Callable[[int, int | None], None]


def report(progress: Progress | None, done: int, total: int | None) -> None:
    if progress is not None:
        progress(done, total)
