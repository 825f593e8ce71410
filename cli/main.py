"""The ``trellis`` command: a thin Typer tree over ``ca``; errors leave through ``main``."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator, MutableMapping
from typing import Annotated, Any

import sqlalchemy as sa
import typer
from typer.core import TyperGroup

from ca.errors import TrellisError, Unavailable
from cli.common import EXIT_CODES, STATE, exit_code
from cli.launch import finished, imports_done

# name: (module, attribute), a command function or a sub-command Typer, in ``--help`` order.
COMMANDS = {
    "init": ("cli.admin", "init"),
    "serve": ("cli.server", "serve"),
    "revoke": ("cli.admin", "revoke"),
    "agent": ("cli.agent", "agent"),
    "backup": ("cli.ops", "backup"),
    "restore": ("cli.ops", "restore"),
    "migrate": ("cli.ops", "migrate"),
    "entry": ("cli.admin", "entry_app"),
    "token": ("cli.admin", "token_app"),
    "svid": ("cli.workload", "svid_app"),
    "certs": ("cli.admin", "certs_app"),
    "bundle": ("cli.admin", "bundle_app"),
    "crl": ("cli.revocation", "crl_app"),
    "authority": ("cli.authority", "authority_app"),
    "jobs": ("cli.authority", "jobs_app"),
    "vault": ("cli.vault", "vault_app"),
    "istio": ("cli.istio", "istio_app"),
    "audit": ("cli.audit", "audit_app"),
    "federation": ("cli.federation", "federation_app"),
    "gateway": ("cli.gateway", "gateway_app"),
    "openvpn": ("cli.openvpn", "openvpn_app"),
}
_SETTINGS: dict[str, Any] = {
    "pretty_exceptions_enable": False,
    "add_completion": False,
    "rich_markup_mode": None,
}


class _LazyCommands(MutableMapping[str, Any]):
    """The root's sub-commands, each built when first looked up: a command imports only its own
    ``cli`` module (and what that needs), not every group's (~0.1 to 0.4 s of CPU on each start);
    ``--help`` looks them all up. The names are known without importing, for click's
    "No such command ... Did you mean" and for completion."""

    def __init__(self) -> None:
        self._built: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._built:
            module, attribute = COMMANDS[name]
            target = getattr(importlib.import_module(module), attribute)
            holder = typer.Typer(**_SETTINGS)  # built as app.add_typer / app.command would
            if isinstance(target, typer.Typer):
                holder.add_typer(target, name=name)
            else:
                holder.command(name=name)(target)
            self._built[name] = typer.main.get_group(holder).commands[name]
        return self._built[name]

    def __setitem__(self, name: str, command: Any) -> None:
        raise TypeError("trellis sub-commands are listed in cli.main.COMMANDS")

    def __delitem__(self, name: str) -> None:
        raise TypeError("trellis sub-commands are listed in cli.main.COMMANDS")

    def __contains__(self, name: object) -> bool:
        return name in COMMANDS

    def __iter__(self) -> Iterator[str]:
        return iter(COMMANDS)

    def __len__(self) -> int:
        return len(COMMANDS)


class _LazyGroup(TyperGroup):
    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.commands = _LazyCommands()


app = typer.Typer(
    cls=_LazyGroup,
    help="Trellis: mTLS certificate authority and SPIFFE workload identity.",
    no_args_is_help=True,
    **_SETTINGS,
)


@app.callback()
def root(
    # A string, not a Path: Path("") is ".", and an empty --data-dir is refused (ca.config).
    data_dir: Annotated[
        str | None, typer.Option(help="Data directory (TRELLIS_DATA_DIR, default ./var)")
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(help="Database URL (TRELLIS_DATABASE_URL, default SQLite in the data dir)"),
    ] = None,
) -> None:
    imports_done()  # click calls this once the sub-command is resolved (its module imported)
    STATE.data_dir = data_dir
    STATE.database_url = database_url


def _one_line(message: str) -> str:
    """A message from below (libpq's spans lines, tab-indented) as the one line promised."""
    return " ".join(message.split())


def main(argv: list[str] | None = None) -> None:
    """Domain failures leave as one line on stderr and a documented exit code (docs/cli.md);
    usage errors keep click's usual message and exit 2."""
    try:
        app(args=argv, prog_name="trellis")
    except TrellisError as error:
        typer.echo(f"trellis: {_one_line(error.detail)}", err=True)
        sys.exit(exit_code(error))
    except OSError as error:  # a file the command reads or writes (an --out checked earlier)
        where = f"{error.filename}: " if error.filename else ""
        typer.echo(f"trellis: {_one_line(f'{where}{error.strerror or error}')}", err=True)
        sys.exit(EXIT_CODES[Unavailable])
    except sa.exc.DatabaseError as error:  # not a database, or a damaged one
        typer.echo(f"trellis: the database cannot be used: {_one_line(str(error.orig))}", err=True)
        sys.exit(EXIT_CODES[Unavailable])
    finally:
        finished()  # a Ctrl-C while the database closes changes nothing: ignored
        STATE.close()
