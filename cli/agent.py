"""``trellis agent``: the workload's companion process."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer

from ca.agent import Agent, AgentConfig, ReloadCommand
from ca.keys import KeyType
from ca.logs import configure_logging
from ca.serverconn import ServerUrl
from ca.workload import join_token
from cli.common import svid_dir


def agent(
    server: Annotated[str, typer.Option(help="https://host:port of Trellis")],
    bundle: Annotated[Path, typer.Option(help="Trust bundle to recognise the server by at first")],
    dir: Annotated[
        Path,
        typer.Option(
            "--dir",
            help="Directory for svid.pem, svid.key, bundle.pem",
            # Checked before the join token is spent: a certificate whose key cannot be
            # written is lost, and so is the token's use (``svid request --out`` likewise).
            callback=svid_dir,
        ),
    ],
    token: Annotated[
        str | None, typer.Option(help="Join token, to bootstrap", envvar="TRELLIS_JOIN_TOKEN")
    ] = None,
    exec_command: Annotated[
        str | None, typer.Option("--exec", help="Run after every change, e.g. 'nginx -s reload'")
    ] = None,
    once: Annotated[
        bool, typer.Option("--once", help="Obtain a valid SVID and exit (init containers)")
    ] = False,
    key_type: Annotated[str, typer.Option(help="Workload key type")] = "ec-p256",
) -> None:
    """Obtain an SVID and keep it renewed (half-life, jitter), with the bundle kept fresh."""
    configure_logging()
    config = AgentConfig(
        server=ServerUrl.parse(server),
        bundle=bundle,
        directory=dir,
        # An empty TRELLIS_JOIN_TOKEN (a template's unset value) is no token, as before.
        token=join_token(token) if token and token.strip() else None,
        exec_command=ReloadCommand.parse(exec_command) if exec_command is not None else None,
        key_type=KeyType.parse(key_type),
    )
    stopping: list[bool] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(True))
    Agent(config).run(once=once, stop=lambda: bool(stopping))
