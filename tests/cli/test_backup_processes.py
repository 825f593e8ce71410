"""``trellis backup`` and ``trellis restore`` as real processes, for what only a process shows:
its peak memory, a write failing part-way (a file size limit), and the modes of the
directories it makes under the umask it was started with. tests/cli/test_backup.py checks the
archive's content and refusals in-process."""

from __future__ import annotations

import gzip
import os
import resource
import shutil
import sqlite3
import stat
import subprocess
import sys
import tarfile
import time
from contextlib import closing
from pathlib import Path

import pytest

from tests.cli.test_walkthrough import TRELLIS, Trellis

pytestmark = pytest.mark.slow

MiB = 2**20

PEAK_RSS = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True, check=False)
sys.stderr.write(done.stderr)
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def _peak_rss(cli: Trellis, *args: str, code: int = 0) -> int:
    """The peak resident memory of ``trellis ARGS``, in bytes: measured in a fresh Python, whose
    RUSAGE_CHILDREN holds that one process alone (this one's holds every child it waited for)."""
    measured = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, TRELLIS, *args],
        env=cli.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    exited, peak = measured.stdout.split()
    assert exited == str(code), measured.stderr
    if code:
        assert measured.stderr.startswith("trellis: ") and measured.stderr.count("\n") == 1, (
            measured.stderr
        )
    return int(peak) * 1024  # Linux counts ru_maxrss in KiB


def _grow(database: Path, mebibytes: int) -> int:
    """A filler table of 1 MiB blobs, half random (what gzip cannot shrink, so that an archive
    held in memory would show) and half zeros (quick to compress); the database's new size."""
    with closing(sqlite3.connect(database)) as connection:
        connection.execute("CREATE TABLE filler (body BLOB)")
        connection.executemany(
            "INSERT INTO filler VALUES (CASE WHEN ? % 2 THEN randomblob(?) ELSE zeroblob(?) END)",
            [(i, MiB, MiB) for i in range(mebibytes)],
        )
        connection.commit()
    return database.stat().st_size


def test_a_backup_streams_the_database_and_the_archive_then_restores(tmp_path: Path) -> None:
    """The snapshot was read whole (read_bytes) and the archive built in a BytesIO before it
    was written: peak memory grew by twice the database's size (a 32 MiB database: +64 MiB),
    and a CA of millions of certificates (gigabytes) met the OOM killer. Both are streamed
    now: the peak is the same for 270 KiB and 32 MiB. The archive still restores."""
    database = tmp_path / "a" / "trellis.db"
    source = Trellis(tmp_path / "a", f"sqlite:///{database}")
    source.set_up("init", "--trust-domain", "example.org")
    small = _peak_rss(source, "backup", "--out", str(tmp_path / "small.tgz"))
    size = _grow(database, 32)
    assert size > 32 * MiB
    big = _peak_rss(source, "backup", "--out", str(tmp_path / "big.tgz"))
    assert big - small < size // 4, (small, big, size)
    assert (tmp_path / "big.tgz").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "big.tgz", "small.tgz"]

    restored = Trellis(tmp_path / "b", f"sqlite:///{tmp_path / 'b' / 'trellis.db'}")
    restored.run("restore", str(tmp_path / "big.tgz"))
    with closing(sqlite3.connect(tmp_path / "b" / "trellis.db")) as connection:
        assert connection.execute("SELECT count(*), sum(length(body)) FROM filler").fetchone() == (
            32,
            32 * MiB,
        )


def _file_size_limit(limit: int) -> None:
    """In the child: writes past ``limit`` bytes fail with EFBIG (Python ignores SIGXFSZ)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_backup_whose_writing_fails_part_way_leaves_the_earlier_one_and_no_temporary_file(
    tmp_path: Path,
) -> None:
    """The archive is now written as it is made, into a temporary file beside ``--out``: a
    write that fails part-way (here a file size limit, as a full disk would) must remove it,
    and the snapshot taken beside it, and leave an earlier backup at ``--out`` as it was."""
    source = Trellis(tmp_path / "a", f"sqlite:///{tmp_path / 'a' / 'trellis.db'}")
    source.set_up("init", "--trust-domain", "example.org")
    # 2 MiB gzip cannot shrink, so that the archive outgrows the limit while the snapshot
    # (~270 KiB) stays under it.
    (tmp_path / "a" / "keys" / "filler.bin").write_bytes(os.urandom(2 * MiB))
    backups, scratch = tmp_path / "backups", tmp_path / "tmp"
    backups.mkdir()
    scratch.mkdir()
    out = backups / "trellis.tgz"
    out.write_bytes(b"an earlier backup\n")
    failed = subprocess.run(
        [TRELLIS, "backup", "--out", str(out)],
        env={**source.env, "TMPDIR": str(scratch)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=lambda: _file_size_limit(MiB),
    )
    assert failed.returncode == 8, failed
    assert failed.stderr.startswith("trellis: ") and failed.stderr.count("\n") == 1, failed
    assert "File too large" in failed.stderr, failed
    assert [p.name for p in backups.iterdir()] == ["trellis.tgz"]
    assert out.read_bytes() == b"an earlier backup\n"
    assert list(scratch.iterdir()) == []  # the snapshot is never in TMPDIR
    source.run("backup", "--out", str(out))  # without the limit, the same backup is written
    assert out.stat().st_size > 2 * MiB


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_directories_made_under_umask_000_are_never_writable_by_others(tmp_path: Path) -> None:
    """restore made the data dir's missing parents, and init and restore the parents of a
    database outside the data dir (and its own directory), with mode 0777 minus the umask:
    0777 under umask 000, so anyone could move them away and plant a CA of their own.
    docs/cli.md: parents made on the way are at most 0755; the directory holding keys or the
    database is 0700."""

    def run(cli: Trellis, *args: str) -> None:
        done = subprocess.run(
            [TRELLIS, *args], env=cli.env, capture_output=True, text=True, timeout=60,
            check=False, umask=0,
        )  # fmt: skip
        assert done.returncode == 0, done

    source = Trellis(tmp_path / "nd" / "x", f"sqlite:///{tmp_path / 'idb' / 'a' / 'b' / 't.db'}")
    run(source, "init", "--trust-domain", "example.org")
    run(source, "backup", "--out", str(tmp_path / "bx" / "deep" / "b.tgz"))
    outside = Trellis(
        tmp_path / "rx" / "deep" / "dd", f"sqlite:///{tmp_path / 'dbdir' / 'a' / 'b' / 't.db'}"
    )
    run(outside, "restore", str(tmp_path / "bx" / "deep" / "b.tgz"))
    inside = Trellis(tmp_path / "ry" / "deep" / "dd", f"sqlite:///{tmp_path / 'ry/deep/dd/t.db'}")
    run(inside, "restore", str(tmp_path / "bx" / "deep" / "b.tgz"))
    modes = {
        path: _mode(tmp_path / path)
        for path in (
            "nd", "nd/x", "idb", "idb/a", "idb/a/b", "bx", "bx/deep",
            "rx", "rx/deep", "rx/deep/dd", "dbdir", "dbdir/a", "dbdir/a/b",
            "ry", "ry/deep", "ry/deep/dd",
        )
    }  # fmt: skip
    private = {"nd/x", "idb/a/b", "bx/deep", "rx/deep/dd", "dbdir/a/b", "ry/deep/dd"}
    assert modes == {path: 0o700 if path in private else 0o755 for path in modes}
    assert _mode(tmp_path / "dbdir" / "a" / "b" / "t.db") == 0o600


def _can_mount_tmpfs() -> str | None:
    """Why a tmpfs cannot be mounted in a mount namespace of its own here, or None."""
    if os.geteuid() != 0:
        return "mounting a small tmpfs (unshare -m) needs root"
    if shutil.which("unshare") is None:
        return "no unshare(1)"
    tried = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    return None if tried.returncode == 0 else f"unshare -m cannot mount: {tried.stderr.strip()}"


@pytest.mark.parametrize("full", ["tmpfs", "file-size-limit"])
def test_a_backup_whose_snapshot_cannot_be_written_is_one_line_and_exit_8(
    tmp_path: Path, full: str
) -> None:
    """The snapshot (SQLite's online backup API, beside --out) hitting a full disk raised a raw
    sqlite3.OperationalError: a traceback and exit 1, where a full disk is one line and exit 8
    (docs/operations.md). tmpfs: a real full file system (64 KiB, under the ~270 KiB snapshot);
    file-size-limit: a write SQLite sees fail (EFBIG) without root."""
    source = Trellis(tmp_path / "a", f"sqlite:///{tmp_path / 'a' / 'trellis.db'}")
    source.set_up("init", "--trust-domain", "example.org")
    small = tmp_path / "small"
    small.mkdir()
    out = small / "x.tgz"
    if full == "tmpfs":
        if reason := _can_mount_tmpfs():
            pytest.skip(reason)
        command = ["unshare", "-m", "sh", "-c",
                   'mount -t tmpfs -o size=64k tmpfs "$0" && exec "$@"',
                   str(small), TRELLIS, "backup", "--out", str(out)]  # fmt: skip
        limit = None
    else:
        command = [TRELLIS, "backup", "--out", str(out)]
        limit = 64 * 1024
    failed = subprocess.run(
        command, env=source.env, capture_output=True, text=True, timeout=60, check=False,
        preexec_fn=None if limit is None else lambda: _file_size_limit(limit),
    )  # fmt: skip
    assert failed.returncode == 8, failed
    assert (
        failed.stderr.startswith("trellis: the database snapshot for ")
        and failed.stderr.count("\n") == 1
    ), failed
    assert list(small.iterdir()) == []  # nothing left (the tmpfs is gone with its namespace)


def _extended_header_bomb(path: Path, kind: bytes, declared: int) -> Path:
    """A gzip'd tar whose first header is an extended header (``kind``) declaring ``declared``
    bytes, followed by that many zeros: concatenated gzip members of 1 MiB of zeros each (one
    stream to a reader), so that it is made in milliseconds and stays ~1 KiB per MiB."""
    info = tarfile.TarInfo("././@LongLink" if kind in b"LK" else "././@PaxHeader")
    info.type, info.size = kind, declared
    zeros = gzip.compress(b"\0" * MiB, compresslevel=9)
    with path.open("wb") as out:
        out.write(gzip.compress(info.tobuf(format=tarfile.USTAR_FORMAT)))
        for _ in range(declared // MiB):
            out.write(zeros)
    return path


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param(tarfile.XHDTYPE, id="pax-x"),
        pytest.param(tarfile.XGLTYPE, id="pax-g"),
        pytest.param(tarfile.GNUTYPE_LONGNAME, id="gnu-L"),
        pytest.param(tarfile.GNUTYPE_LONGLINK, id="gnu-K"),
    ],
)
def test_an_extended_header_bomb_is_refused_with_bounded_memory(
    tmp_path: Path, kind: bytes
) -> None:
    """tarfile reads an extended header whole, in TarFile.open or next(), before the size
    checks saw any header: a 1 MB gzip holding one pax header that declared 1 GiB took 20 s
    and 1.13 GB of memory to refuse (here 256 MiB: about +300 MB). docs/operations.md: such an
    archive is refused from its tar headers before it is read. Now the raw headers are walked
    first (ca.tarheaders): the peak is what refusing a file that is no gzip at all takes."""
    cli = Trellis(tmp_path / "var", f"sqlite:///{tmp_path / 'var' / 'trellis.db'}")
    (tmp_path / "junk.tgz").write_bytes(b"not a backup\n")
    baseline = _peak_rss(cli, "restore", str(tmp_path / "junk.tgz"), code=2)
    bomb = _extended_header_bomb(tmp_path / "bomb.tgz", kind, 256 * MiB)
    assert bomb.stat().st_size < MiB
    started = time.monotonic()
    peak = _peak_rss(cli, "restore", str(bomb), code=2)
    assert peak - baseline < 32 * MiB, (baseline, peak)
    assert time.monotonic() - started < 30
    assert not (tmp_path / "var").exists()
