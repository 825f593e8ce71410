"""The ``more:`` line names the instance the page came from: the root options given
(``--data-dir``, ``--database-url``) are in it, a password in the URL masked. Before, ``trellis
--data-dir d3 audit list --limit 1`` printed ``more: trellis audit list --limit 1 --after N``,
which, run as printed, read another instance (``./var``)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from cli.common import STATE, more
from tests import zygote
from tests.cli.test_walkthrough import Trellis
from tests.gateway.gwkit import partner_csr


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    result = zygote.run(args, env=env, cwd=cwd)
    result.check_returncode()
    return result


def test_the_next_page_runs_as_printed_against_the_same_instance(tmp_path: Path) -> None:
    data, database = tmp_path / "d 3", tmp_path / "db dir" / "trellis.db"
    root = ["--data-dir", str(data), "--database-url", f"sqlite:///{database}"]
    cli = Trellis(data, f"sqlite:///{database}")
    cli.set_up("init", "--trust-domain", "example.org")
    cli.set_up("gateway", "init")
    cli.set_up("gateway", "consumer", "add", "acme")
    (tmp_path / "p.csr").write_bytes(partner_csr()[1])
    for i in range(2):
        cli.set_up("gateway", "cert", "issue", "acme", "--csr", str(tmp_path / "p.csr"),
                   "--out", str(tmp_path / f"{i}.pem"))  # fmt: skip
        cli.set_up("svid", "mint", "--spiffe-id", "spiffe://example.org/w", "--out",
                   str(tmp_path / f"w{i}"))  # fmt: skip
    # Only the options: no TRELLIS_* naming the instance, and a ./var elsewhere to read.
    env = {
        k: v for k, v in cli.env.items() if k not in ("TRELLIS_DATA_DIR", "TRELLIS_DATABASE_URL")
    }
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _run(["init", "--trust-domain", "other.example"], env, elsewhere)
    for command in (["certs", "list"], ["audit", "list"], ["gateway", "cert", "list"]):
        first = _run([*root, *command, "--limit", "1", "--json"], env, elsewhere)
        printed = first.stderr.removesuffix("\n")
        assert printed.startswith(f"more: trellis {shlex.join(root)} {' '.join(command)} "), printed
        again = shlex.split(printed.removeprefix("more: trellis "))
        following = _run(again, env, elsewhere)
        assert following.stdout != first.stdout and following.stdout.strip() != "[]", command


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql+psycopg://trellis:s3cret@db:5432/trellis",
            "postgresql+psycopg://trellis:***@db:5432/trellis",
        ),
        (
            "postgresql+psycopg://trellis@db/trellis?password=s3cret&sslmode=require",
            "postgresql+psycopg://trellis@db/trellis?password=***&sslmode=require",
        ),
    ],
    ids=["in-userinfo", "in-query"],
)
def test_a_database_url_password_is_masked_and_said_so(
    url: str, shown: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(STATE, "database_url", url)
    monkeypatch.setattr(STATE, "data_dir", None)
    more("trellis audit list", {}, limit=1, json_out=False, next_after=7)
    line, note = capsys.readouterr().err.splitlines()
    assert (
        line == f"more: trellis --database-url {shlex.quote(shown)} audit list --limit 1 --after 7"
    )
    assert "s3cret" not in line + note and note.startswith("note: the --database-url password")
