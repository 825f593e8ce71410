"""The audit trail against someone who can write the database: forged signers, removed seals
and chains, a cut tail, damaged rows; and ``init --force`` leaves a record of what it replaced."""

from __future__ import annotations

import datetime as dt
import logging

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlmodel import Session

from ca import audit
from ca.audit_seals import seal_message, sign
from ca.authority import AuthorityParams, init_authority
from ca.bundle import trust_anchors
from ca.clock import FixedClock
from ca.config import Context
from ca.entries import EntryParams, create_entry
from ca.errors import AuditTampered, Unavailable
from ca.identity import SpiffeId, TrustDomain
from ca.store.models import CaRow
from ca.tokens import create_join_token
from tests.ca.svidkit import SQLITE_ONLY
from tests.ca.test_audit import _execute, _records, _sealed
from tests.selfsigned import CA_KEY_USAGE, Key, self_signed

SEALED = dt.timedelta(0)


def _self_signed_ca() -> tuple[x509.Certificate, Key]:
    return self_signed(
        "example.org intermediate",
        extensions=[(x509.BasicConstraints(ca=True, path_length=None), True), (CA_KEY_USAGE, True)],
        valid_from=-dt.timedelta(days=1),
        lifetime=dt.timedelta(days=2),
    )


def _rewrite(ctx: Context, record_id: int, actor: str) -> None:
    """What an attacker with the database does: edit a record, recompute the chain from it."""
    with ctx.engine.begin() as connection:
        connection.execute(
            sa.update(audit._AUDIT).where(audit._AUDIT.c.id == record_id).values(actor=actor)
        )
        rows = connection.execute(
            sa.select(audit._AUDIT).where(audit._AUDIT.c.seq.is_not(None)).order_by("seq")
        ).all()
        previous = audit.GENESIS
        for row in rows:
            digest = audit._digest(row._asdict(), row.seq, previous)
            connection.execute(
                sa.update(audit._AUDIT)
                .where(audit._AUDIT.c.id == row.id)
                .values(prev_hash=previous, hash=digest)
            )
            previous = digest


def _plant(
    ctx: Context, cert: x509.Certificate, role: str = "intermediate", serial: str | None = None
) -> None:
    """``cert`` recorded as a CA of the mesh authority: one more row a database writer adds."""
    with Session(ctx.engine) as session:
        session.add(
            CaRow(
                authority="mesh",
                role=role,
                state="retired",
                serial=serial or format(cert.serial_number, "x"),
                subject=cert.subject.rfc4514_string(),
                key_backend="file",
                key_ref=f"planted-{role}-{cert.serial_number:x}",
                key_type="ec-p256",
                cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
                not_before=cert.not_valid_before_utc,
                not_after=cert.not_valid_after_utc,
                created_at=ctx.clock.now(),
            )
        )
        session.commit()


def test_a_seal_re_signed_with_any_other_key_is_broken(ctx: Context) -> None:
    _records(ctx, 5)
    _sealed(ctx)
    _records(ctx, 3)
    _sealed(ctx)
    with ctx.engine.connect() as connection:
        first = connection.execute(sa.select(sa.func.min(audit._AUDIT.c.id))).scalar_one()
    _rewrite(ctx, first + 2, "rewritten")
    cert, key = _self_signed_ca()
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    with ctx.engine.begin() as connection:
        hashes_by_seq = dict(
            connection.execute(sa.select(audit._AUDIT.c.seq, audit._AUDIT.c.hash)).all()
        )
        seals = connection.execute(
            sa.select(audit._SEALS.c.id, audit._SEALS.c.seq, audit._SEALS.c.signed_at)
        ).all()
        for seal_id, seq, signed_at in seals:
            head = hashes_by_seq[seq]
            connection.execute(
                sa.update(audit._SEALS)
                .where(audit._SEALS.c.id == seal_id)
                .values(
                    head_hash=head,
                    signer_cert_pem=pem,
                    signature=sign(key, seal_message("mesh", seq, head, signed_at)),
                )
            )

    result = audit.verify(ctx)

    assert (
        not result.ok and len(result.problems) == 2 and "stored in this database" in result.anchors
    )
    assert all("not an intermediate of the mesh authority recorded" in p for p in result.problems)
    # Anchors named by the caller do not make it an intermediate of the mesh.
    forged = audit.verify(ctx, anchors=audit.Anchors((cert,), "the bundle forged.pem"))
    assert not forged.ok and forged.problems == result.problems
    # The limit: a database writer may record it as an intermediate and plant a root beside it;
    # then only anchors kept elsewhere (--bundle) tell.
    bundle = audit.Anchors(audit.stored_anchors(ctx).certificates, "the bundle bundle.pem")
    _plant(ctx, cert)
    _plant(ctx, cert, "root", serial="planted-root")
    assert audit.verify(ctx).ok
    elsewhere = audit.verify(ctx, anchors=bundle)
    assert not elsewhere.ok and len(elsewhere.problems) == 2
    assert (
        "is not a CA certificate chaining to the trust anchors (the bundle bundle.pem)"
        in (elsewhere.problems[0])
    )


def test_seals_verify_against_a_bundle_kept_elsewhere_and_only_when_the_signer_was_valid(
    ctx: Context, clock: FixedClock
) -> None:
    _records(ctx, 3)
    _sealed(ctx)
    with ctx.engine.connect() as connection:
        from sqlmodel import Session

        with Session(connection) as session:
            roots = [
                x509.load_pem_x509_certificate(row.cert_pem.encode())
                for row in trust_anchors(session, "mesh", clock.now())
            ]
    bundle = audit.Anchors(tuple(roots), "the bundle b.pem")
    assert audit.verify(ctx, anchors=bundle).ok
    other, _ = _self_signed_ca()
    elsewhere = audit.verify(ctx, anchors=audit.Anchors((other,), "the bundle other.pem"))
    assert not elsewhere.ok and "the bundle other.pem" in elsewhere.problems[0]

    _execute(ctx, "UPDATE audit_seal SET signed_at = :at", at="2001-01-01 00:00:00.000000")
    result = audit.verify(ctx, anchors=bundle)
    assert not result.ok and "was not valid at the seal's time" in result.problems[0]


def test_removed_seals_are_broken_once_the_chain_went_on_past_them(
    ctx: Context, clock: FixedClock
) -> None:
    """(a) every seal deleted: the chain is left with no signed head."""
    _records(ctx, 4)
    _sealed(ctx)
    _execute(ctx, "DELETE FROM audit_seal")
    assert audit.verify(ctx).ok  # as just after a run that could not sign: seconds ago
    clock.advance(audit.LATE + dt.timedelta(seconds=1))
    result = audit.verify(ctx)
    assert not result.ok and "no signed head is left" in result.problems[0]


def test_a_removed_later_seal_is_broken(ctx: Context, clock: FixedClock) -> None:
    """Seals after the first deleted and the records after it rewritten: what is left
    unsigned is newer than the last signature by far more than the sealer ever leaves."""
    _records(ctx, 3)
    _sealed(ctx)
    clock.advance(audit.LATE * 2)
    _records(ctx, 3)
    _sealed(ctx)
    _execute(ctx, "DELETE FROM audit_seal WHERE seq = (SELECT max(seq) FROM audit_seal)")
    result = audit.verify(ctx)
    assert not result.ok and "a seal was removed" in result.problems[0]


def test_a_reset_chain_is_broken_and_the_sealer_will_not_sign_it(
    ctx: Context, clock: FixedClock
) -> None:
    """(b) the chain columns cleared, a record edited: the sealer would chain the edited
    history and sign it with the real key."""
    _records(ctx, 5)
    _sealed(ctx)
    clock.advance(audit.LATE + dt.timedelta(seconds=1))
    _records(ctx, 1)
    _sealed(ctx)
    _execute(ctx, "UPDATE audit_log SET seq = NULL, prev_hash = NULL, hash = NULL")
    _execute(ctx, "UPDATE audit_log SET actor = 'rewritten' WHERE id = 3")

    result = audit.verify(ctx)
    assert not result.ok and any("not chained" in p for p in result.problems), result.problems
    with pytest.raises(AuditTampered, match="refused to chain audit record id 1 "):
        audit.seal(ctx, settle=SEALED)
    again = audit.verify(ctx)
    assert again.seals_checked == 2 and again.sealed == 0  # nothing chained, nothing signed


@SQLITE_ONLY  # PostgreSQL may commit a lower id later: only time tells there
def test_a_record_unchained_behind_the_head_is_refused_on_sqlite(ctx: Context) -> None:
    _records(ctx, 5)
    _sealed(ctx)
    _execute(ctx, "DELETE FROM audit_seal")
    _execute(ctx, "UPDATE audit_log SET seq = NULL, prev_hash = NULL, hash = NULL WHERE id = 2")
    assert any("a reset chain" in p for p in audit.verify(ctx).problems)
    with pytest.raises(AuditTampered, match="record id 2 "):
        audit.seal(ctx, settle=SEALED)


def test_a_cut_tail_shows_against_a_signed_head_witnessed_in_the_log(
    ctx: Context, caplog: pytest.LogCaptureFixture
) -> None:
    """(c) the last records and their seal deleted: consistent in the database alone."""
    _records(ctx, 3)
    _sealed(ctx)
    with caplog.at_level(logging.INFO, logger="trellis.audit"):
        _records(ctx, 3)
        _sealed(ctx)
    [line] = [r.getMessage() for r in caplog.records if "audit head signed" in r.getMessage()]
    seq, digest = int(line.split()[4]), line.split()[6]
    assert audit.verify(ctx, heads=((seq, digest),)).ok
    _execute(ctx, "DELETE FROM audit_log WHERE seq > :seq", seq=seq - 3)
    _execute(ctx, "DELETE FROM audit_seal WHERE seq = :seq", seq=seq)
    assert audit.verify(ctx).ok  # the limit: nothing in the database shows it
    result = audit.verify(ctx, heads=((seq, digest),))
    assert not result.ok and f"witnessed head seq {seq}" in result.problems[0]


def test_a_damaged_seal_or_record_is_broken_not_a_traceback(ctx: Context) -> None:
    _records(ctx, 4)
    _sealed(ctx)
    _records(ctx, 1)
    _sealed(ctx)
    _execute(ctx, "UPDATE audit_seal SET signer_cert_pem = 'garbage' WHERE id = 1")
    result = audit.verify(ctx)
    assert not result.ok and "signer certificate is damaged" in result.problems[0]

    _execute(ctx, "UPDATE audit_log SET detail = 'not json' WHERE seq = 2")
    with pytest.raises(Unavailable, match="is not JSON"):
        audit.list_audit(ctx)


@SQLITE_ONLY  # PostgreSQL stores a timestamp, not text: it cannot hold a damaged one
def test_a_damaged_time_is_broken_not_a_traceback(ctx: Context) -> None:
    _records(ctx, 4)
    _sealed(ctx)
    _execute(ctx, "UPDATE audit_log SET at = 'yesterday' WHERE seq = 3")
    result = audit.verify(ctx)
    assert not result.ok and "record seq 3 " in result.problems[0]
    assert "time is damaged" in result.problems[0]
    with pytest.raises(Unavailable, match="has the time 'yesterday'"):
        audit.list_audit(ctx)


def test_init_force_records_what_it_replaced(ctx: Context) -> None:
    entry = create_entry(ctx, EntryParams(SpiffeId.parse("spiffe://example.org/ns/default/sa/web")))
    create_join_token(ctx, entry.id)
    with ctx.engine.connect() as connection:
        serials = sorted(
            f"{role}/{serial}"
            for role, serial in connection.execute(sa.text("SELECT role, serial FROM ca"))
        )
    init_authority(
        ctx, AuthorityParams(TrustDomain.parse("other.org"), force=True, actor="cli:init")
    )
    [record] = audit.list_audit(ctx, event="authority.reinitialised")
    assert (record.subject, record.actor) == ("mesh", "cli:init")
    assert record.detail == {
        "old_trust_domain": "example.org",
        "entries_removed": 1,
        "join_tokens_removed": 1,
    } | {"old_cas": record.detail["old_cas"]}
    assert sorted(record.detail["old_cas"]) == serials
