"""A join token as users hand it over: from a file, through a Kubernetes Secret, with the
file's trailing newline. Real ``trellis serve``, real ``trellis svid request`` and ``trellis
agent`` processes. A token that no HTTP header can carry is refused in one line (exit 2) that
never repeats it, before anything is sent: the token is still unspent afterwards."""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import zygote
from tests.cli.test_walkthrough import Trellis

pytestmark = pytest.mark.slow

_names = itertools.count()


@pytest.fixture(scope="module")
def trellis(tmp_path_factory: pytest.TempPathFactory) -> Trellis:
    """One instance (SQLite) for the module: each test brings its own entry and join token,
    and what it checks (a refusal leaves its token unspent) is about that token alone."""
    base = tmp_path_factory.mktemp("join-token-input")
    cli = Trellis(base / "var", f"sqlite:///{base / 'trellis.db'}")
    cli.set_up("init", "--trust-domain", "example.org")
    return cli


@pytest.fixture(scope="module")
def server(trellis: Trellis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with trellis.serving(tmp_path_factory.mktemp("join-token-serve") / "serve.log") as serving:
        yield serving.url


def _token(trellis: Trellis, name: str, uses: int = 1) -> str:
    """A fresh entry and token, made in-process: the tests start from them, the workload
    commands under test run as real processes."""
    spiffe_id = f"spiffe://example.org/{name}-{next(_names)}"
    entry = trellis.set_up("entry", "create", "--spiffe-id", spiffe_id).strip()
    return trellis.set_up("token", "create", "--entry", entry, "--uses", str(uses)).strip()


def _workload(
    trellis: Trellis, args: list[str], token: str, *, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``trellis ARGS`` with the token in ``TRELLIS_JOIN_TOKEN``, as a Secret's env var gives it."""
    env = {**trellis.env, "TRELLIS_JOIN_TOKEN": token}
    return zygote.run(args, env=env, timeout=timeout)


def _request(server: str, trellis: Trellis, out: Path) -> list[str]:
    bundle = str(trellis.data_dir / "bundle.pem")
    return ["svid", "request", "--server", server, "--bundle", bundle, "--out", str(out)]


def _agent(server: str, trellis: Trellis, out: Path, *more: str) -> list[str]:
    bundle = str(trellis.data_dir / "bundle.pem")
    return ["agent", "--server", server, "--bundle", bundle, "--dir", str(out), *more]


@pytest.mark.parametrize("ending", ["\n", "\r\n", "  \n", "\t"], ids=repr)
def test_a_token_with_a_trailing_newline_works(
    trellis: Trellis, server: str, tmp_path: Path, ending: str
) -> None:
    """``kubectl create secret generic --from-file=token`` keeps the file's newline; so does a
    ``$(<token)`` that some shells pass on. Both commands trim it and get their SVID."""
    token = _token(trellis, "web", uses=2)
    obtained = _workload(trellis, _request(server, trellis, tmp_path / "req"), token + ending)
    assert obtained.returncode == 0, obtained.stderr
    assert (tmp_path / "req" / "svid.pem").is_file()
    agent = _workload(
        trellis, _agent(server, trellis, tmp_path / "agent", "--once"), token + ending
    )
    assert agent.returncode == 0, agent.stderr
    assert (tmp_path / "agent" / "svid.pem").is_file()
    for result in (obtained, agent):
        assert "Traceback" not in result.stderr and token not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda t: f"{t[:20]}\n{t[20:]}", id="inner-newline"),
        pytest.param(lambda t: f"{t[:20]}\x01{t[20:]}", id="control"),
        pytest.param(lambda t: f"{t[:20]} {t[20:]}", id="space"),
        pytest.param(lambda t: f"{t}é", id="non-ascii"),
        pytest.param(lambda t: f"{t[:20]}\u2028{t[20:]}", id="line-separator"),
    ],
)
def test_a_token_no_header_can_carry_is_refused_in_one_line(
    trellis: Trellis, server: str, tmp_path: Path, damage: object
) -> None:
    """Before: ``ValueError: Invalid header value b'Bearer trellis-join-...'`` in a worker
    thread's traceback (the token in full), then ``AssertionError``, exit 1; for the agent, one
    run in three. Now exit 2, one line, no part of the token, and nothing sent: the token still
    works afterwards."""
    assert callable(damage)
    token = _token(trellis, "api")
    bad = damage(token)
    runs = {
        "svid request": _request(server, trellis, tmp_path / "req"),
        "agent --once": _agent(server, trellis, tmp_path / "once", "--once"),
        "agent": _agent(server, trellis, tmp_path / "agent"),
    }
    for name, args in runs.items():
        result = _workload(trellis, args, bad)
        output = result.stdout + result.stderr
        assert result.returncode == 2, (name, output)
        assert result.stdout == "" and len(result.stderr.splitlines()) == 1, (name, output)
        assert "trellis: the join token (--token or TRELLIS_JOIN_TOKEN)" in result.stderr, output
        assert token[:20] not in output and token[20:] not in output, (name, output)
    good = _workload(trellis, _request(server, trellis, tmp_path / "good"), token)
    assert good.returncode == 0, good.stderr


def test_an_empty_token_is_refused_by_svid_request(
    trellis: Trellis, server: str, tmp_path: Path
) -> None:
    """A Secret's key left empty, or a newline alone: not a token at all."""
    result = _workload(trellis, _request(server, trellis, tmp_path / "req"), "\n")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "trellis: the join token (--token or TRELLIS_JOIN_TOKEN) is empty"
    )
