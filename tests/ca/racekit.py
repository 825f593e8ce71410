"""Making a race happen on purpose: one side held inside its transaction at a named call while
the other runs, on a real database."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

# How long the second side is given to get as far as it can while the first is held: on the
# old code it read what the held side had not committed yet, well within this; on the new one
# it waits for a lock, and is let go when the held side commits.
HEAD_START = 0.5


@dataclass
class Hold:
    inside: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


@contextmanager
def held(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> Iterator[Hold]:
    """The first call of ``owner.name`` (from any thread) waits, once it has signalled
    ``inside``, until ``release`` is set (at the latest when the block ends); later calls go
    straight through."""
    original = getattr(owner, name)
    hold, taken = Hold(), threading.Lock()

    def waiting(*args: Any, **kwargs: Any) -> Any:
        if taken.acquire(blocking=False):
            hold.inside.set()
            hold.release.wait(30)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, waiting)
    try:
        yield hold
    finally:
        hold.release.set()


class Outcome:
    """A call run in a thread of its own: ``result()`` waits for it and gives what it returned,
    or the exception it raised."""

    def __init__(self, call: Callable[[], object]) -> None:
        self._value: object = None
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], object]) -> None:
        try:
            self._value = call()
        except Exception as error:
            self._value = error

    def wait(self, seconds: float) -> None:
        self._thread.join(seconds)

    def result(self) -> object:
        self._thread.join(30)
        assert not self._thread.is_alive(), "still running after 30 s"
        return self._value


def first_held(
    monkeypatch: pytest.MonkeyPatch,
    owner: object,
    name: str,
    first: Callable[[], object],
    second: Callable[[], object],
) -> tuple[object, object]:
    """``first`` held inside its transaction at ``owner.name`` while ``second`` starts and gets
    ``HEAD_START`` seconds; then ``first`` goes on. (first's outcome, second's)"""
    with held(monkeypatch, owner, name) as hold:
        one = Outcome(first)
        assert hold.inside.wait(20), f"{name} was never reached"
        two = Outcome(second)
        two.wait(HEAD_START)
    return one.result(), two.result()
