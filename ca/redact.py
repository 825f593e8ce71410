"""URLs as Trellis shows them: with any password in them masked.

A database URL (``TRELLIS_DATABASE_URL``, ``--database-url``) or a Vault address may carry a
password, as ``user:PASSWORD@`` or in the query (libpq's ``password`` and ``sslpassword``, the
passphrase of ``sslkey``). Trellis repeats such a URL in an error line, a ``more:`` line, a
report or the server's log, all of which end up in terminals' scrollback and log stores, so
every place goes through :func:`masked_url`.

It works on the text, not on a parse of it: the URL to mask is often the one that failed to
parse (a port that is not a number), and the parsers disagree on where a password that was
not %-encoded ends. So it masks the widest reading: from after ``user:`` up to the last ``@``
before the query, or up to the first ``@`` at all, whichever is later (SQLAlchemy reads a
password up to the first ``@``, wherever the query begins, and libpq and RFC 3986 up to the
``@`` before the host). Masking too much only makes a line less useful; masking too little is
the leak this exists to prevent.
"""

from __future__ import annotations

import re

__all__ = ["MASK", "masked_url", "without_userinfo"]

MASK = "***"

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
# A query parameter named like a secret: libpq's password and sslpassword, and what another
# driver or a proxy names one (passwd, pwd, a passphrase, a secret, a token).
_SECRET_PARAMETER = re.compile(
    r"(?P<name>[^=&;?#]*(?:password|passphrase|passwd|pwd|secret|token)[^=&;?#]*)=(?P<value>[^&;#]*)",
    re.IGNORECASE,
)


def masked_url(url: str) -> tuple[str, bool]:
    """``url`` as given, with ``***`` for each password in it (``user:***@``,
    ``?password=***``, ``?sslpassword=***``); whether there was one. Any text is taken: one
    that is no URL is returned as it is, unless it looks like one with a password."""
    scheme = _SCHEME.match(url)
    start = scheme.end() if scheme else 0
    head, rest = url[:start], url[start:]
    masked = False
    host = 0  # where the host begins: the query is looked for after it
    end = _userinfo_end(rest)
    if end is not None:
        user, colon, _password = rest[:end].partition(":")
        if colon:
            rest = f"{user}:{MASK}{rest[end:]}"
            host = len(user) + 1 + len(MASK) + 1
            masked = True
    query = rest.find("?", host)
    if query >= 0:
        before, after = rest[: query + 1], rest[query + 1 :]
        after, count = _SECRET_PARAMETER.subn(lambda found: f"{found['name']}={MASK}", after)
        rest = before + after
        masked = masked or count > 0
    return head + rest, masked


def without_userinfo(url: str) -> str:
    """``url`` with all of its user information, user name and password alike, as ``***``:
    for a URL that should carry none (``--server``, where a token may be what was put there),
    so nothing of what was is repeated."""
    scheme = _SCHEME.match(url)
    start = scheme.end() if scheme else 0
    end = _userinfo_end(url[start:])
    return url if end is None else f"{url[:start]}{MASK}{url[start + end :]}"


def _userinfo_end(rest: str) -> int | None:
    """Where the user information of ``rest`` (a URL after its ``scheme://``) ends: the ``@``
    after it, at the later of the two readings in the module docstring; None without one."""
    first = rest.find("@")
    if first < 0:
        return None
    query = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    last_before_query = rest.rfind("@", 0, query)
    return max(first, last_before_query)
