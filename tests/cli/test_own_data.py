"""No output option writes into Trellis's own data (docs/cli.md): the probe overwrote the data
dir's key-passphrase, database and admin-token with ``--out``, and broke the instance."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.openvpn.vpnkit import InProcessTrellis


def _instance(root: Path) -> InProcessTrellis:
    """A mesh, OpenVPN and gateway instance whose SQLite database is outside its data dir."""
    (root / "db").mkdir()
    cli = InProcessTrellis(root / "var", f"sqlite:///{root / 'db' / 'main.db'}")
    cli.run("init", "--trust-domain", "example.org")
    cli.run("openvpn", "init")
    cli.run("gateway", "init")
    cli.run("gateway", "consumer", "add", "acme")
    (root / "pw").write_text("a long password\n")
    (root / "to-keys").symlink_to(root / "var" / "keys")
    return cli


@pytest.fixture
def instance(tmp_path: Path) -> InProcessTrellis:
    return _instance(tmp_path)


@pytest.fixture(scope="module")
def refusing(tmp_path_factory: pytest.TempPathFactory) -> InProcessTrellis:
    """One instance for the refusals: each leaves it as it was, which each test checks."""
    return _instance(tmp_path_factory.mktemp("own-data"))


@pytest.mark.parametrize(
    ("command", "target"),
    [
        pytest.param("gateway truststore --format pem --out", "var/admin-token", id="truststore"),
        pytest.param("gateway truststore --format nginx --out", "var/server", id="truststore-dir"),
        pytest.param("crl fetch --out", "var/key-passphrase", id="crl-fetch"),
        pytest.param("bundle show --out", "db/main.db", id="database-outside"),
        pytest.param("bundle show --out", "db/main.db-wal", id="its-journal"),
        pytest.param("bundle show --out", "var/../var/bundle.pem", id="dot-dot"),
        pytest.param("crl fetch --out", "to-keys/new.pem", id="symlink"),
        pytest.param("openvpn crl --out", "var/admin-token", id="openvpn-crl"),
        pytest.param("openvpn client add bob --out", "var/secrets/bob.ovpn", id="ovpn"),
        pytest.param("svid mint --spiffe-id spiffe://example.org/w --out", "var", id="data-dir"),
        pytest.param("openvpn server-cert --out", "var/keys", id="server-dir"),
        pytest.param("istio issue --cluster c1 --out", "var/keys/c1.yaml", id="istio"),
        pytest.param(
            "gateway cert issue acme --p12-password-file pw --p12", "var/server/a.p12", id="p12"
        ),
        pytest.param("backup --out", "var/secrets/backup.tgz", id="backup"),
        # The one-sealer flock's file: a backup renamed over it left a holder's flock on the
        # old inode, and 'audit seal' ran beside the server's sealer.
        pytest.param("backup --out", "db/main.db.seal-lock", id="seal-lock"),
        pytest.param("bundle show --out", "var/trellis.db.seal-lock", id="seal-lock-in-data-dir"),
        pytest.param("crl fetch --out", "db/main.db.write-lock", id="write-lock"),
    ],
)
def test_an_output_into_trellis_own_data_is_refused(
    refusing: InProcessTrellis, monkeypatch: pytest.MonkeyPatch, command: str, target: str
) -> None:
    instance, root = refusing, refusing.data_dir.parent
    monkeypatch.chdir(root)
    path = root / target
    before = path.read_bytes() if path.is_file() else sorted(path.rglob("*"))
    issued = instance.run("certs", "list", "--json").stdout
    refused = instance.process().run(*command.split(), target, ok=False)
    assert refused.returncode == 2, refused
    assert refused.stderr.startswith("trellis: --") and "is Trellis's own data" in refused.stderr
    assert (path.read_bytes() if path.is_file() else sorted(path.rglob("*"))) == before
    assert instance.run("certs", "list", "--json").stdout == issued  # nothing issued


def test_other_paths_in_the_data_dir_stay_usable(
    instance: InProcessTrellis, tmp_path: Path
) -> None:
    """docs/deploy.md keeps a backup in the data dir; a file of one's own there is fine."""
    instance.run("backup", "--out", str(tmp_path / "var" / "backup.tgz"))
    instance.run("bundle", "show", "--out", str(tmp_path / "var" / "mesh.pem"))
    assert (tmp_path / "var" / "mesh.pem").read_bytes() == (
        tmp_path / "var" / "bundle.pem"
    ).read_bytes()
