"""A password in a URL Trellis is given (the database's, Vault's) never reaches its output: not
in the line that refuses the URL, not in the ``more:`` line that repeats ``--database-url``, not
in ``trellis vault check``. Real ``trellis`` processes; the secret is looked for in all they
print."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests import zygote
from tests.cli.test_walkthrough import Trellis
from tests.conftest import free_port

SECRET = "S3CRETPW6"


def _trellis(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TRELLIS_")}
    return zygote.run(args, env={**base, **env}, cwd=cwd, timeout=timeout)


# Each URL a setting refuses, with how its refusal shows it.
REFUSED = {
    "port-not-a-number": (
        f"postgresql://user:{SECRET}@host:abc/db",
        "postgresql://user:***@host:abc/db",
    ),
    "broken-ipv6": (f"postgresql://user:{SECRET}@[::1:1/db", "postgresql://user:***@[::1:1/db"),
    "asyncpg": (
        f"postgresql+asyncpg://user:{SECRET}@host/db",
        "postgresql+asyncpg://user:***@host/db",
    ),
    "mysql": (f"mysql://user:{SECRET}@host/db", "mysql://user:***@host/db"),
    "no-scheme": (f"user:{SECRET}@host/db", "user:***@host/db"),
    "at-sign-in-password": (
        f"postgresql://user:pa@{SECRET}@host:x/db",
        "postgresql://user:***@host:x/db",
    ),
    "long": (
        f"postgresql://{'u' * 60}:{SECRET}@host:abc/db",
        f"postgresql://{'u' * 60}:***@host:abc"[:80],
    ),
}


@pytest.mark.parametrize("case", REFUSED)
@pytest.mark.parametrize("given", ["variable", "option"])
@pytest.mark.parametrize("command", [["certs", "list"], ["serve", "--port", "1"]], ids=" ".join)
def test_a_refused_database_url_is_shown_with_its_password_masked(
    tmp_path: Path, case: str, given: str, command: list[str]
) -> None:
    """Before: ``trellis: TRELLIS_DATABASE_URL='postgresql://user:S3CRETPW6@host:abc/db':
    invalid literal for int() ...``, the password on stderr (and in ``serve``'s journal)."""
    url, shown = REFUSED[case]
    if given == "variable":
        result = _trellis(command, {"TRELLIS_DATABASE_URL": url}, tmp_path)
        name = "TRELLIS_DATABASE_URL"
    else:
        result = _trellis(["--database-url", url, *command], {}, tmp_path)
        name = "--database-url"
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert SECRET not in output and SECRET[:5] not in output, output
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1, output
    assert result.stderr.startswith(f"trellis: {name}={shown!r}: "), output


def test_a_public_url_with_a_password_is_refused_without_repeating_it(tmp_path: Path) -> None:
    result = _trellis(
        ["certs", "list"], {"TRELLIS_PUBLIC_URL": f"https://ca:{SECRET}@ca.example.org"}, tmp_path
    )
    assert result.returncode == 2 and SECRET not in result.stderr, result.stderr
    assert "TRELLIS_PUBLIC_URL='https://ca:***@ca.example.org': a user name or password" in (
        result.stderr
    )


@pytest.mark.postgres
def test_the_more_line_masks_sslpassword_too(tmp_path: Path, postgres_server: str) -> None:
    """libpq takes the passphrase of ``sslkey`` as ``?sslpassword=``: the ``more:`` line that
    repeats ``--database-url`` showed it as given (only ``?password=`` was masked)."""
    from tests.pgserver import drop_postgres_database, make_postgres_database

    database = make_postgres_database(postgres_server)
    try:
        base, _, query = database.partition("?")
        url = f"{base.replace('postgres:@', f'postgres:{SECRET}@')}?{query}&sslpassword={SECRET}7"
        trellis = Trellis(tmp_path / "var", url)
        trellis.set_up("init", "--trust-domain", "example.org")
        for name in ("a", "b"):
            trellis.set_up("svid", "mint", "--spiffe-id", f"spiffe://example.org/{name}",
                           "--out", str(tmp_path / name))  # fmt: skip
        env = {"TRELLIS_KEY_PASSPHRASE": trellis.env["TRELLIS_KEY_PASSPHRASE"]}
        root = ["--data-dir", str(tmp_path / "var"), "--database-url", url]
        result = _trellis([*root, "certs", "list", "--limit", "1"], env, tmp_path)
        assert result.returncode == 0, result.stderr
        more, note = result.stderr.splitlines()
        assert SECRET not in result.stdout + result.stderr, result.stderr
        assert "postgres:***@" in more and "&sslpassword=***" in more, more
        assert note.startswith("note: the --database-url password is shown as ***"), note
    finally:
        drop_postgres_database(postgres_server, database)


def test_vault_check_masks_a_password_in_the_vault_address(tmp_path: Path) -> None:
    """``trellis vault check`` printed ``Vault at https://user:PASSWORD@...`` and every
    failure named the address as given."""
    address = f"https://trellis:{SECRET}@127.0.0.1:{free_port()}"
    env = {"TRELLIS_VAULT_ADDR": address, "TRELLIS_VAULT_TOKEN": "hvs.test"}
    shown = address.replace(SECRET, "***")
    for json_out in ([], ["--json"]):
        result = _trellis(["--data-dir", str(tmp_path / "var"), "vault", "check", *json_out], env,
                          tmp_path)  # fmt: skip
        output = result.stdout + result.stderr
        assert result.returncode == 8, output
        assert SECRET not in output, output
        assert shown in result.stdout, output
