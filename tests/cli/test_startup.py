"""What a ``trellis`` command imports before it does anything: every command pays for it in CPU
on each start (the suite starts the CLI hundreds of times), so the web server, the API framework,
the scheduler and the HTTP and Vault clients are imported only by the commands that use them."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.main import COMMANDS, app
from tests.cli.test_walkthrough import Trellis

# fastapi/starlette: the wire models the CLI renders live in api.schemas, which imports neither.
# uvicorn: only `serve`. apscheduler: only a started scheduler. hvac/requests: only a Vault
# connection. httpx (and the rich and pygments its command line pulls): only a request.
SERVER_SIDE = ("fastapi", "starlette", "uvicorn", "apscheduler", "hvac", "requests", "httpx")


def _modules_after(code: str, env: dict[str, str] | None = None) -> set[str]:
    """Every module a fresh interpreter holds once ``code`` has run."""
    probe = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return set(json.loads(result.stdout.splitlines()[-1]))


def _server_side(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules} & set(SERVER_SIDE)


def test_importing_the_cli_loads_no_server_side_module() -> None:
    assert _server_side(_modules_after("import cli.main")) == set()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_plain_command_loads_no_server_side_module(trellis: Trellis) -> None:
    """``certs list`` run to completion, as ``trellis`` runs it (``main`` exits through
    ``SystemExit``, caught here so the modules can be listed after it); of the sub-command
    modules, only its own is imported."""
    run = (
        "from cli.main import main\n"
        "try:\n"
        "    main(['certs', 'list', '--json'])\n"
        "except SystemExit as done:\n"
        "    assert not done.code, done.code"
    )
    modules = _modules_after(run, trellis.env)
    assert _server_side(modules) == set()
    # The database is at this Trellis's revision: one query says so (ca.store.db.SCHEMA_HEADS).
    assert {name for name in modules if name.split(".")[0] == "alembic"} == set()
    assert {name for name in modules if name.startswith("cli.")} == {
        "cli.admin",
        "cli.common",
        "cli.launch",
        "cli.main",
        "cli.progress",  # light: rich's bars only when a terminal watches
    }
    assert "rich.progress" not in modules


def test_every_command_of_the_table_loads_with_its_help() -> None:
    """The root's sub-commands are built from ``cli.main.COMMANDS`` when first used: a name
    pointing nowhere would fail only when an operator typed it."""
    runner = CliRunner()
    listed = runner.invoke(app, ["--help"], prog_name="trellis")
    assert listed.exit_code == 0, listed.output
    for name in COMMANDS:
        shown = runner.invoke(app, [name, "--help"], prog_name="trellis")
        assert shown.exit_code == 0, shown.output
        assert f"Usage: trellis {name} [OPTIONS]" in shown.output
        assert f"\n  {name} " in listed.output


def test_every_command_says_what_it_does_in_its_help() -> None:
    """``--help`` starts with a line saying what the command does: ``certs list`` and ``certs
    show`` had none (their functions had no docstring), only their options."""
    runner = CliRunner()
    groups = [[name] for name in COMMANDS]
    while groups:
        path = groups.pop()
        shown = runner.invoke(app, [*path, "--help"], prog_name="trellis", terminal_width=200)
        assert shown.exit_code == 0, shown.output
        usage, _, rest = shown.output.partition("\n\n")
        assert usage.startswith(f"Usage: trellis {' '.join(path)} ")
        described = rest.lstrip()
        assert described and not described.startswith(("Options:", "Arguments:")), path
        listing = shown.output.partition("\nCommands:\n")[2].partition("\n\n")[0]
        groups += [[*path, line.split()[0]] for line in listing.splitlines() if line[2] != " "]


def test_every_command_that_confirms_takes_y_for_yes() -> None:
    """docs/cli.md describes the commands that ask together, ``-y, --yes``: ``openvpn client
    revoke`` took ``--yes`` only."""
    runner = CliRunner()
    groups, confirming = [[name] for name in COMMANDS], []
    while groups:
        path = groups.pop()
        shown = runner.invoke(app, [*path, "--help"], prog_name="trellis", terminal_width=200)
        if "--yes" in shown.output:
            confirming.append(" ".join(path))
            assert "-y, --yes" in shown.output, path
        listing = shown.output.partition("\nCommands:\n")[2].partition("\n\n")[0]
        groups += [[*path, line.split()[0]] for line in listing.splitlines() if line[2] != " "]
    assert sorted(confirming) == [
        "authority revoke-intermediate",
        "istio remove",
        "openvpn client revoke",
        "revoke",
    ]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_command_s_imports_run_without_the_collector_and_its_body_with_it(
    trellis: Trellis,
) -> None:
    """``trellis`` starts through ``cli.launch.main``: no cyclic collection while the command's
    modules load (a third of a command's CPU went to collections and to the collection over
    everything at exit), then the collector back, with the start-up objects frozen out of its
    way, before the command's own work: a long-running command (``trellis agent``) must not
    run without it."""
    run = (
        "import gc, sys\n"
        "collections = []\n"
        "gc.callbacks.append(lambda phase, info: collections.append(phase))\n"
        "import cli.common, cli.launch\n"
        "done = cli.launch.imports_done\n"
        "def imports_done():\n"  # the collections until the command is resolved and loaded
        "    print(len(collections), file=sys.stderr)\n"
        "    done()\n"
        "cli.launch.imports_done = imports_done\n"  # cli.main, imported by main(), takes it
        "opened = cli.common.State.context\n"
        "def context(self, *args, **kwargs):\n"
        "    print(gc.isenabled(), gc.get_freeze_count() > 0, file=sys.stderr)\n"
        "    return opened(self, *args, **kwargs)\n"
        "cli.common.State.context = context\n"
        "collections.clear()\n"
        "sys.argv = ['trellis', 'certs', 'list', '--json']\n"
        "from cli.launch import main\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", run], capture_output=True, text=True, timeout=60, env=trellis.env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.split() == ["0", "True", "True"]


def test_the_serving_supervisor_s_modules_stay_light() -> None:
    """``trellis serve`` stays a process of its own beside its workers (the supervisor, and
    the command that started it): what they import is RSS the benchmark's 300 MB budget
    counts. Importing ``ca.config`` for two default numbers (``cli.tlsreload``) took the
    command's process from 26 to 66 MiB (SQLAlchemy, pydantic-settings and the rest)."""
    run = (
        "import sys, cli.tlsreload, cli.supervisor\n"
        "heavy = ('ca.config', 'sqlalchemy', 'pydantic_settings', 'api.app', 'fastapi')\n"
        "print(' '.join(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == []


def test_serve_is_recognised_before_click_parses_the_command_line() -> None:
    """``cli.launch`` ignores SIGHUP for ``serve`` before Click is imported, so it reads the
    command itself: its list of the root options that take a value must be Click's."""
    import typer.main

    from cli.launch import ROOT_OPTIONS_WITH_VALUES, command_of
    from cli.main import app

    root = typer.main.get_command(app)
    valued = {
        name
        for param in root.params
        if param.param_type_name == "option" and getattr(param, "is_flag", True) is False
        for name in param.opts
    }
    assert valued == set(ROOT_OPTIONS_WITH_VALUES)
    assert command_of(["--data-dir", "serve", "certs", "list"]) == "certs"
    assert command_of(["--database-url=sqlite://", "serve", "--workers", "2"]) == "serve"
    assert command_of(["--help"]) is None


def test_every_argument_and_option_of_every_command_has_help() -> None:
    """``entry show ENTRY_ID``, ``token revoke``, ``certs show``, ``federation show|remove``,
    ``gateway consumer disable`` and ``gateway cert show|revoke`` listed their argument in
    --help with nothing to say what it is (a probe walked the tree)."""
    import typer.main

    from cli.main import app

    root = typer.main.get_command(app)
    context = type(root).context_class(root)

    def walk(command: Any, path: str) -> list[str]:
        bare = [
            f"{path} {param.name}"
            for param in command.params
            if not getattr(param, "hidden", False) and not getattr(param, "help", None)
        ]
        if hasattr(command, "list_commands"):  # a group (Typer's own click); imported lazily
            for name in command.list_commands(context):
                sub = command.get_command(context, name)
                if sub is not None and not sub.hidden:
                    bare += walk(sub, f"{path} {name}")
        return bare

    walked = walk(root, "trellis")
    assert walked == []
    assert len(context.command.list_commands(context)) > 15  # the tree was walked
