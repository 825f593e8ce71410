"""An SVID directory holding a directory where ``write_svid`` renames a symlink into place (what
``cp -rL``, ``tar -h`` or ``rsync -L`` of one leaves at ``..data``): the start-up check passed it,
the server signed, and the write failed (``..data.c11cc63c: Is a directory``, exit 8) with the
certificate's key thrown away and a join-token use spent; a running agent retried it like a full
disk, 19 certificates and 6 token uses in a minute. It is refused now before anything is
issued, and an agent that meets it later stops instead of retrying."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

import pytest
from pydantic import SecretStr

from ca.agent import AgentConfig
from ca.clock import FixedClock
from ca.config import Context, Settings, build_context
from ca.errors import InvalidInput
from ca.serverconn import ServerUrl
from ca.store.db import SchemaPolicy
from ca.workload import SvidFiles, check_svid_directory, write_svid
from tests import zygote
from tests.ca.svidkit import SQLITE_ONLY, Local, LocalClient, count_rows, enrol
from tests.cli.test_walkthrough import Trellis
from tests.conftest import free_port

NAMES = ["..data", "svid.pem", "svid.key", "bundle.pem"]


@SQLITE_ONLY
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("with_svid", [False, True], ids=["empty", "published"])
def test_a_directory_where_a_link_goes_is_refused(
    ctx: Context, tmp_path: Path, name: str, with_svid: bool
) -> None:
    directory = tmp_path / "svid"
    directory.mkdir()
    if with_svid:
        enrol(ctx, "spiffe://example.org/w").on_disk(directory)
        (directory / name).unlink()
    (directory / name).mkdir()
    with pytest.raises(InvalidInput, match=rf"^--dir {directory}: {name} is a directory"):
        check_svid_directory(directory, what=f"--dir {directory}")


@SQLITE_ONLY
def test_what_write_svid_can_replace_passes(ctx: Context, tmp_path: Path) -> None:
    published = tmp_path / "published"
    enrol(ctx, "spiffe://example.org/w").on_disk(published)
    plain = tmp_path / "plain"  # files of an older version, or copied without -L
    plain.mkdir()
    for name in NAMES:
        (plain / name).write_text("x")
    for directory in (published, plain, tmp_path / "missing" / "below"):
        assert check_svid_directory(directory) == directory


@SQLITE_ONLY
def test_a_data_link_made_by_hand_leads_to_nothing_deleted(ctx: Context, tmp_path: Path) -> None:
    """``..data -> ../shared`` starts with "..", like the agent's own stamped directories: the
    write after it deleted ``shared``, outside the SVID directory."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "keep").write_text("not the agent's")
    directory = tmp_path / "svid"
    directory.mkdir()
    (directory / "..data").symlink_to("../shared")
    web = enrol(ctx, "spiffe://example.org/w")
    write_svid(SvidFiles(directory), web.full_chain_pem, web.key, web.svid.bundle_pem)
    assert (shared / "keep").read_text() == "not the agent's"
    assert SvidFiles(directory).svid.read_bytes() == web.full_chain_pem


# --- an agent that meets one while it runs -----------------------------------------------------


@SQLITE_ONLY
def test_an_agent_stops_on_a_write_no_retry_mends(
    ctx: Context, clock: FixedClock, tmp_path: Path
) -> None:
    files = enrol(ctx, "spiffe://example.org/w").on_disk(tmp_path / "svid")
    config = AgentConfig(ServerUrl.parse("https://127.0.0.1:1"), files.bundle, files.directory)
    agent = Local(
        config, clock=clock, sleep=lambda s: clock.advance(dt.timedelta(seconds=s)),
        rng=random.Random(7),
    )  # fmt: skip

    def svid_pem_made_a_directory(renewal: int, directory: Path) -> None:
        if renewal == 2:  # made while the agent runs
            (directory / "svid.pem").unlink()
            (directory / "svid.pem").mkdir()

    agent.client = LocalClient(ctx, before_write=svid_pem_made_a_directory)
    with pytest.raises(InvalidInput, match=rf"{files.svid}: Is a directory"):
        agent.run(stop=lambda: agent.client.renewals >= 4)
    assert agent.client.renewals == 2  # at start, then the one that failed: not retried


# --- the commands: refused before anything is issued or spent ----------------------------------


def test_the_commands_refuse_it_in_one_line_exit_2(tmp_path: Path) -> None:
    cli = Trellis(tmp_path / "var", f"sqlite:///{tmp_path / 'trellis.db'}")
    cli.set_up("init", "--trust-domain", "example.org")
    copied = tmp_path / "copied"
    (copied / "..data").mkdir(parents=True)
    closed = f"https://127.0.0.1:{free_port()}"  # reached only once the check has passed
    bundle = str(cli.data_dir / "bundle.pem")
    commands = [
        ["svid", "mint", "--spiffe-id", "spiffe://example.org/w", "--out", str(copied)],
        ["svid", "request", "--server", closed, "--bundle", bundle, "--token", "t",
         "--out", str(copied)],
        ["agent", "--server", closed, "--bundle", bundle, "--token", "t", "--once",
         "--dir", str(copied)],
    ]  # fmt: skip
    for args in commands:
        result = zygote.run(args, env=cli.env, timeout=30)
        assert result.returncode == 2, (args, result.stderr)
        option = "--dir" if args[0] == "agent" else "--out"
        assert result.stderr.splitlines() == [
            f"trellis: {option} {copied}: ..data is a directory, where Trellis keeps a symlink"
            " (a copy made following links, cp -rL or tar -h?): remove it, or choose another"
            " directory"
        ], args
    settings = Settings(
        data_dir=cli.data_dir,
        database_url=cli.env["TRELLIS_DATABASE_URL"],
        key_passphrase=SecretStr(cli.env["TRELLIS_KEY_PASSPHRASE"]),
    )
    ctx = build_context(settings, schema=SchemaPolicy.TRUSTED)
    try:
        assert count_rows(ctx, "certificate") == 0  # nothing minted
    finally:
        ctx.close()
