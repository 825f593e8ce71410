"""``--server``, parsed: a port of 0 or an empty one became 443 (``port or 443``), where
``TRELLIS_PUBLIC_URL`` refuses them; a URL with a user name and password was refused with a
message that repeated the password, and said the URL had no host."""

from __future__ import annotations

import pytest

from ca.errors import InvalidInput
from ca.serverconn import ServerUrl


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("https://127.0.0.1:8443", "https://127.0.0.1:8443"),
        ("https://trellis.example", "https://trellis.example:443"),
        ("https://[::1]:8443/prefix/", "https://[::1]:8443/prefix"),
    ],
    ids=["ok/port", "ok/default-443", "ok/ipv6-prefix"],
)
def test_a_url_parses(text: str, expected: str) -> None:
    assert str(ServerUrl.parse(text)) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("https://127.0.0.1:0", "--server 'https://127.0.0.1:0': a port of 0, or a ':' with no"),
        ("https://127.0.0.1:", "--server 'https://127.0.0.1:': a port of 0, or a ':' with no"),
        ("https://[::1]:", "--server 'https://[::1]:': a port of 0, or a ':' with no"),
        (
            "https://user:s3cret-pw@127.0.0.1:1/x?y#z",
            "--server 'https://***@127.0.0.1:1/x?y#z': a user name or password has no place",
        ),
        ("https://tok3n@127.0.0.1:1", "--server 'https://***@127.0.0.1:1': a user name"),
        ("http://u:s3cret-pw@h:1", "--server 'http://***@h:1': a user name"),
        ("https://u:s3cret-pw@h:port", "--server 'https://***@h:port' must be an https:// URL"),
        ("https://u:s3cret pw@h", "--server 'https://***@h' must be an https:// URL"),
        ("u:s3cret-pw@h", "--server '***@h' must be an https:// URL"),
    ],
    ids=[
        "fail/port-0",
        "fail/empty-port",
        "fail/ipv6-empty-port",
        "fail/userinfo",
        "fail/user-only",
        "fail/userinfo-http",
        "fail/userinfo-bad-port",
        "fail/userinfo-space",
        "fail/userinfo-no-scheme",
    ],
)
def test_a_bad_url_is_refused_without_its_userinfo(text: str, message: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        ServerUrl.parse(text)
    assert refused.value.detail.startswith(message), refused.value.detail
    for secret in ("s3cret", "tok3n", "user:"):
        assert secret not in refused.value.detail
