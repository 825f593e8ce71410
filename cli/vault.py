"""``trellis vault``: is Vault / OpenBao ready to hold this instance's CA keys?"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ca.errors import InvalidInput, Unavailable
from ca.keys.vault import VaultKeyBackend, VaultReport
from cli.common import STATE, emit_json

vault_app = typer.Typer(help="The Vault / OpenBao key backend.", no_args_is_help=True)


def _as_json(report: VaultReport) -> dict[str, Any]:
    return {
        "address": report.address,
        "ok": report.ok,
        "checks": [{"name": i.name, "ok": i.ok, "detail": i.detail} for i in report.items],
        "missing": [{"path": m.path, "capabilities": list(m.capabilities)} for m in report.missing],
        "policy": report.policy,
    }


@vault_app.command()
def check(
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Connectivity, login, the transit and KV v2 mounts, and every capability Trellis needs;
    prints what is missing and the policy that grants it (exit 8 unless all is well)."""
    settings = STATE.settings()
    if not settings.vault_addr:
        raise InvalidInput("TRELLIS_VAULT_ADDR is not set: there is no Vault to check")
    backend = VaultKeyBackend.from_settings(settings)
    try:
        report = backend.diagnose()
    finally:
        backend.connection.close()
    if json_out:
        emit_json(_as_json(report))
    else:
        typer.echo(f"Vault at {report.address}")
        for item in report.items:
            typer.echo(f"  {'ok' if item.ok else 'FAILED':<7} {item.name:<14} {item.detail}")
        if not report.ok:
            typer.echo("\nThe policy Trellis needs (deploy/vault/trellis-policy.hcl):\n")
            typer.echo(report.policy, nl=False)
    if not report.ok:
        failed = [i.name for i in report.items if not i.ok]
        raise Unavailable(f"Vault is not ready for Trellis: {', '.join(failed)} failed")
