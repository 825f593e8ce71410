"""``ca.files.held_temporary`` and ``remove_if_abandoned``: a temporary file is taken for
abandoned only once no process holds its flock (its writer died), never while it is held."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ca.files import held_temporary, remove_if_abandoned

HOLD_AND_WAIT = """
import sys
from pathlib import Path
from ca.files import held_temporary
fd, path = held_temporary(Path(sys.argv[1]), ".out.")
print(path, flush=True)
sys.stdin.read()
"""


def test_a_held_file_stays_and_one_whose_holder_died_is_removed(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", HOLD_AND_WAIT, str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    ) as holder:  # fmt: skip
        try:
            assert holder.stdout is not None
            path = Path(holder.stdout.readline().strip())
            assert path.parent == tmp_path and path.name.startswith(".out.")
            assert not remove_if_abandoned(path)
            assert path.exists()
        finally:
            holder.kill()
    assert remove_if_abandoned(path)
    assert not path.exists()


def test_a_file_held_in_this_process_is_not_abandoned_and_others_are_left(tmp_path: Path) -> None:
    fd, path = held_temporary(tmp_path, ".x.")
    try:
        assert not remove_if_abandoned(path)  # a second open file description: excluded too
    finally:
        os.close(fd)
    assert remove_if_abandoned(path)
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "dir")
    assert not remove_if_abandoned(tmp_path / "dir")
    assert not remove_if_abandoned(tmp_path / "link")
    assert not remove_if_abandoned(tmp_path / "missing")
    assert (tmp_path / "dir").is_dir() and (tmp_path / "link").is_symlink()
