"""Free text kept and shown back (``ca.text.free_text``): at most 255 printable characters."""

from __future__ import annotations

import pytest

from ca.errors import InvalidInput
from ca.text import MAX_FREE_TEXT, free_text

ACCEPTED = {
    "ok/empty": "",
    "ok/ascii": "deploy bot for ci, rotate monthly",
    "ok/max-length": "d" * MAX_FREE_TEXT,
    "ok/accents-and-cjk": "équipe paiements / 支付团队",
    "ok/emoji": "on-call \U0001f6a8",
    "ok/no-break-space": "a\u00a0b",
}

REFUSED = {
    "fail/one-too-many": ("d" * (MAX_FREE_TEXT + 1), "this one has 256"),
    "fail/newline": ("a\nb", "U+000A at position 2"),
    "fail/carriage-return": ("a\rb", "U+000D"),
    "fail/tab": ("a\tb", "U+0009"),
    "fail/escape": ("\x1b[31mred", "U+001B at position 1"),
    "fail/del": ("a\x7f", "U+007F"),
    "fail/c1-next-line": ("a\x85b", "U+0085"),
    "fail/bidi-override": ("\u202eevil", "U+202E"),
    "fail/bidi-isolate": ("a\u2066b", "U+2066"),
    "fail/zero-width-space": ("ad\u200bmin", "U+200B"),
    "fail/byte-order-mark": ("\ufeffa", "U+FEFF"),
    "fail/line-separator": ("a\u2028b", "U+2028"),
    "fail/paragraph-separator": ("a\u2029b", "U+2029"),
    "fail/lone-surrogate": ("a\ud800", "U+D800"),
}


@pytest.mark.parametrize("text", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_printable_text_is_kept_as_given(text: str) -> None:
    assert free_text(text, "a description") == text


@pytest.mark.parametrize(("text", "reason"), REFUSED.values(), ids=REFUSED.keys())
def test_long_or_unprintable_text_is_refused(text: str, reason: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        free_text(text, "a description")
    assert caught.value.detail.startswith("a description is at most 255 printable characters")
    assert reason in caught.value.detail
