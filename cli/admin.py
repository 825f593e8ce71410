"""Admin commands: they act directly on the local data dir and database."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from cryptography import x509

from api.schemas import CertificateOut, EntryOut, RevokedCertificateOut, TokenCreated, TokenOut
from ca import certs, entries, tokens
from ca.authority import (
    MESH,
    AuthorityExists,
    AuthorityParams,
    Issuer,
    bundle_pem,
    check_params,
    init_authority,
    load_authority,
    trust_domain_as_is,
)
from ca.bundle import read_bundle, write_bundle_file
from ca.config import Settings
from ca.durations import Ttl
from ca.errors import Conflict, InvalidInput
from ca.files import check_writable, write_atomic, write_private
from ca.identity import SpiffeId, TrustDomain
from ca.jwks import bundle_jwks
from ca.keys import KeyType
from ca.pem import fingerprint
from ca.revocation import RevocationReason
from ca.serial import Serial
from ca.store.db import SchemaPolicy, database_place
from cli.common import (
    STATE,
    confirm,
    emit_json,
    iso,
    more,
    out_file,
    table,
    warn_crl_skipped,
    when,
)
from cli.progress import shown

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output")]
EntryIdArg = Annotated[str, typer.Argument(help="The entry's id (trellis entry list)")]

entry_app = typer.Typer(
    help="Registration entries: which SPIFFE IDs may be issued.", no_args_is_help=True
)
token_app = typer.Typer(
    help="Join tokens (bootstrap a workload) and admin tokens.", no_args_is_help=True
)
certs_app = typer.Typer(help="Issued certificates.", no_args_is_help=True)
bundle_app = typer.Typer(help="The trust bundle.", no_args_is_help=True)


def init(
    trust_domain: Annotated[
        str | None, typer.Option(help="e.g. example.org (TRELLIS_TRUST_DOMAIN)")
    ] = None,
    key_type: Annotated[str | None, typer.Option(help="Key type of root and intermediate")] = None,
    root_key_type: Annotated[
        str | None, typer.Option(help="Root key type (default ec-p384)")
    ] = None,
    ca_ttl: Annotated[str, typer.Option(help="Intermediate CA lifetime")] = "7d",
    svid_ttl: Annotated[str, typer.Option(help="Default SVID lifetime")] = "1h",
    key_backend: Annotated[
        str | None, typer.Option(help="file or vault (TRELLIS_KEY_BACKEND, default file)")
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Replace an existing CA, destroying its keys")
    ] = False,
    exists_ok: Annotated[bool, typer.Option(help="Succeed quietly if a CA exists")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Create the trust domain's root and issuing CA, and a first admin token."""
    # Everything given is checked before the data dir is set up: a refused init leaves none.
    # --key-backend overrides TRELLIS_KEY_BACKEND, as every option does its variable: a bad
    # variable the option replaces stops nothing.
    settings = STATE.settings(key_backend=key_backend)
    trust_domain = trust_domain or settings.trust_domain
    if not trust_domain:
        raise InvalidInput("--trust-domain (or TRELLIS_TRUST_DOMAIN) is required")
    params = AuthorityParams(
        trust_domain=TrustDomain.parse(trust_domain),
        key_type=KeyType.parse(key_type) if key_type else KeyType.EC_P256,
        root_key_type=KeyType.parse(root_key_type or key_type or "ec-p384"),
        ca_ttl=Ttl.parse(ca_ttl),
        svid_ttl=Ttl.parse(svid_ttl),
        force=force,
        key_backend=key_backend,
        actor="cli:init",
        given_at=STATE.given_at(),
    )
    check_params(params)
    settings.check_new_key_backend(key_backend)
    # --exists-ok is the step deploy/ runs just before 'serve', with the same version: it
    # migrates as 'serve' would. No init changes the schema of a database it then refuses (a
    # CA exists: exit 6): a plain one requires it current, and --exists-ok looks at the trust
    # domain there before it migrates.
    existing = None
    if exists_ok and not force:
        existing = trust_domain_as_is(settings.effective_database_url)
        if existing is not None and existing != params.trust_domain:
            raise _other_trust_domain(existing, params.trust_domain, settings)
    if existing is None:  # a CA to make, whose admin token and bundle must have a place
        _check_outputs(settings)
    policy = SchemaPolicy.MIGRATE if exists_ok else SchemaPolicy.REQUIRE_CURRENT
    with STATE.setting_up(policy, key_backend=key_backend) as ctx:
        try:
            created: Issuer | None = init_authority(ctx, params)
        except AuthorityExists:
            if not exists_ok:
                raise
            created = None
        if created is not None:
            # Inside the clean-up: a CA whose admin token was never written has no admin, and
            # a second init is refused (it exists).
            _, secret = tokens.create_admin_token(ctx, "created by trellis init", actor="cli:init")
            write_private(ctx.settings.admin_token_path, secret.encode() + b"\n")
            bundle_path = write_bundle_file(ctx)
    if created is None:
        # The row, not the issuer: a CA that exists is all --exists-ok asks for. Whether this
        # data dir holds its keys is for 'serve' to check (and say) at start-up.
        existing = TrustDomain.parse(load_authority(ctx).trust_domain)
        if existing != params.trust_domain:  # made since it was looked at above
            raise _other_trust_domain(existing, params.trust_domain, settings)
        if json_out:
            emit_json({"trust_domain": str(existing), "created": False})
        else:
            where = database_place(settings.effective_database_url)
            typer.echo(f"A CA for {existing} already exists in {where}")
        return
    issuer = created
    root = issuer.roots[0]
    info = {
        "created": True,
        "trust_domain": str(issuer.trust_domain),
        "root_fingerprint_sha256": fingerprint(root),
        "root_not_after": iso(root.not_valid_after_utc),
        "intermediate_not_after": iso(issuer.certificate.not_valid_after_utc),
        "bundle_path": str(bundle_path),
        "admin_token_path": str(ctx.settings.admin_token_path),
    }
    if json_out:
        emit_json(info)
        return
    typer.echo(f"Initialised trust domain {info['trust_domain']}")
    typer.echo(
        f"  root CA       SHA-256 {info['root_fingerprint_sha256']}, "
        f"expires {info['root_not_after']}"
    )
    typer.echo(f"  issuing CA    expires {info['intermediate_not_after']}")
    typer.echo(f"  trust bundle  {info['bundle_path']}")
    typer.echo(f"  admin token   {info['admin_token_path']} (0600)")


def _check_outputs(settings: Settings) -> None:
    """The files an init writes once the CA is made, checked before anything is: one that
    cannot be written there (a directory in its place, a read-only data dir) is refused now,
    under its own name, not after the CA is committed (docs/cli.md)."""
    for path in (settings.admin_token_path, settings.data_dir / "bundle.pem"):
        check_writable(path, directory=False)


def _other_trust_domain(existing: TrustDomain, asked: TrustDomain, settings: Settings) -> Conflict:
    return Conflict(
        f"a CA for {existing} already exists in {database_place(settings.effective_database_url)},"
        f" not for {asked}: --exists-ok accepts only the same trust domain"
    )


@entry_app.command("create")
def entry_create(
    spiffe_id: Annotated[str, typer.Option(help="spiffe://<td>/<path>")],
    dns: Annotated[list[str] | None, typer.Option(help="DNS SAN (repeatable)")] = None,
    ttl: Annotated[str | None, typer.Option(help="Default SVID TTL")] = None,
    max_ttl: Annotated[str | None, typer.Option(help="Largest TTL a workload may ask for")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Register an identity; prints the entry id."""
    entry = entries.create_entry(
        STATE.context(),
        entries.EntryParams(
            spiffe_id=SpiffeId.parse(spiffe_id),
            dns_names=tuple(dns or ()),
            ttl=Ttl.parse(ttl) if ttl else None,
            max_ttl=Ttl.parse(max_ttl) if max_ttl else None,
        ),
        actor="cli",
    )
    if json_out:
        emit_json(EntryOut.of(entry))
    else:
        typer.echo(entry.id)


def _entry_rows(items: list[entries.Entry]) -> list[list[str]]:
    return [
        [
            e.id,
            str(e.spiffe_id),
            ",".join(e.dns_names) or "-",
            str(e.ttl),
            str(e.max_ttl),
            "yes" if e.enabled else "no",
        ]
        for e in items
    ]


@entry_app.command("list")
def entry_list(json_out: JsonOpt = False) -> None:
    """Registration entries: the SPIFFE IDs that may be issued, with their DNS names and TTLs."""
    items = entries.list_entries(STATE.context())
    if json_out:
        emit_json([EntryOut.of(e) for e in items])
    else:
        table(["ID", "SPIFFE ID", "DNS", "TTL", "MAX TTL", "ENABLED"], _entry_rows(items))


@entry_app.command("show")
def entry_show(entry_id: EntryIdArg, json_out: JsonOpt = False) -> None:
    """One registration entry."""
    entry = entries.get_entry(STATE.context(), entry_id)
    if json_out:
        emit_json(EntryOut.of(entry))
    else:
        table(["ID", "SPIFFE ID", "DNS", "TTL", "MAX TTL", "ENABLED"], _entry_rows([entry]))


@entry_app.command("delete")
def entry_delete(entry_id: EntryIdArg, json_out: JsonOpt = False) -> None:
    """Delete an entry and its join tokens; its certificates stay valid but cannot renew."""
    entry = entries.delete_entry(STATE.context(), entry_id, actor="cli")
    if json_out:
        emit_json(EntryOut.of(entry))
    else:
        typer.echo(f"deleted entry {entry.id} ({entry.spiffe_id}) and its join tokens")


@entry_app.command("disable")
def entry_disable(entry_id: EntryIdArg, json_out: JsonOpt = False) -> None:
    """Issue and renew nothing for this entry until it is enabled again."""
    entry = entries.set_entry_enabled(STATE.context(), entry_id, enabled=False, actor="cli")
    if json_out:
        emit_json(EntryOut.of(entry))
    else:
        typer.echo(f"disabled entry {entry.id} ({entry.spiffe_id})")


@entry_app.command("enable")
def entry_enable(entry_id: EntryIdArg, json_out: JsonOpt = False) -> None:
    """Let a disabled entry be issued and renewed again."""
    entry = entries.set_entry_enabled(STATE.context(), entry_id, enabled=True, actor="cli")
    if json_out:
        emit_json(EntryOut.of(entry))
    else:
        typer.echo(f"enabled entry {entry.id} ({entry.spiffe_id})")


@token_app.command("create")
def token_create(
    entry: Annotated[str | None, typer.Option(help="Entry id: create a join token for it")] = None,
    admin: Annotated[bool, typer.Option("--admin", help="Create an admin token")] = False,
    uses: Annotated[
        int | None, typer.Option(help="How many SVIDs the join token may obtain (default 1)")
    ] = None,
    ttl: Annotated[
        str | None, typer.Option(help="Lifetime (join: default 1h; admin: default none)")
    ] = None,
    description: Annotated[str, typer.Option(help="Free text")] = "",
    json_out: JsonOpt = False,
) -> None:
    """Print a new token secret (shown once; only its hash is stored)."""
    if admin == (entry is not None):
        raise InvalidInput("give exactly one of --entry ID or --admin")
    if admin and uses is not None:  # an admin token has no uses to count: not silently dropped
        raise InvalidInput("--uses applies to join tokens only")
    ctx = STATE.context()
    if admin:
        info, secret = tokens.create_admin_token(
            ctx, description, ttl=Ttl.parse(ttl) if ttl else None, actor="cli"
        )
    else:
        assert entry is not None
        info, secret = tokens.create_join_token(
            ctx,
            entry,
            uses=1 if uses is None else uses,
            ttl=Ttl.parse(ttl) if ttl else tokens.DEFAULT_JOIN_TTL,
            description=description,
            actor="cli",
        )
    if json_out:
        emit_json(TokenCreated(**TokenOut.of(info).model_dump(), token=secret))
    else:
        typer.echo(secret)


@token_app.command("list")
def token_list(json_out: JsonOpt = False) -> None:
    """Join and admin tokens, without their secrets."""
    items = tokens.list_tokens(STATE.context())
    if json_out:
        emit_json([TokenOut.of(i) for i in items])
        return
    rows = [
        [
            i.id,
            i.kind.value,
            i.entry_id or "-",
            when(i.uses_remaining),
            when(i.expires_at),
            when(i.revoked_at),
        ]
        for i in items
    ]
    table(["ID", "KIND", "ENTRY", "USES LEFT", "EXPIRES", "REVOKED"], rows)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id (trellis token list)")],
    json_out: JsonOpt = False,
) -> None:
    """Revoke a join or admin token: it is refused from now on."""
    info = tokens.revoke_token(STATE.context(), token_id, actor="cli")
    if json_out:
        emit_json(TokenOut.of(info))
    else:
        typer.echo(f"revoked token {info.id}")


def _cert_rows(items: list[certs.CertificateInfo]) -> list[list[str]]:
    return [
        [i.serial.hex, i.identity, i.status.value, when(i.not_before), when(i.not_after)]
        for i in items
    ]


@certs_app.command("list")
def certs_list(
    spiffe_id: Annotated[str | None, typer.Option(help="Only this identity")] = None,
    status: Annotated[str | None, typer.Option(help="active, revoked or expired")] = None,
    limit: Annotated[int, typer.Option(help="At most this many rows")] = 100,
    after: Annotated[str | None, typer.Option(help="Serial to continue after")] = None,
    expiring_within: Annotated[
        str | None,
        typer.Option(
            help="Only live certificates expiring within this time (e.g. 24h), soonest first"
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Issued certificates, one page in serial order (or soonest expiry first)."""
    page = certs.certificate_page(
        STATE.context(),
        spiffe_id=SpiffeId.parse(spiffe_id) if spiffe_id else None,
        status=certs.CertStatus.parse(status) if status else None,
        expiring_within=Ttl.parse(expiring_within).delta if expiring_within else None,
        limit=limit,
        after=Serial.parse(after) if after else None,
    )
    if json_out:  # an array, as docs/cli.md promises: the cursor goes to stderr as below
        emit_json([CertificateOut.of(i) for i in page.items])
    else:
        rows = _cert_rows(page.items)
        table(["SERIAL", "SPIFFE ID", "STATUS", "NOT BEFORE", "NOT AFTER"], rows)
    given = {"--spiffe-id": spiffe_id, "--status": status, "--expiring-within": expiring_within}
    more("trellis certs list", given, limit=limit, json_out=json_out, next_after=page.next_after)


@certs_app.command("show")
def certs_show(
    serial: Annotated[str, typer.Argument(help="Serial (hex) of the certificate")],
    json_out: JsonOpt = False,
) -> None:
    """One certificate: its status, who revoked it and why, and its PEM."""
    info = certs.get_certificate(STATE.context(), Serial.parse(serial))
    if json_out:
        emit_json(CertificateOut.of(info, with_pem=True))
        return
    for label, value in [
        ("serial", info.serial.hex),
        ("identity", info.identity),
        ("status", info.status.value),
        ("profile", info.profile),
        ("not_before", when(info.not_before)),
        ("not_after", when(info.not_after)),
        ("sha256", info.fingerprint_sha256),
        ("requested_by", info.requested_by),
        ("revoked_at", when(info.revoked_at)),
        ("reason", info.revocation_reason.value if info.revocation_reason else "-"),
        ("revoked_by", info.revoked_by or "-"),
        ("request_id", info.revocation_request_id or "-"),
        ("invalid_since", when(info.invalidity_date)),
    ]:
        typer.echo(f"{label:<13} {value}")
    typer.echo(info.certificate_pem.rstrip())


def revoke(
    serial: Annotated[str | None, typer.Argument(help="Serial (hex) of one certificate")] = None,
    spiffe_id: Annotated[
        str | None, typer.Option(help="Revoke every live certificate of this identity instead")
    ] = None,
    reason: Annotated[
        str, typer.Option(help="RFC 5280 reason, e.g. keyCompromise")
    ] = "unspecified",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Revoke one certificate by serial, or all live certificates of a SPIFFE ID."""
    if serial is None and spiffe_id is None:
        raise InvalidInput("give a SERIAL or --spiffe-id")
    if serial is not None and spiffe_id is not None:
        raise InvalidInput("give a SERIAL or --spiffe-id, not both")
    why = RevocationReason.parse(reason)
    ctx = STATE.context()
    if serial is not None:
        parsed = Serial.parse(serial)
        current = certs.get_certificate(ctx, parsed)
        if current.status is certs.CertStatus.REVOKED:  # before asking: no answer would help
            raise Conflict(f"certificate {current.serial} is already revoked")
        question = f"Revoke {current.serial} ({current.identity}, {current.status.value})"
        if not yes:
            confirm(f"{question} for {why.value}?")
        revoked = [certs.revoke_certificate(ctx, parsed, why, "cli")]
    else:
        identity = SpiffeId.parse(spiffe_id or "")
        live = certs.list_certificates(
            ctx, spiffe_id=identity, status=certs.CertStatus.ACTIVE, limit=certs.MAX_PAGE
        )
        if live and not yes:
            confirm(f"Revoke {len(live)} live certificate(s) of {identity} for {why.value}?")
        with shown("revoking", json_out=json_out) as progress:
            revoked = certs.revoke_identity(ctx, identity, why, "cli", progress=progress)
    if json_out:
        out = [RevokedCertificateOut.of(info) for info in revoked]
        emit_json(out[0] if serial is not None else out)
        return
    for info in revoked:
        typer.echo(
            f"revoked {info.serial} ({info.identity}) reason {why.value} at {when(info.revoked_at)}"
        )
    warn_crl_skipped(revoked)


@bundle_app.command("show")
def bundle_show(
    format: Annotated[str, typer.Option("--format", help="pem or jwks")] = "pem",
    out: Annotated[
        Path | None, typer.Option(help="Write to this file instead of stdout", callback=out_file)
    ] = None,
) -> None:
    """The trust bundle: PEM roots, or the SPIFFE JWK Set with its sequence."""
    if format not in ("pem", "jwks"):
        raise InvalidInput(f"--format {format[:20]!r}: pem or jwks")
    ctx = STATE.context()
    if format == "pem":
        data = bundle_pem(ctx)
    elif format == "jwks":
        bundle = read_bundle(ctx, MESH)
        document = bundle_jwks(
            x509.load_pem_x509_certificates(bundle.pem),
            bundle.sequence,
            ctx.settings.bundle_refresh_hint,
        )
        data = json.dumps(document, indent=2).encode() + b"\n"
    if out is not None:
        write_atomic(out, data)
    else:
        typer.echo(data.decode().rstrip())
