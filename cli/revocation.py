"""``trellis crl`` and ``trellis authority``: what relying parties consume, and emergencies."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from cryptography import x509

from ca.authority import MESH
from ca.crl import current_crl
from ca.files import write_atomic
from cli.common import STATE, emit_json, iso, out_file, table, when

crl_app = typer.Typer(help="Certificate revocation lists.", no_args_is_help=True)
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
        {"serial": format(r.serial_number, "x"), "revoked_at": iso(r.revocation_date_utc)}
        for r in parsed
    ]
    if json_out:
        emit_json(
            {
                "authority": authority,
                "ca_serial": crl.ca_serial,
                "number": crl.number,
                "this_update": iso(crl.this_update),
                "next_update": iso(crl.next_update),
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
    out: Annotated[Path, typer.Option(help="File to write", callback=out_file)],
    authority: AuthorityOpt = MESH,
    ca: CaOpt = "intermediate",
    pem: Annotated[bool, typer.Option("--pem", help="PEM instead of DER")] = False,
) -> None:
    """Write a CA's current CRL to a file (atomically: safe for crl-verify / ssl_crl)."""
    crl = current_crl(STATE.context(), authority, ca)
    write_atomic(out, crl.pem if pem else crl.der)
    typer.echo(f"wrote CRL #{crl.number} ({'PEM' if pem else 'DER'}) to {out}")
