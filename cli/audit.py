"""``trellis audit``: read and verify the tamper-evident audit trail."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Annotated

import typer
from cryptography import x509

from ca import audit
from ca.errors import InvalidInput
from cli.common import STATE, emit_json, iso, more, table, when
from cli.progress import shown

audit_app = typer.Typer(
    help="The audit trail of every security-relevant change.", no_args_is_help=True
)
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output")]


def _since(text: str | None) -> dt.datetime | None:
    if text is None:
        return None
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"--since takes an ISO 8601 time, got {text[:40]!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


@audit_app.command("list")
def list_cmd(
    since: Annotated[
        str | None, typer.Option(help="Only records at or after this time (ISO 8601)")
    ] = None,
    event: Annotated[
        str | None,
        typer.Option(help="Event prefix, taken literally, e.g. certificate. or token.revoked"),
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first")] = 100,
    after: Annotated[
        int | None, typer.Option(help="Record id to continue after (older records)")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Audit records, newest first."""
    page = audit.audit_page(
        STATE.context(), since=_since(since), event=event, limit=limit, after=after
    )
    if json_out:
        emit_json(  # a list is a JSON array (docs/cli.md); the cursor goes to stderr as below
            [
                {
                    "id": e.id,
                    "seq": e.seq,
                    "at": iso(e.at),
                    "actor": e.actor,
                    "event": e.event,
                    "subject": e.subject,
                    "detail": e.detail,
                    "request_id": e.request_id,
                }
                for e in page.items
            ]
        )
    else:
        # ID is what --after and the more: line take; SEQ is the record's place in the sealed
        # chain (none until the sealer has chained it), what audit verify --head names.
        table(
            ["ID", "SEQ", "AT", "EVENT", "SUBJECT", "ACTOR"],
            [
                [str(e.id), str(e.seq or "-"), when(e.at), e.event, e.subject[:60], e.actor[:40]]
                for e in page.items
            ],
        )
    given = {"--since": since, "--event": event}
    more("trellis audit list", given, limit=limit, json_out=json_out, next_after=page.next_after)


@audit_app.command("seal")
def seal_cmd(json_out: JsonOpt = False) -> None:
    """Chain settled records and sign the head now (the server chains every 2 seconds and
    signs every 10)."""
    ctx = STATE.context()
    with shown("sealing", json_out=json_out) as progress:
        result = audit.seal(ctx, progress=progress)
    head_seq, head_hash = result.head or (None, None)
    if json_out:
        emit_json(
            {
                "records": result.records,
                "head_seq": head_seq,
                "head_hash": head_hash,
                "signed_seq": result.signed_seq,
            }
        )
        return
    head = f"head at seq {head_seq} ({head_hash})" if head_seq else "the chain is empty"
    signed = f", signed at seq {result.signed_seq}" if result.signed_seq else ", not signed yet"
    typer.echo(f"sealed {result.records} record(s); {head}{signed}")


def _anchors(path: Path | None) -> audit.Anchors | None:
    if path is None:
        return None
    try:
        text = path.read_bytes()  # unreadable (permissions, I/O): OSError, exit 8 (cli.main)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise InvalidInput(f"--bundle {path}: no such file") from None
    try:
        certificates = x509.load_pem_x509_certificates(text)
    except ValueError:
        raise InvalidInput(f"--bundle {path}: not a PEM file of certificates") from None
    return audit.Anchors(tuple(certificates), f"the bundle {path}")


def _head(text: str) -> tuple[int, str]:
    found = re.fullmatch(r"([0-9]{1,18}):([0-9a-f]{64})", text.strip().lower())
    if found is None:
        raise InvalidInput(
            f"--head takes SEQ:HASH (a signed head the log shows), got {text[:80]!r}"
        )
    if int(found[1]) == 0:
        raise InvalidInput(f"--head {text[:80]!r}: the chain starts at seq 1, so 0 is never a head")
    return int(found[1]), found[2]


@audit_app.command("verify")
def verify_cmd(
    bundle: Annotated[
        Path | None,
        typer.Option(
            help="Trust anchors (PEM) the seals' signer must chain to, kept apart from the "
            "database; by default the mesh roots stored in the database itself"
        ),
    ] = None,
    head: Annotated[
        list[str] | None,
        typer.Option(help="SEQ:HASH of a signed head logged by the sealer: the chain must hold it"),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Recompute the hash chain and check the CA signatures; exit 1 on any break."""
    heads = tuple(_head(text) for text in head or ())
    ctx, anchors = STATE.context(), _anchors(bundle)
    with shown("verifying", json_out=json_out) as progress:
        result = audit.verify(ctx, anchors=anchors, heads=heads, progress=progress)
    if json_out:
        emit_json(
            {
                "ok": result.ok,
                "sealed": result.sealed,
                "unsealed": result.unsealed,
                "seals_checked": result.seals_checked,
                "unsigned": result.unsigned,
                "not_counted": result.not_counted,
                "anchors": result.anchors,
                "problems": list(result.problems),
            }
        )
    else:
        for problem in result.problems:
            typer.echo(f"BROKEN: {problem}", err=True)
        verdict = "intact" if result.ok else "TAMPERED"
        discounted = (
            f" ({result.not_counted} not counted: signed by a revoked intermediate)"
            if result.not_counted
            else ""
        )
        typer.echo(
            f"audit trail {verdict}: {result.sealed} sealed record(s), {result.seals_checked} "
            f"signed head(s) checked{discounted}, {result.unsigned} chained after the last "
            f"signed head, {result.unsealed} not sealed yet; signatures checked against "
            f"{result.anchors}"
        )
    if not result.ok:
        raise typer.Exit(1)
