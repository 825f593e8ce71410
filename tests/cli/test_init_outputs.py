"""What ``trellis init`` writes besides the CA (``admin-token``, ``bundle.pem``), and the options
it is given over ``TRELLIS_*``: an init that cannot finish leaves nothing, as docs/cli.md says,
and the admin token's secret, shown nowhere else, is never lost to a half-made instance."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.cli.test_walkthrough import Trellis

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["admin-token", "bundle.pem"])
def test_an_init_whose_files_cannot_be_written_makes_nothing(
    tmp_path: Path, database_url: str, name: str
) -> None:
    """Regression: the CA was committed, then writing the file failed (exit 8, naming a
    temporary file, ``.admin-token.h8qdpu_e: Is a directory``): keys, passphrase and database
    stayed, the admin token's secret was lost, and once the directory was gone the next init
    was refused (exit 6, it exists). Now refused before anything is made, naming the file."""
    cli = Trellis(tmp_path / "var", database_url)
    in_the_way = cli.data_dir / name
    in_the_way.mkdir(parents=True)
    cli.data_dir.chmod(0o700)
    refused = cli.run("init", "--trust-domain", "example.org", ok=False)
    assert (refused.returncode, refused.stdout) == (2, ""), refused
    assert refused.stderr == f"trellis: {in_the_way}: is a directory, not a file\n"
    assert [path.name for path in cli.data_dir.iterdir()] == [name]
    assert not (tmp_path / "trellis.db").exists()  # the SQLite database (outside the data dir)

    in_the_way.rmdir()
    created = cli.json("init", "--trust-domain", "example.org")  # nothing in the database
    assert isinstance(created, dict) and created["created"] is True
    assert (cli.data_dir / "admin-token").is_file() and (cli.data_dir / "bundle.pem").is_file()


def test_an_init_failing_after_the_ca_is_made_takes_it_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails past the checks (a full disk) is inside the clean-up too: the data
    dir and the SQLite database the init made go, and the next init starts afresh. They
    were written after it, and stayed."""
    from cli import admin
    from cli.common import STATE
    from cli.main import app

    def full(*args: object) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device")

    database = tmp_path / "db" / "trellis.db"
    trellis = Trellis(tmp_path / "var", f"sqlite:///{database}")
    monkeypatch.setattr(admin, "write_bundle_file", full)
    try:
        args = ["init", "--trust-domain", "example.org"]
        result = CliRunner().invoke(app, args, env=trellis.env)
    finally:
        STATE.close()
    assert isinstance(result.exception, OSError), result.output
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    trellis.run("init", "--trust-domain", "example.org")


@pytest.mark.parametrize(
    ("variable", "command"),
    [
        pytest.param("bogus", ("init", "--trust-domain", "example.org"), id="bogus-init"),
        pytest.param("vault", ("init", "--trust-domain", "example.org"), id="vault-init"),
        pytest.param("vault", ("gateway", "init"), id="vault-gateway"),
        pytest.param("bogus", ("openvpn", "init"), id="bogus-openvpn"),
    ],
)
def test_key_backend_file_overrides_the_variable(
    tmp_path: Path, variable: str, command: tuple[str, ...]
) -> None:
    """docs/configuration.md: options override variables. ``--key-backend file`` was refused
    (exit 2) for a ``TRELLIS_KEY_BACKEND`` it replaces (``vault`` without an address, or
    ``bogus``), naming the variable."""
    cli = Trellis(tmp_path / "var", f"sqlite:///{tmp_path / 'trellis.db'}")
    cli.env["TRELLIS_KEY_BACKEND"] = variable
    cli.run(*command, "--key-backend", "file")
    keys = list((cli.data_dir / "keys").iterdir())
    assert len(keys) == 2, keys  # root and intermediate, in files
    assert cli.run(*command, "--key-backend", "file", ok=False).returncode == 6  # it exists


def test_vault_that_cannot_be_reached_at_init_is_said_so(tmp_path: Path) -> None:
    """It said "transit/ is not mounted, or this token may use no path under it", sending the
    operator to TRELLIS_VAULT_TRANSIT_MOUNT, while ``vault check`` said connection refused."""
    cli = Trellis(tmp_path / "var", f"sqlite:///{tmp_path / 'trellis.db'}")
    cli.env.update(TRELLIS_VAULT_ADDR="http://127.0.0.1:1", TRELLIS_VAULT_TOKEN="tok")
    for args in (("init", "--trust-domain", "example.org"), ("gateway", "init")):
        refused = cli.run(*args, "--key-backend", "vault", ok=False)
        assert (refused.returncode, refused.stdout) == (8, ""), refused
        assert refused.stderr.startswith("trellis: cannot reach Vault at http://127.0.0.1:1: ")
        assert "mount" not in refused.stderr and refused.stderr.count("\n") == 1
        assert list(tmp_path.iterdir()) == []
