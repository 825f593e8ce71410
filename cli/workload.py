"""``trellis svid``: what a workload (or an admin on its behalf) runs to hold an SVID."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer
from pydantic import TypeAdapter

from ca.durations import Ttl
from ca.grants import admin_grant
from ca.identity import SpiffeId
from ca.issue import mint_svid
from ca.keys import KeyType
from ca.serverconn import ServerUrl
from ca.workload import Received, SvidFiles, WorkloadClient, join_token, write_svid
from cli.common import STATE, emit_json, svid_dir

svid_app = typer.Typer(help="Obtain, renew or mint X509-SVIDs.", no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output")]
# REST's rendering of a time (``SvidResponse.expires_at``), which request and renew pass on:
# a minted SVID's expires_at has the same shape ("...Z", not "...+00:00").
_WIRE_TIME = TypeAdapter(dt.datetime)


def _report(received: Received, json_out: bool, verb: str) -> None:
    if json_out:
        emit_json(
            {
                "spiffe_id": received.spiffe_id,
                "serial": received.serial,
                "expires_at": received.expires_at,
                "svid": str(received.files.svid),
                "key": str(received.files.key),
                "bundle": str(received.files.bundle),
            }
        )
        return
    typer.echo(
        f"{verb} {received.spiffe_id} serial {received.serial}, expires {received.expires_at}"
    )
    typer.echo(
        f"  wrote {received.files.svid}, {received.files.key} (0600), {received.files.bundle}"
    )


def _wire_time(value: dt.datetime) -> str:
    return str(_WIRE_TIME.dump_python(value, mode="json"))


@svid_app.command("request")
def request(
    server: Annotated[str, typer.Option(help="https://host:port of Trellis")],
    bundle: Annotated[Path, typer.Option(help="Trust bundle to recognise the server by")],
    token: Annotated[str, typer.Option(help="Join token", envvar="TRELLIS_JOIN_TOKEN")],
    out: Annotated[
        Path,
        typer.Option(help="Directory for svid.pem, svid.key, bundle.pem", callback=svid_dir),
    ],
    key_type: Annotated[str, typer.Option(help="Workload key type")] = "ec-p256",
    ttl: Annotated[
        str | None, typer.Option(help="Requested lifetime (capped by the entry)")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Generate a key here, send a CSR with a join token, write the SVID files."""
    token = join_token(token)
    if ttl:
        Ttl.parse(ttl)
    client = WorkloadClient(ServerUrl.parse(server), bundle)
    _report(client.request(token, out, KeyType.parse(key_type), ttl), json_out, "obtained")


@svid_app.command("renew")
def renew(
    server: Annotated[str, typer.Option(help="https://host:port of Trellis")],
    dir: Annotated[Path, typer.Option("--dir", help="Directory holding the current SVID")],
    ttl: Annotated[str | None, typer.Option(help="Requested lifetime")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Renew with a fresh key, authenticated only by the current SVID's key."""
    bundle = SvidFiles(dir).bundle
    client = WorkloadClient(ServerUrl.parse(server), bundle, bundle_name=str(bundle))
    _report(client.renew(dir, ttl), json_out, "renewed")


@svid_app.command("mint")
def mint(
    spiffe_id: Annotated[str, typer.Option(help="spiffe://<td>/<path>")],
    out: Annotated[
        Path,
        typer.Option(help="Directory for svid.pem, svid.key, bundle.pem", callback=svid_dir),
    ],
    ttl: Annotated[str | None, typer.Option(help="Lifetime (default: the CA's SVID TTL)")] = None,
    key_type: Annotated[str, typer.Option(help="Key type")] = "ec-p256",
    json_out: JsonOpt = False,
) -> None:
    """Admin: mint a key and SVID locally, no entry needed (like spire-server x509 mint)."""
    ctx = STATE.context()
    key = KeyType.parse(key_type).generate()
    grant = admin_grant(ctx, SpiffeId.parse(spiffe_id), "cli:mint")
    svid = mint_svid(ctx, grant, key, Ttl.parse(ttl) if ttl else None)
    files = SvidFiles(out)
    write_svid(files, svid.certificate_pem + svid.chain_pem, key, svid.bundle_pem)
    received = Received(str(grant.spiffe_id), svid.serial.hex, _wire_time(svid.expires_at), files)
    _report(received, json_out, "minted")
