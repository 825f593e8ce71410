"""``trellis openvpn``: the VPN's own CA, server files, and one-command client on/offboarding."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from api.schemas.openvpn import ClientOut, ClientRevokedOut, OpenVpnOut, ProfileOut, ServerCertOut
from ca import openvpn
from ca.certs import withdrawn_unless_delivered
from ca.durations import Ttl
from ca.errors import InvalidInput, Unavailable
from ca.files import write_private
from ca.keepers import SERVER_FILES
from ca.keys import KeyType
from ca.revocation import RevocationReason
from cli.common import STATE, confirm, emit_json, out_dir, out_file, table, warn_crl_skipped, when

openvpn_app = typer.Typer(
    help="OpenVPN: an own CA, server files and complete client profiles.", no_args_is_help=True
)
client_app = typer.Typer(help="Client profiles: add, list, renew, revoke.", no_args_is_help=True)
openvpn_app.add_typer(client_app, name="client")

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output")]
AuthorityOpt = Annotated[str, typer.Option("--authority", help="The OpenVPN authority's name")]
CnOpt = Annotated[str | None, typer.Option(help="Server CN (default: configured, or remote)")]
KeyTypeOpt = Annotated[str, typer.Option(help="ec-p256, ec-p384, ed25519, rsa-2048/3072/4096")]


@openvpn_app.command("init")
def init(
    authority: Annotated[
        str | None, typer.Option("--authority", help="The new authority's name (vpn)")
    ] = None,
    # What --authority was called before every other openvpn command's name for it was taken.
    name: Annotated[str | None, typer.Option("--name", hidden=True)] = None,
    key_type: Annotated[str | None, typer.Option(help="Intermediate key type (ec-p256)")] = None,
    root_key_type: Annotated[str | None, typer.Option(help="Root key type")] = None,
    key_backend: Annotated[str | None, typer.Option(help="file or vault")] = None,
    ca_ttl: Annotated[str, typer.Option(help="Intermediate lifetime (rotated)")] = "1y",
    force: Annotated[bool, typer.Option(help="Replace it: destroys its keys and clients")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Create the VPN root and intermediate (no SAN) and the tls-crypt-v2 server key."""
    if None not in (authority, name) and authority != name:
        raise InvalidInput("--name is the old spelling of --authority: give one of them")
    params = openvpn.InitParams(
        name=authority or name or openvpn.OPENVPN,
        key_type=KeyType.parse(key_type or "ec-p256"),
        root_key_type=KeyType.parse(root_key_type or key_type or "ec-p384"),
        key_backend=key_backend,
        ca_ttl=Ttl.parse(ca_ttl),
        force=force,
        given_at=STATE.given_at(),
    )
    # Before anything is set up; --key-backend overrides TRELLIS_KEY_BACKEND.
    STATE.settings(key_backend=key_backend).check_new_key_backend(key_backend)
    with STATE.setting_up(key_backend=key_backend) as ctx:
        config = openvpn.init_openvpn(ctx, params)
    if json_out:
        emit_json(OpenVpnOut.of(config))
        return
    typer.echo(f"Initialised OpenVPN authority {config.authority}")
    typer.echo(f"  tls-crypt keys held in: {config.secret_store}")
    typer.echo(f"  next: trellis openvpn configure --remote HOST --authority {config.authority}")


@openvpn_app.command("configure")
def configure(
    remote: Annotated[str | None, typer.Option(help="Host name clients connect to")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 1194)")] = None,
    proto: Annotated[str | None, typer.Option(help="udp or tcp")] = None,
    crl_path: Annotated[
        Path | None, typer.Option(help="CRL file OpenVPN reads (crl-verify), kept current")
    ] = None,
    server_cn: Annotated[str | None, typer.Option(help="Server CN clients verify")] = None,
    authority: AuthorityOpt = openvpn.OPENVPN,
    json_out: JsonOpt = False,
) -> None:
    """Set where clients connect and where the CRL file lives (written at once)."""
    params = openvpn.ConfigureParams(
        remote=remote,
        port=port,
        proto=openvpn.Proto.parse(proto) if proto else None,
        crl_path=crl_path.absolute() if crl_path else None,  # relative to the shell's directory
        server_cn=openvpn.VpnName(server_cn) if server_cn is not None else None,
    )
    config = openvpn.configure(STATE.context(), params, authority)
    if json_out:
        emit_json(OpenVpnOut.of(config))
        return
    typer.echo(f"remote {config.remote or '-'} {config.port} {config.proto.value}")
    typer.echo(f"server CN {config.server_cn or '-'}, CRL file {config.crl_path or '-'}")


def _server_request(
    authority: str, cn: str | None, key_type: str, ttl: str
) -> openvpn.ServerRequest:
    return openvpn.ServerRequest(
        authority=authority,
        common_name=openvpn.VpnName(cn) if cn is not None else None,  # '' is refused
        key_type=KeyType.parse(key_type),
        ttl=Ttl.parse(ttl),
        requested_by="cli",
    )


@openvpn_app.command("server-cert")
def server_cert(
    out: Annotated[
        Path, typer.Option(help="Directory for server.crt and server.key", callback=out_dir)
    ],
    cn: CnOpt = None,
    key_type: KeyTypeOpt = "ec-p256",
    ttl: Annotated[str, typer.Option(help="Lifetime (capped by the intermediate)")] = "1y",
    authority: AuthorityOpt = openvpn.OPENVPN,
    json_out: JsonOpt = False,
) -> None:
    """Issue a server certificate (serverAuth only): DIR/server.crt (leaf+chain), server.key."""
    request = _server_request(authority, cn, key_type, ttl)
    ctx = STATE.context()
    openvpn.check_out_dir(ctx, authority, out, SERVER_FILES)
    credentials = openvpn.issue_server_cert(ctx, request)
    written = openvpn.deliver_server_cert(ctx, credentials, out)
    if json_out:
        out_model = ServerCertOut.of(credentials)
        fields = out_model.model_dump(mode="json", exclude={"key", "certificate"})
        emit_json({**fields, "written": [str(path) for path in written]})
        return
    typer.echo(f"issued server certificate CN={credentials.common_name} {credentials.serial}")
    typer.echo(f"  expires {when(credentials.not_after)}; wrote {', '.join(map(str, written))}")


@openvpn_app.command("server-config")
def server_config(
    out: Annotated[
        Path, typer.Option(help="Directory for server.conf and its files", callback=out_dir)
    ],
    cn: CnOpt = None,
    network: Annotated[str, typer.Option(help="Client address pool")] = "10.8.0.0/24",
    key_type: KeyTypeOpt = "ec-p256",
    ttl: Annotated[str, typer.Option(help="Server certificate lifetime")] = "1y",
    authority: AuthorityOpt = openvpn.OPENVPN,
    json_out: JsonOpt = False,
) -> None:
    """Write server.conf, ca.pem, server.crt, server.key, tls-crypt-v2.key, tls-crypt.key and
    crl.pem (which becomes the CRL file Trellis keeps current, unless one is configured)."""
    pool = openvpn.client_pool(network)
    ctx = STATE.context()
    files = openvpn.server_config(
        ctx, _server_request(authority, cn, key_type, ttl), pool, out_dir=out
    )
    written = [out / name for name in files]
    config = openvpn.get_config(ctx, authority)
    if json_out:
        emit_json(
            {
                "directory": str(out),
                "files": [path.name for path in written],
                "private": sorted(openvpn.PRIVATE_FILES),
                "crl_path": str(config.crl_path) if config.crl_path else None,
            }
        )
        return
    typer.echo(f"wrote {', '.join(path.name for path in written)} to {out}")
    typer.echo(f"  CRL file kept current by Trellis: {config.crl_path}")
    typer.echo(f"  run: openvpn --cd {out} --config server.conf")


@openvpn_app.command("crl")
def crl(
    out: Annotated[
        Path | None, typer.Option(help="Write here instead of the CRL file", callback=out_file)
    ] = None,
    authority: AuthorityOpt = openvpn.OPENVPN,
    json_out: JsonOpt = False,
) -> None:
    """Rewrite the CRL file now (CRLs re-signed if due) and check it: for cron, where no
    'trellis serve' runs the openvpn-crl job. Exit 8 if crl_health finds a problem."""
    ctx = STATE.context()
    if out is not None:
        path: Path | None = openvpn.write_crl_to(ctx, out, authority)
    else:
        path = openvpn.write_crl_file(ctx, authority)
        if path is None:
            raise InvalidInput("no CRL file configured: pass --out or run configure --crl-path")
    problem = openvpn.crl_health(ctx)
    if json_out:
        emit_json({"path": str(path), "health": problem.detail if problem else "ok"})
    else:
        typer.echo(f"CRLs written to {path}")
    if problem:
        raise problem


def _write_profile(profile: openvpn.ClientProfile, out: Path, json_out: bool, verb: str) -> None:
    with withdrawn_unless_delivered(STATE.context(), profile.serial, openvpn.WITHDRAWN_BY):
        write_private(out, profile.ovpn)  # the profile's key exists nowhere else
    if json_out:
        emit_json(ProfileOut.of(profile, out))
        return
    typer.echo(f"{verb} {profile.name}: serial {profile.serial}, expires {when(profile.not_after)}")
    typer.echo(f"  wrote {out} (0600, {profile.tls_crypt.value} tls-crypt): send it privately")


@client_app.command("add")
def client_add(
    name: Annotated[str, typer.Argument(help="The user; becomes the certificate CN")],
    out: Annotated[Path, typer.Option(help="The .ovpn file to write (0600)", callback=out_file)],
    ttl: Annotated[str, typer.Option(help="Certificate lifetime")] = "30d",
    tls_crypt: Annotated[
        str, typer.Option("--tls-crypt", help="v2 (a key per client) or shared")
    ] = "v2",
    key_type: KeyTypeOpt = "ec-p256",
    authority: AuthorityOpt = openvpn.OPENVPN,
    json_out: JsonOpt = False,
) -> None:
    """Onboard a user in one command: a complete inline .ovpn profile."""
    request = openvpn.ClientRequest(
        name=openvpn.VpnName(name),
        authority=authority,
        ttl=Ttl.parse(ttl),
        tls_crypt=openvpn.TlsCrypt.parse(tls_crypt),
        key_type=KeyType.parse(key_type),
    )
    _write_profile(openvpn.add_client(STATE.context(), request), out, json_out, "added")


@client_app.command("list")
def client_list(authority: AuthorityOpt = openvpn.OPENVPN, json_out: JsonOpt = False) -> None:
    """Every client, with its current certificate's status."""
    clients = openvpn.list_clients(STATE.context(), authority)
    if json_out:
        emit_json([ClientOut.of(info) for info in clients])
        return
    table(
        ["NAME", "STATUS", "SERIAL", "NOT AFTER", "TLS-CRYPT"],
        [
            [c.name, c.status, (c.serial or "-")[:16], when(c.not_after), c.tls_crypt.value]
            for c in clients
        ],
    )


@client_app.command("renew")
def client_renew(
    name: Annotated[str, typer.Argument(help="The user")],
    out: Annotated[Path, typer.Option(help="The new .ovpn file (0600)", callback=out_file)],
    ttl: Annotated[str, typer.Option(help="Certificate lifetime")] = "30d",
    tls_crypt: Annotated[
        str | None, typer.Option("--tls-crypt", help="v2 or shared (default: as before)")
    ] = None,
    key_type: KeyTypeOpt = "ec-p256",
    authority: AuthorityOpt = openvpn.OPENVPN,
    json_out: JsonOpt = False,
) -> None:
    """Issue a fresh profile; the previous certificate is revoked (superseded)."""
    request = openvpn.ClientRequest(
        name=openvpn.VpnName(name),
        authority=authority,
        ttl=Ttl.parse(ttl),
        tls_crypt=openvpn.TlsCrypt.parse(tls_crypt) if tls_crypt else None,
        key_type=KeyType.parse(key_type),
    )
    _write_profile(openvpn.renew_client(STATE.context(), request), out, json_out, "renewed")


@client_app.command("revoke")
def client_revoke(
    name: Annotated[str, typer.Argument(help="The user")],
    reason: Annotated[str, typer.Option(help="RFC 5280 reason")] = "cessationOfOperation",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
    authority: AuthorityOpt = openvpn.OPENVPN,
    json_out: JsonOpt = False,
) -> None:
    """Offboard a user: revoke every live certificate and rewrite the CRL file now."""
    vpn_name = openvpn.VpnName(name)
    parsed = RevocationReason.parse(reason)
    if not yes:
        confirm(f"Revoke every live certificate of {name}?")
    revoked = openvpn.revoke_client(STATE.context(), vpn_name, authority=authority, reason=parsed)
    if json_out:
        emit_json(ClientRevokedOut.of(revoked))
    else:
        for info in revoked.revoked:
            typer.echo(f"revoked {info.serial} ({parsed.value})")
        warn_crl_skipped(revoked.revoked)
    if revoked.crl_error:
        # Revoked, but OpenVPN still reads the old file: that must not look like success.
        raise Unavailable(f"revoked, but the CRL file was not rewritten: {revoked.crl_error}")
    if json_out:
        return
    if revoked.crl_path:
        typer.echo(f"  CRL file {revoked.crl_path} rewritten: OpenVPN refuses {name} from now on")
    else:
        typer.echo("  no CRL file configured: run 'trellis openvpn configure --crl-path FILE'")
