"""Directories that hold private keys are 0700 whatever the umask, and one that others may write
to is refused: run in-process (the Typer app) so that the test's ``os.umask`` applies."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from ca.config import Settings, build_context
from ca.files import data_directory
from ca.keys import KeyType
from ca.workload import SvidFiles, write_svid
from tests.openvpn.vpnkit import InProcessTrellis


@pytest.fixture(params=[0o000, 0o022], ids=["umask-000", "umask-022"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


@pytest.fixture
def cli(tmp_path: Path) -> InProcessTrellis:
    trellis = InProcessTrellis(tmp_path / "var", f"sqlite:///{tmp_path / 'trellis.db'}")
    trellis.run("init", "--trust-domain", "example.org")
    trellis.run("openvpn", "init")
    trellis.run("openvpn", "configure", "--remote", "vpn.example.org")
    return trellis


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# Each command with the key file(s) its --out directory gets.
COMMANDS = {
    "svid-mint": (["svid", "mint", "--spiffe-id", "spiffe://example.org/web"], ["svid.key"]),
    "openvpn-server-cert": (["openvpn", "server-cert"], ["server.key"]),
    "openvpn-server-config": (
        ["openvpn", "server-config"],
        ["server.key", "tls-crypt.key", "tls-crypt-v2.key"],
    ),
    "istio-files": (["istio", "issue", "--cluster", "west", "--format", "files"], ["ca-key.pem"]),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_out_directories_are_0700_whatever_the_umask(
    cli: InProcessTrellis, tmp_path: Path, umask: int, command: str
) -> None:
    args, keys = COMMANDS[command]
    out = tmp_path / "new" / "out"  # its parent is missing too
    cli.run(*args, "--out", str(out))
    assert _mode(out) == 0o700
    assert _mode(out.parent) & 0o022 == 0  # a parent made on the way: nobody else writes it
    for name in keys:
        assert _mode(out / name) == 0o600
        assert _mode((out / name).resolve().parent) == 0o700  # the svid staging dir too


def test_svid_staging_directory_is_0700(tmp_path: Path, umask: int) -> None:
    """The agent and ``svid request`` publish through ``write_svid``: a new ``..<stamp>`` dir
    per renewal, which holds the key."""
    files = SvidFiles(tmp_path / "web")
    key = KeyType.EC_P256.generate()
    write_svid(files, b"chain", key, b"bundle")
    write_svid(files, b"chain", key, b"bundle")  # a renewal: a new staging dir
    staging = files.directory / os.readlink(files.directory / "..data")
    assert (_mode(files.directory), _mode(staging), _mode(files.key.resolve())) == (
        0o700,
        0o700,
        0o600,
    )


@pytest.mark.parametrize(
    ("command", "loose"),
    [(command, 0o777) for command in COMMANDS] + [("svid-mint", 0o770), ("svid-mint", 0o1777)],
)
def test_an_existing_directory_others_may_write_loses_those_bits(
    cli: InProcessTrellis,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    command: str,
    loose: int,
) -> None:
    """Such as one an older Trellis made under umask 000: whoever could write it swapped the
    key (the ``..data`` symlink) for their own. Read bits stay; the keys are 0600."""
    args, keys = COMMANDS[command]
    out = tmp_path / "shared"
    out.mkdir()
    out.chmod(loose)
    with caplog.at_level(logging.WARNING, logger="trellis.files"):
        cli.run(*args, "--out", str(out))
    tight = loose & ~0o022
    assert _mode(out) == tight
    assert f"{out} was mode {loose:04o}: tightened to {tight:04o}" in caplog.text
    for name in keys:
        assert _mode(out / name) == 0o600


def test_an_existing_directory_readable_by_others_is_used_as_it_is(
    cli: InProcessTrellis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "srv"
    out.mkdir()
    out.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="trellis.files"):
        cli.run("openvpn", "server-config", "--out", str(out))
    assert _mode(out) == 0o755
    assert _mode(out / "server.key") == 0o600
    assert "tightened" not in caplog.text


def test_the_agent_tightens_its_directory_on_every_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The agent's renewals write through ``write_svid``, long after it started."""
    files = SvidFiles(tmp_path / "web")
    key = KeyType.EC_P256.generate()
    write_svid(files, b"chain", key, b"bundle")
    files.directory.chmod(0o777)  # loosened meanwhile
    with caplog.at_level(logging.WARNING, logger="trellis.files"):
        write_svid(files, b"chain", key, b"bundle")
    assert _mode(files.directory) == 0o755
    assert f"{files.directory} was mode 0777: tightened to 0755" in caplog.text


def test_a_key_directory_of_another_user_is_used_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Kubernetes emptyDir the agent shares with its workload is root's and 0777 (2777 with
    fsGroup): chmod would fail, and refusing it would stop the pod."""
    files = SvidFiles(tmp_path / "run-svid")
    files.directory.mkdir()
    files.directory.chmod(0o2777)
    monkeypatch.setattr(os, "geteuid", lambda: files.directory.stat().st_uid + 1)
    with caplog.at_level(logging.WARNING, logger="trellis.files"):
        write_svid(files, b"chain", KeyType.EC_P256.generate(), b"bundle")
    assert _mode(files.directory) == 0o2777
    assert f"{files.directory} is mode 2777 and owned by uid" in caplog.text
    assert f"its owner should run 'chmod go-w {files.directory}'" in caplog.text
    assert _mode(files.key) == 0o600
    assert _mode(files.key.resolve().parent) == 0o700  # the staging dir, Trellis's own


def test_init_and_serve_tighten_loose_data_directories(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The data dir, ``keys/``, ``secrets/`` and ``server/`` Trellis owns are made 0700 with a
    warning, by ``init`` and by every start (``serve`` builds its context the same way)."""
    data = tmp_path / "var"
    for each in (data, data / "keys", data / "secrets"):
        each.mkdir()
        each.chmod(0o777)
    cli = InProcessTrellis(data, f"sqlite:///{tmp_path / 'trellis.db'}")
    with caplog.at_level(logging.WARNING, logger="trellis.files"):
        cli.run("init", "--trust-domain", "pre.org")
    for each in (data, data / "keys", data / "secrets"):
        assert _mode(each) == 0o700, each
        assert f"{each} was mode 0777: tightened to 0700" in caplog.text

    caplog.clear()
    (data / "server").mkdir()  # made by the first serve
    for each in (data, data / "keys", data / "server"):
        each.chmod(0o755)
    settings = Settings(
        data_dir=data,
        database_url=f"sqlite:///{tmp_path / 'trellis.db'}",
        key_passphrase=cli.env["TRELLIS_KEY_PASSPHRASE"],  # type: ignore[arg-type]
    )
    with caplog.at_level(logging.WARNING, logger="trellis.files"):
        build_context(settings, serving=True).close()
    for each in (data, data / "keys", data / "server"):
        assert _mode(each) == 0o700, each
        assert f"{each} was mode 0755: tightened to 0700" in caplog.text


def test_a_data_directory_owned_by_another_user_is_left_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Such as a volume's root under Kubernetes' fsGroup: chmod would fail, so it only warns."""
    data = tmp_path / "var"
    data.mkdir()
    data.chmod(0o775)
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(data).st_uid + 1)
    with caplog.at_level(logging.WARNING, logger="trellis.files"):
        data_directory(data)
    assert _mode(data) == 0o775
    assert f"{data} is mode 0775 and owned by uid" in caplog.text
    assert f"its owner should run 'chmod 0700 {data}'" in caplog.text
