"""``trellis gateway``: client certificates for API partners behind nginx, AWS API Gateway or
Kong (docs/gateway.md). ``--json`` renders the REST models of ``api.schemas.gateway``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from api.schemas.gateway import (
    ConsumerOut,
    GatewayCertOut,
    GatewayInit,
    GatewayOut,
    GatewayRevokedOut,
    init_params,
)
from ca import gateway
from ca.certs import withdrawn_unless_delivered
from ca.durations import Ttl
from ca.errors import InvalidInput
from ca.files import check_writable, write_atomic, write_private
from ca.keys import KeyType
from ca.revocation import RevocationReason
from ca.serial import Serial
from cli.common import (
    STATE,
    emit_json,
    more,
    out_file,
    read_input,
    table,
    warn_crl_skipped,
    when,
)

gateway_app = typer.Typer(
    help="API-gateway client certificates: partners, truststores, nginx.", no_args_is_help=True
)
consumer_app = typer.Typer(
    help="API partners (certificate CN = consumer name).", no_args_is_help=True
)
cert_app = typer.Typer(help="Partner client certificates.", no_args_is_help=True)
gateway_app.add_typer(consumer_app, name="consumer")
gateway_app.add_typer(cert_app, name="cert")
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output")]
SerialArg = Annotated[str, typer.Argument(help="Serial (hex) of the certificate")]


@gateway_app.command("init")
def init(
    key_type: Annotated[str | None, typer.Option(help="Intermediate key (default ec-p256)")] = None,
    root_key_type: Annotated[str | None, typer.Option(help="Root key (default ec-p384)")] = None,
    key_backend: Annotated[str | None, typer.Option(help="file or vault")] = None,
    ca_ttl: Annotated[str, typer.Option(help="Intermediate lifetime")] = "3y",
    default_ttl: Annotated[str, typer.Option(help="Default certificate lifetime")] = "90d",
    max_ttl: Annotated[str, typer.Option(help="Longest certificate lifetime")] = "398d",
    json_out: JsonOpt = False,
) -> None:
    """Create the gateway authority (its own root and intermediate, unrelated to the mesh)."""
    body = GatewayInit(
        key_type=key_type,
        root_key_type=root_key_type,
        key_backend=key_backend,
        ca_ttl=ca_ttl,
        default_ttl=default_ttl,
        max_ttl=max_ttl,
    )
    params = init_params(body)
    # Before anything is set up; --key-backend overrides TRELLIS_KEY_BACKEND.
    STATE.settings(key_backend=key_backend).check_new_key_backend(key_backend)
    with STATE.setting_up(key_backend=key_backend) as ctx:
        out = GatewayOut.of(gateway.init_gateway(ctx, params))
    if json_out:
        emit_json(out)
        return
    typer.echo("Initialised the gateway authority")
    typer.echo(
        f"  root          SHA-256 {out.root_fingerprint_sha256}, expires {when(out.root_not_after)}"
    )
    typer.echo(
        f"  intermediate  {out.intermediate_serial}, expires {when(out.intermediate_not_after)}"
    )
    typer.echo(f"  certificates  {out.default_ttl} by default, at most {out.max_ttl}")
    typer.echo("  next: trellis gateway truststore --format nginx|aws|kong|pem --out PATH")


@consumer_app.command("add")
def consumer_add(
    name: Annotated[str, typer.Argument(help="[a-z0-9][a-z0-9._-]{0,63}: the certificate CN")],
    contact: Annotated[str, typer.Option(help="Who to call about this partner")] = "",
    json_out: JsonOpt = False,
) -> None:
    """Register an API partner."""
    consumer = gateway.add_consumer(
        STATE.context(), gateway.ConsumerName(name), contact, actor="cli"
    )
    if json_out:
        emit_json(ConsumerOut.of(consumer))
    else:
        typer.echo(f"added gateway consumer {consumer.name}")


@consumer_app.command("list")
def consumer_list(json_out: JsonOpt = False) -> None:
    """API-gateway consumers."""
    consumers = [ConsumerOut.of(c) for c in gateway.list_consumers(STATE.context())]
    if json_out:
        emit_json(consumers)
        return
    table(
        ["NAME", "ENABLED", "LIVE CERTS", "CONTACT", "CREATED"],
        [
            [
                c.name,
                "yes" if c.enabled else "no",
                str(c.live_certificates),
                c.contact or "-",
                when(c.created_at),
            ]
            for c in consumers
        ],
    )


@consumer_app.command("disable")
def consumer_disable(
    name: Annotated[str, typer.Argument(help="Consumer name")], json_out: JsonOpt = False
) -> None:
    """No new certificates; live ones stay valid until revoked (trellis gateway cert revoke)."""
    consumer = ConsumerOut.of(
        gateway.disable_consumer(STATE.context(), gateway.ConsumerName(name), actor="cli")
    )
    if json_out:
        emit_json(consumer)
        return
    typer.echo(f"disabled gateway consumer {consumer.name}")
    if consumer.live_certificates:
        typer.echo(
            f"  it still holds {consumer.live_certificates} valid certificate(s): "
            f"trellis gateway cert list --consumer {consumer.name} --live, then revoke them"
        )


@cert_app.command("issue")
def cert_issue(
    name: Annotated[str, typer.Argument(help="Consumer name")],
    csr: Annotated[Path | None, typer.Option(help="The partner's PEM CSR (preferred)")] = None,
    out: Annotated[
        Path | None, typer.Option(help="With --csr: where to write the PEM", callback=out_file)
    ] = None,
    p12: Annotated[
        Path | None,
        typer.Option(
            "--p12", help="Generate the key here; write PKCS#12 (0600)", callback=out_file
        ),
    ] = None,
    p12_password_file: Annotated[
        Path | None, typer.Option(help="File holding the PKCS#12 password (>= 8 characters)")
    ] = None,
    legacy_p12: Annotated[
        bool, typer.Option("--legacy-p12", help="3DES/SHA-1 PKCS#12 for old Java/Windows stores")
    ] = False,
    key_type: Annotated[
        str | None, typer.Option(help="Generated key: ec-p256, or rsa-2048 with --legacy-p12")
    ] = None,
    ttl: Annotated[str | None, typer.Option(help="Lifetime (default 90d)")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Issue a clientAuth certificate with CN = NAME, from a CSR or as a PKCS#12 bundle."""
    if csr is not None:
        if out is None or p12 is not None or p12_password_file is not None or legacy_p12:
            raise InvalidInput("--csr needs --out and no --p12 options")
    elif p12 is None or p12_password_file is None or out is not None:
        raise InvalidInput("give --csr FILE --out CERT.pem, or --p12 OUT --p12-password-file F")
    ctx = STATE.context()
    request = gateway.CertRequest(
        consumer=gateway.ConsumerName(name),
        requested_by="cli",
        csr_pem=read_input("--csr", csr) if csr is not None else None,
        pkcs12_password=(
            gateway.password_file(read_input("--p12-password-file", p12_password_file))
            if p12_password_file is not None
            else None
        ),
        legacy_pkcs12=legacy_p12,
        key_type=KeyType.parse(key_type) if key_type else None,
        ttl=Ttl.parse(ttl) if ttl else None,
    )
    issued = gateway.issue_certificate(ctx, request)
    with withdrawn_unless_delivered(ctx, issued.serial, gateway.WITHDRAWN_BY):
        if issued.pkcs12 is not None and p12 is not None:
            write_private(p12, issued.pkcs12)
            written = p12
        else:
            assert out is not None
            write_atomic(out, issued.certificate_pem + issued.chain_pem)
            written = out
    result = GatewayCertOut.issued(issued, with_pkcs12=False)
    if json_out:
        emit_json(result)
        return
    typer.echo(f"issued {result.serial} to {result.consumer}, expires {when(result.not_after)}")
    typer.echo(
        f"  wrote {written}" + (" (0600, key included: Trellis keeps no copy)" if p12 else "")
    )
    typer.echo(f"  x5t#S256 {result.x5t_s256}")
    if result.clamped:
        typer.echo("  note: shorter than requested, the issuing intermediate expires first")


def _show(cert: GatewayCertOut) -> None:
    for label, value in [
        ("serial", cert.serial),
        ("consumer", cert.consumer),
        ("status", cert.status),
        ("delivery", cert.delivery or "-"),
        ("not_before", when(cert.not_before)),
        ("not_after", when(cert.not_after)),
        ("sha256", cert.fingerprint_sha256),
        ("x5t#S256", cert.x5t_s256),
        ("requested_by", cert.requested_by),
        ("revoked_at", when(cert.revoked_at)),
        ("reason", cert.revocation_reason or "-"),
    ]:
        typer.echo(f"{label:<13} {value}")


@cert_app.command("show")
def cert_show(serial: SerialArg, json_out: JsonOpt = False) -> None:
    """One gateway certificate, with its RFC 8705 x5t#S256 thumbprint."""
    cert = GatewayCertOut.of(gateway.show_certificate(STATE.context(), Serial.parse(serial)))
    if json_out:
        emit_json(cert)
        return
    _show(cert)
    typer.echo(cert.certificate.rstrip())


@cert_app.command("list")
def cert_list(
    consumer: Annotated[str | None, typer.Option(help="Only this consumer's")] = None,
    live: Annotated[bool, typer.Option("--live", help="Only active, unexpired ones")] = False,
    limit: Annotated[int, typer.Option(help="At most this many rows")] = 100,
    after: Annotated[str | None, typer.Option(help="Serial to continue after")] = None,
    json_out: JsonOpt = False,
) -> None:
    """API-gateway client certificates, one page, newest first."""
    found = gateway.gateway_certificate_page(
        STATE.context(),
        gateway.ConsumerName(consumer) if consumer else None,
        live_only=live,
        limit=limit,
        after=Serial.parse(after) if after else None,
    )
    certs = [GatewayCertOut.of(c) for c in found.items]
    if json_out:  # an array, as docs/cli.md promises: the cursor goes to stderr as below
        emit_json(certs)
    else:
        table(
            ["SERIAL", "CONSUMER", "STATUS", "NOT AFTER", "X5T#S256"],
            [[c.serial, c.consumer, c.status, when(c.not_after), c.x5t_s256] for c in certs],
        )
    given = {"--consumer": consumer, "--live": live}
    more(
        "trellis gateway cert list",
        given,
        limit=limit,
        json_out=json_out,
        next_after=found.next_after,
    )


@cert_app.command("revoke")
def cert_revoke(
    serial: SerialArg,
    reason: Annotated[
        str, typer.Option(help="RFC 5280 reason, e.g. keyCompromise")
    ] = "unspecified",
    json_out: JsonOpt = False,
) -> None:
    """Revoke; the gateway CRL is re-signed at once and recorded nginx truststores rewritten."""
    cert, written = gateway.revoke_gateway_certificate(
        STATE.context(),
        Serial.parse(serial),
        RevocationReason.parse(reason),
        "cli",
    )
    out = GatewayRevokedOut.revoked(cert, written)
    if json_out:
        emit_json(out)
        return
    typer.echo(f"revoked {out.serial} ({out.consumer}) reason {out.revocation_reason}")
    for path in written:
        typer.echo(f"  rewrote {path}")
    typer.echo("  reload each nginx using it (nginx -s reload): it reads ssl_crl only then")
    warn_crl_skipped([cert.info])


truststore_app = typer.Typer(
    help="Write what a gateway trusts; the path is recorded so revocations rewrite nginx CRLs.",
    invoke_without_command=True,
)
gateway_app.add_typer(truststore_app, name="truststore")


@truststore_app.callback()
def truststore(
    context: typer.Context,
    format: Annotated[str | None, typer.Option("--format", help="pem, nginx, aws or kong")] = None,
    out: Annotated[
        Path | None, typer.Option(help="File (pem, aws) or directory (nginx, kong)")
    ] = None,
    refresh: Annotated[
        bool,
        typer.Option(
            help="Rewrite every truststore recorded on this node (TRELLIS_NODE_NAME); from cron"
        ),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Write what a gateway trusts; the path is recorded so revocations rewrite nginx CRLs."""
    if context.invoked_subcommand is not None:
        if format is not None or out is not None or refresh or json_out:
            raise InvalidInput(f"give the options after '{context.invoked_subcommand}'")
        return
    ctx = STATE.context()
    if refresh:
        if format is not None or out is not None:
            raise InvalidInput("--refresh takes no --format or --out")
        written = gateway.refresh_truststores(ctx)
    elif format is None or out is None:
        raise InvalidInput("give --format and --out (or --refresh)")
    else:
        kind = gateway.TruststoreFormat.parse(format)
        # as an --out callback would, had the format not decided between a file and a directory
        check_writable(out, directory=kind.is_directory, what=f"--out {out}", own=STATE.own_data())
        written = gateway.write_truststore(ctx, kind, out)
    if json_out:  # docs/gateway.md: {"rewritten"} as a revocation reports it, or the write's
        files = [str(path) for path in written]
        emit_json({"rewritten": files} if refresh else {"format": kind.value, "written": files})
        return
    for path in written:
        typer.echo(f"wrote {path}")
    if not written:
        typer.echo("unchanged")


@truststore_app.command("remove")
def truststore_remove(
    out: Annotated[Path, typer.Option(help="The path the truststore was written to")],
    json_out: JsonOpt = False,
) -> None:
    """Stop keeping a truststore on this node (a stale destination): its files are left as they
    are, no longer rewritten by revocations or refreshes."""
    removed = gateway.remove_truststore(STATE.context(), out, actor="cli")
    if json_out:
        emit_json({"node": removed.node, "path": str(removed.path), "format": removed.format.value})
        return
    typer.echo(
        f"forgot the {removed.format.value} truststore at {removed.path} on node {removed.node}"
    )
    typer.echo("  its files are left in place: delete them once no gateway reads them")


@gateway_app.command("nginx-snippet")
def nginx_snippet(
    upstream: Annotated[str, typer.Option(help="Where nginx proxies to")] = "http://127.0.0.1:8080",
    truststore: Annotated[
        Path, typer.Option(help="Directory written by 'truststore --format nginx'")
    ] = Path("/etc/nginx/trellis-gateway"),
    server_name: Annotated[str, typer.Option(help="nginx server_name")] = "_",
    listen: Annotated[str, typer.Option(help="[address:]port")] = "443",
    ssl_certificate: Annotated[
        Path, typer.Option(help="The gateway's own server certificate")
    ] = Path("/etc/nginx/tls/server.crt"),
    ssl_certificate_key: Annotated[Path, typer.Option(help="Its key")] = Path(
        "/etc/nginx/tls/server.key"
    ),
) -> None:
    """Print an nginx server block that requires a gateway client certificate."""
    params = gateway.NginxSnippet(
        upstream=upstream,
        truststore=truststore,
        server_name=server_name,
        listen=listen,
        ssl_certificate=ssl_certificate,
        ssl_certificate_key=ssl_certificate_key,
    )
    typer.echo(gateway.nginx_snippet(params), nl=False)
