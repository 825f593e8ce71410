"""``trellis crl`` and ``trellis authority``: what relying parties consume, and emergencies."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from cryptography import x509

from api.schemas import IntermediateRevokedOut
from ca.authority import MESH
from ca.crl import current_crl
from ca.emergency import revoke_intermediate
from ca.files import write_atomic
from ca.revocation import RevocationReason
from cli.common import STATE, emit_json, table, when

crl_app = typer.Typer(help="Certificate revocation lists.", no_args_is_help=True)
authority_app = typer.Typer(help="The CA hierarchy.", no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output")]
AuthorityOpt = Annotated[str, typer.Option("--authority", help="Authority name")]
CaOpt = Annotated[str, typer.Option("--ca", help="root, intermediate, or a CA serial")]


@crl_app.command("show")
def crl_show(
    authority: AuthorityOpt = MESH, ca: CaOpt = "intermediate", json_out: JsonOpt = False
) -> None:
    """Summarise a CA's current CRL (re-signing it first if it is due)."""
    crl = current_crl(STATE.context(), authority, ca)
    parsed = x509.load_der_x509_crl(crl.der)
    entries = [
        {"serial": format(r.serial_number, "x"), "revoked_at": r.revocation_date_utc.isoformat()}
        for r in parsed
    ]
    if json_out:
        emit_json(
            {
                "authority": authority,
                "ca_serial": crl.ca_serial,
                "number": crl.number,
                "this_update": crl.this_update.isoformat(),
                "next_update": crl.next_update.isoformat(),
                "issuer": parsed.issuer.rfc4514_string(),
                "revoked": entries,
            }
        )
        return
    typer.echo(f"CRL #{crl.number} of {parsed.issuer.rfc4514_string()} (CA serial {crl.ca_serial})")
    typer.echo(f"  this update {when(crl.this_update)}, next update {when(crl.next_update)}")
    typer.echo(f"  {len(entries)} revoked certificate(s)")
    if entries:
        table(["SERIAL", "REVOKED AT"], [[e["serial"], e["revoked_at"]] for e in entries])


@crl_app.command("fetch")
def crl_fetch(
    out: Annotated[Path, typer.Option(help="File to write")],
    authority: AuthorityOpt = MESH,
    ca: CaOpt = "intermediate",
    pem: Annotated[bool, typer.Option("--pem", help="PEM instead of DER")] = False,
) -> None:
    """Write a CA's current CRL to a file (atomically: safe for crl-verify / ssl_crl)."""
    crl = current_crl(STATE.context(), authority, ca)
    write_atomic(out, crl.pem if pem else crl.der)
    typer.echo(f"wrote CRL #{crl.number} ({'PEM' if pem else 'DER'}) to {out}")


@authority_app.command("revoke-intermediate")
def authority_revoke_intermediate(
    authority: AuthorityOpt = MESH,
    reason: Annotated[str, typer.Option(help="RFC 5280 reason")] = "cACompromise",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Emergency: revoke the active intermediate and activate a fresh one at once."""
    why = RevocationReason.parse(reason)
    if not yes and not typer.confirm(
        f"Revoke the active intermediate of {authority!r} ({why.value}) and switch to a new one?"
    ):
        raise typer.Exit(1)
    result = revoke_intermediate(STATE.context(), authority=authority, reason=why)
    if json_out:
        emit_json(IntermediateRevokedOut.of(result))
        return
    typer.echo(
        f"revoked intermediate {result.revoked_serial}; now issuing from {result.new_serial}"
    )
    typer.echo(f"{len(result.to_reissue)} live certificate(s) must be re-issued:")
    if result.to_reissue:
        table(
            ["SERIAL", "SPIFFE ID", "NOT AFTER"],
            [[i.serial.hex, str(i.spiffe_id), when(i.not_after)] for i in result.to_reissue],
        )
