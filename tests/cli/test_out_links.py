"""An ``--out`` that is a symlink: the file it leads to is written, the link stays; one through
``/proc`` or ``/dev`` (``/dev/stdout`` is a link to ``/proc/self/fd/1``) is exit 2 whatever
stdout is. Before, a link to ``/proc/self/fd/1`` with stdout redirected to a file passed the
check (it led to a regular file) and was replaced by a regular file holding the output (the
Istio CA key, for ``istio issue``), exit 0, the redirect's file left empty."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest

from ca.errors import InvalidInput
from ca.files import check_writable, written_path
from tests.cli.test_walkthrough import TRELLIS, Trellis


@pytest.fixture
def local(tmp_path: Path) -> Trellis:
    cli = Trellis(tmp_path / "var", f"sqlite:///{tmp_path / 'trellis.db'}")
    cli.set_up("init", "--trust-domain", "example.org")
    return cli


def _run(cli: Trellis, args: list[str], stdout: int | Path) -> tuple[int, str]:
    """``trellis ARGS`` with stdout a pipe (``subprocess.PIPE``) or redirected to a file."""
    if isinstance(stdout, Path):
        with stdout.open("wb") as redirected:
            result = subprocess.run(
                [TRELLIS, *args], env=cli.env, stdout=redirected, stderr=subprocess.PIPE,
                text=True, timeout=60, check=False,
            )  # fmt: skip
    else:
        result = subprocess.run(
            [TRELLIS, *args], env=cli.env, stdout=stdout, stderr=subprocess.PIPE,
            text=True, timeout=60, check=False,
        )  # fmt: skip
    return result.returncode, result.stderr


def _certificates(cli: Trellis) -> int:
    listed = json.loads(cli.set_up("certs", "list", "--json"))  # in-process: not under test
    assert isinstance(listed, list)
    return len(listed)


@pytest.mark.parametrize(
    ("args", "in_directory"),
    [
        pytest.param(["bundle", "show"], None, id="bundle-show"),
        pytest.param(["crl", "fetch"], None, id="crl-fetch"),
        pytest.param(["istio", "issue", "--cluster", "c1"], None, id="istio-secret-yaml"),
        # files: the key's own file in the --out directory is the link
        pytest.param(
            ["istio", "issue", "--cluster", "c1", "--format", "files"],
            "ca-key.pem",
            id="istio-files",
        ),
    ],
)
def test_an_out_linked_to_stdout_is_refused_in_every_stdout_state(
    local: Trellis, tmp_path: Path, args: list[str], in_directory: str | None
) -> None:
    before = _certificates(local)
    out = tmp_path / "out"
    link = out / in_directory if in_directory else out
    link.parent.mkdir(exist_ok=True)
    link.symlink_to("/proc/self/fd/1")
    captured = tmp_path / "captured.txt"
    for stdout in (captured, subprocess.PIPE):
        code, stderr = _run(local, [*args, "--out", str(out)], stdout)
        assert code == 2, (stdout, stderr)
        assert stderr.startswith("trellis: ") and stderr.count("\n") == 1, stderr
        assert "/proc/self/fd/1" in stderr and "Traceback" not in stderr, stderr
        assert stat.S_ISLNK(link.lstat().st_mode)
    assert captured.read_bytes() == b""
    assert _certificates(local) == before  # no intermediate issued whose key went nowhere


@pytest.mark.parametrize("out", ["/dev/stdout", "/proc/self/fd/1", "/dev/fd/1", "/dev/trellis-x"])
def test_out_naming_stdout_itself_is_refused(out: str) -> None:
    """Judged without running a command: a run whose check failed would write over the host's
    own /dev/stdout (a run of the code before the fix did, and the next runs, finding a regular
    file there, wrote over it again). A name in /dev that is no link is refused as well."""
    with pytest.raises(InvalidInput, match="a device or a process's file"):
        written_path(Path(out))
    with pytest.raises(InvalidInput):
        check_writable(Path(out), directory=False)


def test_a_file_in_dev_shm_is_a_file() -> None:
    """/dev/shm is a file system programs keep files in, not a device."""
    assert written_path(Path("/dev/shm/trellis-out.pem")) == Path("/dev/shm/trellis-out.pem")


def test_an_out_linked_to_a_file_writes_that_file(local: Trellis, tmp_path: Path) -> None:
    """As ``openssl -out`` does: the link stays a link, the file it names gets the output."""
    real = tmp_path / "certs" / "bundle.pem"
    real.parent.mkdir()
    real.write_bytes(b"old\n")
    link = tmp_path / "current.pem"
    link.symlink_to(Path("certs") / "bundle.pem")
    code, stderr = _run(local, ["bundle", "show", "--out", str(link)], subprocess.PIPE)
    assert code == 0, stderr
    assert link.is_symlink() and real.read_bytes() == (local.data_dir / "bundle.pem").read_bytes()


def test_a_loop_as_out_or_dir_is_one_line_exit_2(local: Trellis, tmp_path: Path) -> None:
    """A traceback (``RuntimeError: Symlink loop``), exit 1, before."""
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    loop = str(tmp_path / "loop1")
    bundle = str(local.data_dir / "bundle.pem")
    for args, option in [
        (["svid", "mint", "--spiffe-id", "spiffe://example.org/w", "--out", loop], "--out"),
        (["agent", "--server", "https://127.0.0.1:1", "--bundle", bundle, "--token", "t",
          "--once", "--dir", loop], "--dir"),
    ]:  # fmt: skip
        status, stderr = _run(local, args, subprocess.PIPE)
        assert status == 2, stderr
        assert stderr.splitlines() == [
            f"trellis: {option} {loop}: too many levels of symbolic links"
        ]
    assert _certificates(local) == 0
