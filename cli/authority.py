"""``trellis authority`` (status, rotation, emergencies) and ``trellis jobs``."""

from __future__ import annotations

from typing import Annotated

import typer

from api.schemas import (
    AuthorityStatusOut,
    IntermediateRevokedOut,
    JobOut,
    RootRotationOut,
    TransitionOut,
)
from ca.authority import MESH
from ca.durations import Ttl
from ca.emergency import revoke_intermediate
from ca.revocation import RevocationReason
from ca.root_rotation import rotate_root
from ca.rotation import authority_status, rotate
from ca.scheduler import job_statuses
from cli.common import STATE, confirm, emit_json, table, when

authority_app = typer.Typer(
    help="The CA hierarchy: status, rotation, emergencies.", no_args_is_help=True
)
jobs_app = typer.Typer(help="Scheduled jobs run by 'trellis serve'.", no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output")]
AuthorityOpt = Annotated[str, typer.Option("--authority", help="Authority name")]


@authority_app.command("status")
def status(authority: AuthorityOpt = MESH, json_out: JsonOpt = False) -> None:
    """Every CA with its state, validity and next transition."""
    result = authority_status(STATE.context(), authority)
    if json_out:
        emit_json(AuthorityStatusOut.of(result))
        return
    domain = f" ({result.trust_domain})" if result.trust_domain else ""  # the mesh's only
    typer.echo(f"authority {result.name}{domain}, bundle sequence {result.bundle_sequence}")
    if result.root_rotation:
        typer.echo(
            f"root rotation: {result.root_rotation} (switch after {when(result.root_switch_after)})"
        )
    table(
        ["ROLE", "STATE", "SERIAL", "NOT AFTER", "NEXT", "AT"],
        [
            [
                c.role,
                c.state,
                c.serial[:16],
                when(c.not_after),
                c.next_transition or "-",
                when(c.next_at),
            ]
            for c in result.cas
        ],
    )


@authority_app.command("rotate")
def rotate_now(
    authority: AuthorityOpt = MESH,
    now: Annotated[bool, typer.Option("--now", help="Force the next transition")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Perform due intermediate transitions; with --now, force the next one (drills, incidents)."""
    done = rotate(STATE.context(), authority, force=now, actor="cli")
    if json_out:
        # POST /v1/authorities/{a}/rotate's body: a bare array (docs/cli.md, "--json")
        emit_json([TransitionOut(event=t.event, serial=t.serial, at=t.at) for t in done])
        return
    for transition in done:
        typer.echo(f"{transition.event} {transition.serial}")
    if not done:
        typer.echo("nothing was due (use --now to force the next transition)")


@authority_app.command("rotate-root")
def rotate_root_cmd(
    authority: AuthorityOpt = MESH,
    overlap: Annotated[
        str, typer.Option(help="How long both roots are published before the switch")
    ] = "7d",
    step: Annotated[
        bool, typer.Option("--step", help="Advance an in-progress rotation one step")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Do not wait for the overlap / old certificates")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Root rotation: publish (no --step), then switch and retire (--step each)."""
    result = rotate_root(
        STATE.context(), authority, overlap=Ttl.parse(overlap), step=step, force=force
    )
    if json_out:
        emit_json(RootRotationOut.of(result))
        return
    for transition in result.done:
        typer.echo(f"{transition.event} {transition.serial}")
    typer.echo(f"root rotation {result.old_root[:16]} -> {result.new_root[:16]}: {result.step}")
    if result.step == "published":
        typer.echo(
            f"next: 'trellis authority rotate-root --step' after {when(result.switch_after)}"
        )
    elif result.step == "switched":
        typer.echo("next: 'trellis authority rotate-root --step' once old certificates expired")


@jobs_app.command("list")
def jobs_list(json_out: JsonOpt = False) -> None:
    """Each job's last run, result and next run (shared by all replicas), per node for the jobs
    of a node's files."""
    statuses = job_statuses(STATE.context())
    if json_out:
        emit_json([JobOut.of(s) for s in statuses])
        return
    table(
        ["JOB", "NODE", "EVERY", "LAST RUN", "OK", "RESULT", "NEXT RUN"],
        [
            [
                s.name,
                s.node or "-",
                f"{s.every_seconds}s",
                when(s.last_started),
                "-"
                if s.last_ok is None
                else ("yes" if s.last_ok else f"NO ({s.consecutive_failures})"),
                s.last_result[:60] or "-",
                when(s.next_run),
            ]
            for s in statuses
        ],
    )


@authority_app.command("revoke-intermediate")
def authority_revoke_intermediate(
    authority: AuthorityOpt = MESH,
    reason: Annotated[str, typer.Option(help="RFC 5280 reason")] = "cACompromise",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Emergency: revoke the active intermediate and activate a fresh one at once."""
    why = RevocationReason.parse(reason)
    if not yes:
        confirm(
            f"Revoke the active intermediate of {authority!r} ({why.value})"
            " and switch to a new one?"
        )
    result = revoke_intermediate(STATE.context(), actor="cli", authority=authority, reason=why)
    if json_out:
        emit_json(IntermediateRevokedOut.of(result))
        return
    typer.echo(
        f"revoked intermediate {result.revoked_serial}; now issuing from {result.new_serial}"
    )
    for serial in result.also_revoked:
        typer.echo(f"also revoked intermediate {serial} (keyed before the emergency)")
    if result.final_crl_skipped:
        typer.echo(
            "warning: the revoked intermediate's own final CRL was not signed "
            f"({result.final_crl_skipped}); the root's CRL lists the intermediate",
            err=True,
        )
    typer.echo(f"{len(result.to_reissue)} live certificate(s) must be re-issued:")
    if result.to_reissue:
        table(
            ["SERIAL", "SPIFFE ID", "NOT AFTER"],
            [[i.serial.hex, i.identity, when(i.not_after)] for i in result.to_reissue],
        )
