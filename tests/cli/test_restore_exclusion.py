"""A restore and an init into one data dir, as two real processes: they exclude each other
(the restore's ``flock`` on the data dir, which an init takes shared), and a restore never
replaces, nor removes on failure, a file it did not put there."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ca import backup
from tests.cli.test_backup import archive, cli  # noqa: F401 (fixtures)
from tests.conftest import PASSPHRASE
from tests.gateway.test_gateway_cli import Cli

# A restore that stops once its database is staged (the long part for a big one), until the
# file named by its first argument appears; it says it got there by making <that file>.ready.
PAUSED_WHILE_STAGING = """
import pathlib, sys, time
from ca import backup
from cli.main import main
go = pathlib.Path(sys.argv.pop(1))
check = backup._check_schema
def paused(path):
    pathlib.Path(f"{go}.ready").touch()
    while not go.exists():
        time.sleep(0.05)
    return check(path)
backup._check_schema = paused
main(sys.argv[1:])
"""


def _wait_for(path: Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_an_init_during_a_restore_is_refused_and_the_restore_completes(
    archive: Path,  # noqa: F811
    cli: Cli,  # noqa: F811
    tmp_path: Path,
) -> None:
    """'init --exists-ok' during a restore exited 0; the restore then failed ("keys: Directory
    not empty", exit 8) and its clean-up removed the init's keys/, admin-token and bundle.pem:
    a CA recorded in the database whose keys were gone. The init is refused now (exit 6), and
    the restore goes on to a working instance."""
    data_dir = tmp_path / "var"
    data_dir.mkdir(mode=0o700)
    go = tmp_path / "go"
    restoring = subprocess.Popen(
        [
            sys.executable,
            "-c",
            PAUSED_WHILE_STAGING,
            str(go),
            "--data-dir",
            str(data_dir),
            "restore",
            str(archive),
        ],
        env={**os.environ, "TRELLIS_KEY_PASSPHRASE": PASSPHRASE},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(Path(f"{go}.ready"), restoring)
        before = sorted(p.name for p in data_dir.iterdir())
        refused = cli.run("--data-dir", str(data_dir), "init", "--trust-domain", "z.test",
                          "--exists-ok", code=6)  # fmt: skip
        assert refused == (
            f"trellis: a restore into {data_dir} is running: wait for it to end, then look again\n"
        )
        assert sorted(p.name for p in data_dir.iterdir()) == before
        go.touch()
        _, err = restoring.communicate(timeout=60)
    finally:
        go.touch()
        if restoring.poll() is None:
            restoring.kill()
            restoring.wait()
    assert restoring.returncode == 0, err
    shown = cli.run("--data-dir", str(data_dir), "bundle", "show")
    assert shown.startswith("-----BEGIN CERTIFICATE")
    # The instance restored is the archive's, with its keys: it issues.
    cli.run("--data-dir", str(data_dir), "openvpn", "client", "add", "bob",
            "--out", str(tmp_path / "bob.ovpn"))  # fmt: skip


LOCKED_SHARED = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_SH)
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_restore_during_an_init_is_refused(
    archive: Path,  # noqa: F811
    cli: Cli,  # noqa: F811
    tmp_path: Path,
) -> None:
    """An init holds the data dir's lock shared while it sets the CA up (here another
    process holds it as an init does): a restore there is refused and writes nothing."""
    data_dir = tmp_path / "var"
    data_dir.mkdir(mode=0o700)
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCKED_SHARED, str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"locked\n"
        refused = cli.run("--data-dir", str(data_dir), "restore", str(archive), code=6)
        assert refused == (
            f"trellis: a restore or an init into {data_dir} is running: wait for it to end,"
            " then look again\n"
        )
        assert list(data_dir.iterdir()) == []
        # Inits do not exclude each other: the shared lock lets one go on.
        cli.run("--data-dir", str(data_dir), "init", "--trust-domain", "example.org")
    finally:
        holder.communicate(b"", timeout=10)


def test_a_restore_never_replaces_a_file_it_did_not_put_there(
    archive: Path,  # noqa: F811
    cli: Cli,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A file that appears in the data dir while a restore stages (something that takes no
    lock) was replaced by the restore's rename, or, had the restore failed after, removed by
    its clean-up. The restore now refuses (exit 6), and the file stays as it was."""
    data_dir = tmp_path / "var"
    check = backup._check_schema

    def someone_writes(path: Path) -> str:
        (data_dir / "admin-token").write_text("someone else's\n")
        return check(path)

    monkeypatch.setattr(backup, "_check_schema", someone_writes)
    refused = cli.run("--data-dir", str(data_dir), "restore", str(archive), code=6)
    assert f"{data_dir / 'admin-token'} appeared while restoring" in refused, refused
    assert sorted(p.name for p in data_dir.iterdir()) == ["admin-token"]
    assert (data_dir / "admin-token").read_text() == "someone else's\n"


def test_a_file_system_without_hard_links_restores_too(
    archive: Path,  # noqa: F811
    cli: Cli,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Files are moved in with link(2), which refuses a name that exists; where the file
    system has no hard links (EPERM), they are renamed after a look, and still never over a
    file that is there."""

    def no_links(*_: object, **__: object) -> None:
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", no_links)
    cli.run("--data-dir", str(tmp_path / "var"), "restore", str(archive))
    assert cli.run("--data-dir", str(tmp_path / "var"), "bundle", "show").startswith("-----BEGIN")
    data_dir = tmp_path / "again"
    check = backup._check_schema

    def someone_writes(path: Path) -> str:
        (data_dir / "bundle.pem").write_text("someone else's\n")
        return check(path)

    monkeypatch.setattr(backup, "_check_schema", someone_writes)
    cli.run("--data-dir", str(data_dir), "restore", str(archive), code=6)
    assert sorted(p.name for p in data_dir.iterdir()) == ["bundle.pem"]
    assert (data_dir / "bundle.pem").read_text() == "someone else's\n"


def test_a_volume_root_with_lost_found_and_the_archive_in_it_restores(
    archive: Path,  # noqa: F811
    cli: Cli,  # noqa: F811
    tmp_path: Path,
) -> None:
    """In the shipped container the data dir is the volume's root and the one writable place
    (docs/deploy.md): an ext4 volume has lost+found there, and the archive can only be copied
    in beside it. Restore refused both ("not empty"); it now leaves them where they are."""
    data_dir = tmp_path / "volume"
    (data_dir / "lost+found").mkdir(parents=True, mode=0o700)
    copied = data_dir / "backup.tgz"
    copied.write_bytes(archive.read_bytes())
    cli.run("--data-dir", str(data_dir), "restore", str(copied))
    assert (data_dir / "lost+found").is_dir() and copied.read_bytes() == archive.read_bytes()
    assert cli.run("--data-dir", str(data_dir), "bundle", "show").startswith("-----BEGIN")
    # Only those two: anything else still makes the data dir not empty.
    other = tmp_path / "other"
    (other / "lost+found").mkdir(parents=True)
    (other / "notes.txt").write_text("the operator's\n")
    refused = cli.run("--data-dir", str(other), "restore", str(archive), code=6)
    assert refused.endswith("is not empty: restore only into an empty data directory\n")
    # An archive under a name the restore writes is in its way: refused before anything.
    third = tmp_path / "third"
    third.mkdir()
    in_the_way = third / "bundle.pem"
    in_the_way.write_bytes(archive.read_bytes())
    refused = cli.run("--data-dir", str(third), "restore", str(in_the_way), code=2)
    assert "is in the data dir under a name the restore writes" in refused, refused
    assert [p.name for p in third.iterdir()] == ["bundle.pem"]
