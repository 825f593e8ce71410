"""``ca.redact.masked_url``: every reading of where a password ends is masked, URLs that do not
parse included (they are the ones an error line repeats)."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import make_url

from ca.redact import masked_url

CASES = {
    "ok/userinfo": ("postgresql://u:s3cr3t@h:5432/db", "postgresql://u:***@h:5432/db"),
    "ok/empty-password": ("postgresql://u:@/db?host=/run", "postgresql://u:***@/db?host=/run"),
    "ok/query-password": (
        "postgresql://u@h/db?password=s3cr3t",
        "postgresql://u@h/db?password=***",
    ),
    "ok/sslpassword": (
        "postgresql://u@h/db?sslmode=verify-full&sslpassword=s3cr3t&sslkey=/k.pem",
        "postgresql://u@h/db?sslmode=verify-full&sslpassword=***&sslkey=/k.pem",
    ),
    "ok/both": (
        "postgresql://u:s3cr3t@h/db?PASSWORD=s3cr3t",
        "postgresql://u:***@h/db?PASSWORD=***",
    ),
    "ok/vault": ("https://u:s3cr3t@vault:8200", "https://u:***@vault:8200"),
    "unparsed/port": ("postgresql://u:s3cr3t@h:abc/db", "postgresql://u:***@h:abc/db"),
    "unparsed/no-scheme": ("u:s3cr3t@h/db", "u:***@h/db"),
    "unencoded/at": ("postgresql://u:s3@cr3t@h/db", "postgresql://u:***@h/db"),
    "unencoded/slash": ("postgresql://u:s3/cr3t@h/db", "postgresql://u:***@h/db"),
    "unencoded/question-mark": ("postgresql://u:s3?cr3t@h/db", "postgresql://u:***@h/db"),
    "query-at/no-password": (
        "postgresql://h/db?application_name=a@b&password=s3cr3t",
        "postgresql://h/db?application_name=a@b&password=***",
    ),
    # SQLAlchemy reads '5432/db?x=a' as the password here (up to the first @): masked.
    "query-at/sqlalchemy-reading": ("postgresql://h:5432/db?x=a@b", "postgresql://h:***@b"),
}
UNCHANGED = [
    "sqlite:////var/lib/trellis/trellis.db",
    "sqlite:///dir/with@sign/trellis.db",
    "postgresql://trellis@db/trellis?sslmode=require&passfile=/etc/pgpass",
    "https://vault.example.org:8200",
    "garbage",
]


@pytest.mark.parametrize("case", CASES)
def test_a_password_is_masked(case: str) -> None:
    given, shown = CASES[case]
    assert masked_url(given) == (shown, True)


@pytest.mark.parametrize("url", UNCHANGED)
def test_a_url_without_a_password_is_left_as_given(url: str) -> None:
    assert masked_url(url) == (url, False)


@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("unparsed/")])
def test_what_sqlalchemy_takes_for_the_password_is_never_shown(case: str) -> None:
    """The reading that matters most: what the driver is handed as the password."""
    given, _ = CASES[case]
    url = make_url(given)
    shown, _ = masked_url(given)
    for secret in (url.password, url.query.get("password"), url.query.get("sslpassword")):
        if secret:
            assert str(secret) not in shown, (secret, shown)
