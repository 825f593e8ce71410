"""``ca.files.written_path`` and the writers that use it: a symlink is written through, never
replaced by the rename; a chain through ``/proc`` or ``/dev``, a loop, or a link another user
planted in a sticky world-writable directory is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ca.errors import InvalidInput
from ca.files import OwnData, check_writable, replacing_together, write_atomic, written_path


def test_a_chain_of_links_leads_to_its_last_file(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "first").symlink_to("d/second")
    (tmp_path / "d" / "second").symlink_to(tmp_path / "target.pem")  # need not exist yet
    assert written_path(tmp_path / "first") == tmp_path / "target.pem"
    assert written_path(tmp_path / "plain.pem") == tmp_path / "plain.pem"
    write_atomic(tmp_path / "first", b"one\n")
    assert (tmp_path / "first").is_symlink() and (tmp_path / "target.pem").read_bytes() == b"one\n"
    with replacing_together({tmp_path / "first": (b"two\n", 0o600)}):
        pass
    assert (tmp_path / "d" / "second").is_symlink()
    assert (tmp_path / "target.pem").read_bytes() == b"two\n"


@pytest.mark.parametrize(
    "link_to",
    ["/proc/self/fd/1", "/dev/stdout", "/dev/null", "/dev/trellis-not-there", "/proc/self/cwd/x"],
)
def test_a_link_through_proc_or_dev_is_refused(tmp_path: Path, link_to: str) -> None:
    link = tmp_path / "out"
    link.symlink_to(link_to)
    with pytest.raises(InvalidInput, match="a device or a process's file"):
        written_path(link)
    with pytest.raises(InvalidInput, match="a device or a process's file"):
        check_writable(link, directory=False)
    with pytest.raises(InvalidInput, match="a device or a process's file"):
        write_atomic(link, b"key\n")
    assert link.is_symlink()


def test_a_loop_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(InvalidInput, match="too many levels"):
        written_path(tmp_path / "a")


@pytest.mark.parametrize("below", ["", "x"], ids=["the-loop", "under-it"])
@pytest.mark.parametrize("directory", [False, True], ids=["file", "directory"])
def test_a_loop_as_an_output_is_one_line_not_a_traceback(
    tmp_path: Path, below: str, directory: bool
) -> None:
    """With Trellis's own data to compare against (``OwnData``, as every ``--out`` is),
    ``Path.resolve`` raised ``RuntimeError: Symlink loop`` on Python 3.11: a traceback, exit 1."""
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    out = tmp_path / "loop1" / below if below else tmp_path / "loop1"
    own = OwnData(tmp_path / "var", frozenset({"keys"}))
    with pytest.raises(InvalidInput, match=r"^--out .*: too many levels of symbolic links$"):
        check_writable(out, directory=directory, what=f"--out {out}", own=own)
    assert not own.holds(out)


@pytest.mark.skipif(os.geteuid() != 0, reason="planting another user's link needs root")
def test_a_link_planted_in_a_sticky_shared_directory_is_not_followed(tmp_path: Path) -> None:
    """What ``fs.protected_symlinks`` keeps root's ``open`` from following, a rename to the
    resolved path would follow all the same."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    victim = tmp_path / "victim.pem"
    victim.write_bytes(b"theirs\n")
    planted = shared / "out.pem"
    planted.symlink_to(victim)
    os.lchown(planted, 12345, 12345)
    with pytest.raises(InvalidInput, match="owned by uid 12345"):
        check_writable(planted, directory=False)
    os.lchown(planted, os.geteuid(), os.getegid())  # one's own link is followed
    write_atomic(planted, b"mine\n")
    assert planted.is_symlink() and victim.read_bytes() == b"mine\n"
