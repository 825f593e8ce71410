"""``trellis federation``: trust other SPIFFE trust domains by fetching their bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from api.schemas.federation import FederationOut
from ca import federation
from ca.config import Context
from ca.errors import InvalidInput, NotFound, Unavailable
from ca.identity import SpiffeId, TrustDomain
from cli.common import STATE, emit_json, table, when

federation_app = typer.Typer(
    help="SPIFFE federation: fetch and publish other trust domains' bundles.",
    no_args_is_help=True,
)
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output")]
TrustDomainArg = Annotated[str, typer.Argument(help="The partner's trust domain")]


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None


def _show(item: federation.Federation, json_out: bool) -> None:
    if json_out:
        emit_json(FederationOut.of(item))
        return
    state = f"sequence {item.sequence}" if item.has_bundle else "no bundle yet"
    typer.echo(f"{item.trust_domain} {item.profile.value} {item.url} ({state})")
    if item.last_error:
        typer.echo(f"  last attempt failed: {item.last_error}")


@federation_app.command("add")
def add(
    trust_domain: Annotated[str, typer.Option(help="The foreign trust domain, e.g. partner.org")],
    url: Annotated[str, typer.Option(help="Its bundle endpoint, https://...")],
    profile: Annotated[str, typer.Option(help="https_web or https_spiffe")],
    endpoint_spiffe_id: Annotated[
        str | None, typer.Option(help="https_spiffe: the endpoint server's SPIFFE ID")
    ] = None,
    bootstrap_bundle: Annotated[
        Path | None, typer.Option(help="https_spiffe: the partner's bundle (PEM or JWK Set)")
    ] = None,
    ca_file: Annotated[
        Path | None,
        typer.Option(help="https_web: PEM CA to trust instead of the system store"),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Federate with a trust domain; the refresh job fetches its bundle (or run 'refresh')."""
    params = federation.FederationParams(
        trust_domain=TrustDomain.parse(trust_domain),
        url=url,
        profile=federation.Profile.parse(profile),
        endpoint_spiffe_id=SpiffeId.parse(endpoint_spiffe_id) if endpoint_spiffe_id else None,
        bootstrap_bundle=_read(bootstrap_bundle),
        web_ca=_read(ca_file),
    )
    _show(federation.add_federation(STATE.context(), params, actor="cli"), json_out)


@federation_app.command("list")
def list_federations(json_out: JsonOpt = False) -> None:
    """Federated trust domains, their last good bundle and last error."""
    items = federation.list_federations(STATE.context())
    if json_out:
        emit_json([FederationOut.of(item) for item in items])
        return
    table(
        ["TRUST DOMAIN", "PROFILE", "SEQ", "LAST SUCCESS", "NEXT", "ERROR"],
        [
            [
                str(i.trust_domain),
                i.profile.value,
                "-" if i.sequence is None else str(i.sequence),
                when(i.last_success),
                when(i.next_refresh),
                (i.last_error or "-")[:60],
            ]
            for i in items
        ],
    )


@federation_app.command("show")
def show(trust_domain: TrustDomainArg, json_out: JsonOpt = False) -> None:
    """One relationship."""
    _show(federation.get_federation(STATE.context(), TrustDomain.parse(trust_domain)), json_out)


@federation_app.command("remove")
def remove(trust_domain: TrustDomainArg, json_out: JsonOpt = False) -> None:
    """Stop trusting a trust domain: its bundle is no longer published or fetched."""
    removed = federation.remove_federation(
        STATE.context(), TrustDomain.parse(trust_domain), actor="cli"
    )
    if json_out:
        emit_json(FederationOut.of(removed))
    else:
        typer.echo(f"removed {removed.trust_domain}")


@federation_app.command("refresh")
def refresh(
    trust_domains: Annotated[
        list[str] | None, typer.Argument(help="Trust domains (default: all)")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Fetch bundles now, due or not; exits 8 if any fetch failed (its last good bundle stays).
    One removed while the command runs is skipped (a warning on stderr; not in --json)."""
    ctx = STATE.context()
    names = [TrustDomain.parse(name) for name in trust_domains or ()]
    results = federation.refresh_federations(ctx, names, actor="cli")
    for r in results:
        if r.dropped:
            typer.echo(f"warning: {r.trust_domain}: {r.error}", err=True)
    if json_out:
        current = [_current(ctx, r.trust_domain) for r in results if not r.dropped]
        emit_json([FederationOut.of(item) for item in current if item is not None])
    else:
        for r in results:
            if not r.dropped:
                ok = "updated" if r.changed else "unchanged"
                outcome = ok if r.ok else f"FAILED: {r.error}"
                sequence = "no bundle yet" if r.sequence is None else f"sequence {r.sequence}"
                typer.echo(f"{r.trust_domain}: {outcome} ({sequence})")
    failed = [r for r in results if not r.ok and not r.dropped]
    if failed:
        names = ", ".join(str(r.trust_domain) for r in failed)
        had = [r.sequence is not None for r in failed]
        kept = (
            "kept their last good bundle"
            if all(had)
            else "no bundle fetched yet"
            if not any(had)
            else "kept the last good bundle of those that had one"
        )
        raise Unavailable(f"refresh failed for {names}: {kept}")


def _current(ctx: Context, trust_domain: TrustDomain) -> federation.Federation | None:
    """The relationship as it is now; None once removed (after its refresh, before this)."""
    try:
        return federation.get_federation(ctx, trust_domain)
    except NotFound:
        typer.echo(f"warning: {trust_domain}: removed after its refresh", err=True)
        return None
