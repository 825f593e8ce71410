"""``trellis vault``: is Vault / OpenBao ready to hold this instance's CA keys?"""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

import typer

from ca.cas import CertifiedKey, signing_keys
from ca.errors import InvalidInput, NotInitialised, Unavailable
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
    """Connectivity, login, the transit and KV v2 mounts, every capability Trellis needs and
    none it must not have, and every key this instance signs with (its CAs' and their OCSP
    responders': each there, the key of its certificate, not exportable, not deletable); prints
    what is wrong and the policy that grants what is needed (exit 8 unless all is well)."""
    settings = STATE.settings()
    if not settings.vault_addr:
        raise InvalidInput("TRELLIS_VAULT_ADDR is not set: there is no Vault to check")
    backend = VaultKeyBackend.from_settings(settings)
    keys: list[CertifiedKey] = []
    with contextlib.suppress(NotInitialised):  # before the first init: no CA keys yet
        keys = signing_keys(STATE.context(), backend.name)
    try:
        report = backend.diagnose(keys)
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
