"""``trellis backup``, ``trellis restore`` and ``trellis migrate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ca.backup import backup as run_backup
from ca.backup import check_backup
from ca.backup import restore as run_restore
from ca.store.db import SchemaPolicy
from ca.store.db import migrate as run_migrate
from cli.common import STATE, emit_json, out_file, require_database
from cli.progress import shown

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output")]


def backup(
    out: Annotated[Path, typer.Option(help="Archive to write (0600)", callback=out_file)],
    json_out: JsonOpt = False,
) -> None:
    """Consistent snapshot of the database and the (still encrypted) CA keys: SQLite installs."""
    check_backup(STATE.settings())
    # An older schema is backed up as it is: the backup before an upgrade is the way back.
    ctx = STATE.context(schema=SchemaPolicy.AS_IS)
    with shown("backing up", json_out=json_out, bytes_=True) as progress:
        result = run_backup(ctx, out, actor="cli", progress=progress)
    if json_out:
        emit_json(
            {
                "path": str(result.path),
                "schema": result.schema,
                "files": list(result.files),
                "needs_key_passphrase": result.needs_key_passphrase,
            }
        )
        return
    typer.echo(f"wrote {result.path}: {len(result.files)} file(s), schema {result.schema}")
    if result.needs_key_passphrase:  # an instance with all its keys in Vault has none to keep
        typer.echo("the key passphrase is NOT in the backup: keep it somewhere else")


ONLY_ONE = (
    "only one of this instance and the one the backup was taken of may run: stop that one for"
    " good first (docs/operations.md, 'Backup and restore')"
)
_ACTS_ON = (  # the order of ActsOn's fields
    "Vault key",
    "OpenVPN CRL file",
    "OpenVPN server dir",
    "gateway truststore",
    "Istio output",
)


def restore(
    archive: Annotated[Path, typer.Argument(help="A file written by 'trellis backup'")],
    json_out: JsonOpt = False,
) -> None:
    """Restore into an empty data dir; start with the original key passphrase afterwards, where
    file keys or sealed secrets need one."""
    settings = STATE.settings()
    STATE.begin_request()  # the id its record in the restored trail has
    with shown("restoring", json_out=json_out, bytes_=True) as progress:
        result = run_restore(archive, settings, actor="cli", progress=progress)
    if json_out:
        emit_json(
            {
                "path": str(result.path),
                "schema": result.schema,
                "files": list(result.files),
                "needs_key_passphrase": result.needs_key_passphrase,
                "acts_on": result.acts_on.as_dict(),
                "warning": ONLY_ONE,
            }
        )
        return
    typer.echo(f"restored {len(result.files)} file(s) (schema {result.schema}) from {result.path}")
    if result.acts_on:
        typer.echo("it acts on what the instance the backup was taken of acts on:")
        for label, values in zip(_ACTS_ON, result.acts_on.as_dict().values(), strict=True):
            for value in values:
                typer.echo(f"  {label:<20} {value}")
    typer.echo(f"warning: {ONLY_ONE}")
    if result.needs_key_passphrase:
        typer.echo(
            "set TRELLIS_KEY_PASSPHRASE (or restore the key-passphrase file), then 'trellis serve'"
        )
    else:  # all keys in Vault: a passphrase would decrypt nothing
        typer.echo(
            "no key file or sealed secret restored: no key passphrase needed; 'trellis serve'"
        )


def migrate(json_out: JsonOpt = False) -> None:
    """Bring the database schema to this Trellis's revision (take a backup first)."""
    settings = STATE.settings()
    require_database(settings)  # not the data dir: a PostgreSQL replica's is its own scratch
    with shown("migrating", json_out=json_out) as progress:
        migration = run_migrate(settings.effective_database_url, progress=progress)
    if json_out:
        emit_json({"from": migration.before, "to": migration.after, "migrated": migration.changed})
        return
    if not migration.changed:
        typer.echo(f"the database schema is already at {migration.after}: nothing to do")
    elif migration.before is None:
        typer.echo(f"created the database schema at {migration.after}")
    else:
        typer.echo(f"migrated the database schema from {migration.before} to {migration.after}")
