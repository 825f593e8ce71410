"""The ``trellis`` command: a thin Typer tree over ``ca``; errors leave through ``main``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import sqlalchemy as sa
import typer

from ca.errors import TrellisError, Unavailable
from cli import (
    admin,
    agent,
    audit,
    authority,
    federation,
    gateway,
    istio,
    openvpn,
    ops,
    revocation,
    server,
    vault,
    workload,
)
from cli.common import EXIT_CODES, STATE, exit_code

app = typer.Typer(
    help="Trellis: mTLS certificate authority and SPIFFE workload identity.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)


@app.callback()
def root(
    data_dir: Annotated[
        Path | None, typer.Option(help="Data directory (TRELLIS_DATA_DIR, default ./var)")
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(help="Database URL (TRELLIS_DATABASE_URL, default SQLite in the data dir)"),
    ] = None,
) -> None:
    STATE.data_dir = data_dir
    STATE.database_url = database_url


app.command()(admin.init)
app.command()(server.serve)
app.command()(admin.revoke)
app.command()(agent.agent)
app.command()(ops.backup)
app.command()(ops.restore)
app.add_typer(admin.entry_app, name="entry")
app.add_typer(admin.token_app, name="token")
app.add_typer(workload.svid_app, name="svid")
app.add_typer(admin.certs_app, name="certs")
app.add_typer(admin.bundle_app, name="bundle")
app.add_typer(revocation.crl_app, name="crl")
app.add_typer(authority.authority_app, name="authority")
app.add_typer(authority.jobs_app, name="jobs")
app.add_typer(vault.vault_app, name="vault")
app.add_typer(istio.istio_app, name="istio")
app.add_typer(audit.audit_app, name="audit")
app.add_typer(federation.federation_app, name="federation")
app.add_typer(gateway.gateway_app, name="gateway")
app.add_typer(openvpn.openvpn_app, name="openvpn")


def main(argv: list[str] | None = None) -> None:
    """Domain failures leave as one line on stderr and a documented exit code (docs/cli.md);
    usage errors keep click's usual message and exit 2."""
    try:
        app(args=argv, prog_name="trellis")
    except TrellisError as error:
        typer.echo(f"trellis: {error.detail}", err=True)
        sys.exit(exit_code(error))
    except OSError as error:  # a file the command reads or writes (an --out checked earlier)
        where = f"{error.filename}: " if error.filename else ""
        typer.echo(f"trellis: {where}{error.strerror or error}", err=True)
        sys.exit(EXIT_CODES[Unavailable])
    except sa.exc.DatabaseError as error:  # not a database, or a damaged one
        typer.echo(f"trellis: the database cannot be used: {error.orig}", err=True)
        sys.exit(EXIT_CODES[Unavailable])
    finally:
        STATE.close()
