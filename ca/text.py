"""Free text a caller asks Trellis to keep and show back: a token's description, a gateway
consumer's contact.

Such text is printed where people read it (``trellis token list``, ``gateway consumer list``,
``--json`` piped into a terminal, an admin UI). A newline there forges a row, an escape sequence
drives the terminal (ESC [ ... recolours, hides or rewrites what follows), and a bidirectional
override or a zero-width character makes the text read as something it is not (Trojan Source,
CVE-2021-42574). None of them has a use in a one-line label, so they are refused where the text
comes in, by one rule for every adapter, rather than escaped wherever it goes out.
"""

from __future__ import annotations

import unicodedata

from ca.errors import InvalidInput

__all__ = ["MAX_FREE_TEXT", "free_text"]

MAX_FREE_TEXT = 255  # the columns that hold it (token.description, gateway_consumer.contact)

# Cc: C0 and C1 controls, DEL. Cf: format characters (U+202E RIGHT-TO-LEFT OVERRIDE, U+200B ZERO
# WIDTH SPACE, U+FEFF). Cs: lone surrogates, which JSON's \uD800 can carry and UTF-8 cannot.
# Zl, Zp: U+2028 and U+2029, line breaks to many renderers. Unassigned code points (Cn) are
# allowed: they are the characters of Unicode versions newer than this Python's tables.
_REFUSED = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def free_text(value: str, what: str, limit: int = MAX_FREE_TEXT) -> str:
    """``value`` if it is at most ``limit`` printable characters, else ``InvalidInput`` naming
    ``what`` ("a description") and the first character refused. Characters, not bytes: the
    columns are sized in characters on both stores."""
    rule = f"{what} is at most {limit} printable characters"
    if len(value) > limit:
        raise InvalidInput(f"{rule}: this one has {len(value)}")
    for at, char in enumerate(value):
        if unicodedata.category(char) in _REFUSED:
            raise InvalidInput(
                f"{rule}: U+{ord(char):04X} at position {at + 1} is a control or format character"
            )
    return value
