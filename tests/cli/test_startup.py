"""What a ``trellis`` command imports before it does anything: every command pays for it in CPU
on each start (the suite starts the CLI hundreds of times), so the web server, the API framework,
the scheduler and the HTTP and Vault clients are imported only by the commands that use them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.cli.test_walkthrough import Trellis

# fastapi/starlette: the wire models the CLI renders live in api.schemas, which imports neither.
# uvicorn: only `serve`. apscheduler: only a started scheduler. hvac/requests: only a Vault
# connection. httpx (and the rich and pygments its command line pulls): only a request.
SERVER_SIDE = ("fastapi", "starlette", "uvicorn", "apscheduler", "hvac", "requests", "httpx")

_LOADED = "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:]))))"


def _loaded_after(code: str, env: dict[str, str] | None = None) -> list[str]:
    probe = f"import json, sys\n{code}\n{_LOADED}"
    result = subprocess.run(
        [sys.executable, "-c", probe, *SERVER_SIDE],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loaded: list[str] = json.loads(result.stdout.splitlines()[-1])
    return loaded


def test_importing_the_cli_loads_no_server_side_module() -> None:
    assert _loaded_after("import cli.main") == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_plain_command_loads_no_server_side_module(trellis: Trellis) -> None:
    """``certs list`` run to completion, as ``trellis`` runs it (``main`` exits through
    ``SystemExit``, caught here so the modules can be listed after it)."""
    run = (
        "from cli.main import main\n"
        "try:\n"
        "    main(['certs', 'list', '--json'])\n"
        "except SystemExit as done:\n"
        "    assert not done.code, done.code"
    )
    assert _loaded_after(run, trellis.env) == []
