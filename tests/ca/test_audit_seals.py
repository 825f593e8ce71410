"""Whose seals count (ca.audit_seals): only the mesh authority's own intermediates, not revoked
when they signed; a seal signs its seq and time; a damaged row is a BROKEN line, not a
traceback. Each attack is the one someone who can write the database (and holds a key that
chains to the mesh root) would make: records rewritten, their hashes recomputed, the seals
replaced by one of their own."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlmodel import Session, select

from ca import audit
from ca.audit_seals import seal_message, sign
from ca.bundle import trust_anchors
from ca.cas import load_ca_key
from ca.clock import FixedClock
from ca.config import Context
from ca.emergency import revoke_intermediate
from ca.errors import AuditTampered, InvalidInput
from ca.istio import IstioParams, issue_istio_intermediate, write_output
from ca.keys import PrivateKey
from ca.revocation import RevocationReason
from ca.store.models import CaRow
from tests.ca.svidkit import SQLITE_ONLY
from tests.ca.test_audit import _execute, _records, _sealed
from tests.ca.test_audit_tamper import _plant, _rewrite

FORMATS = pytest.mark.parametrize("old_format", [False, True], ids=["v2", "v1-head-only"])


def _first_id(ctx: Context) -> int:
    with ctx.engine.connect() as connection:
        return int(connection.execute(sa.select(sa.func.min(audit._AUDIT.c.id))).scalar_one())


def _forge_head(
    ctx: Context,
    cert: x509.Certificate,
    key: PrivateKey,
    *,
    signed_at: dt.datetime,
    old_format: bool = False,
) -> int:
    """Every seal deleted, one inserted over the chain's head, signed with ``key``: in the
    format this release signs, or as older releases did (the head hash alone)."""
    with ctx.engine.begin() as connection:
        seq, head = connection.execute(
            sa.select(audit._AUDIT.c.seq, audit._AUDIT.c.hash)
            .where(audit._AUDIT.c.seq.is_not(None))
            .order_by(audit._AUDIT.c.seq.desc())
            .limit(1)
        ).one()
        message = head.encode() if old_format else seal_message("mesh", seq, head, signed_at)
        connection.execute(sa.delete(audit._SEALS))
        connection.execute(
            sa.insert(audit._SEALS).values(
                seq=seq,
                head_hash=head,
                signed_at=signed_at,
                signer_cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
                signature=sign(key, message),
            )
        )
    return int(seq)


def _bundle(ctx: Context) -> audit.Anchors:
    """The mesh roots as a bundle kept apart from the database would hold them."""
    with Session(ctx.engine) as session:
        roots = trust_anchors(session, "mesh", ctx.clock.now())
        return audit.Anchors(
            tuple(x509.load_pem_x509_certificate(row.cert_pem.encode()) for row in roots),
            "the bundle bundle.pem",
        )


def _istio_key(ctx: Context, out: Path) -> tuple[x509.Certificate, PrivateKey]:
    """What ``trellis istio issue --cluster c1 --out DIR --format files`` hands out."""
    params = IstioParams(cluster="c1", output=out, output_format="files")
    write_output(issue_istio_intermediate(ctx, params), "files", out)
    key = serialization.load_pem_private_key((out / "ca-key.pem").read_bytes(), None)
    cert = x509.load_pem_x509_certificate((out / "ca-cert.pem").read_bytes())
    assert isinstance(key, PrivateKey)
    return cert, key


def _active_intermediate(ctx: Context) -> tuple[x509.Certificate, PrivateKey]:
    with Session(ctx.engine) as session:
        row = session.exec(
            select(CaRow).where(CaRow.role == "intermediate", CaRow.state == "active")
        ).one()
        return x509.load_pem_x509_certificate(row.cert_pem.encode()), load_ca_key(
            ctx, row
        ).private_key


@FORMATS
def test_a_seal_signed_with_an_istio_clusters_key_is_broken(
    ctx: Context, tmp_path: Path, old_format: bool
) -> None:
    """The Istio intermediate is a CA, keyCertSign, signed by the mesh root, and its key is
    handed out: it chains to the anchors as well as the mesh's own intermediate does."""
    _records(ctx, 4)
    _sealed(ctx)
    cert, key = _istio_key(ctx, tmp_path / "c1")
    bundle = _bundle(ctx)
    assert cert.issuer == bundle.certificates[0].subject  # it does chain to the mesh root
    _rewrite(ctx, _first_id(ctx) + 1, "mallory")
    seq = _forge_head(ctx, cert, key, signed_at=ctx.clock.now(), old_format=old_format)

    for anchors in (None, bundle):
        result = audit.verify(ctx, anchors=anchors)
        assert not result.ok
        assert result.problems == (
            f"seal at seq {seq}: its signer (CN=istio-c1,OU=istio example.org,O=Trellis) is not "
            "an intermediate of the mesh authority recorded in this database (an Istio "
            "cluster's intermediate, a cross-certificate, another authority's CA and any other "
            "key never seal the trail)",
        )

    # Recorded as one of the mesh's intermediates as well: its profile still gives it away,
    # and against a bundle kept elsewhere the database holds nothing else to plant.
    _plant(ctx, cert)
    result = audit.verify(ctx, anchors=bundle)
    assert not result.ok and len(result.problems) == 1
    assert "does not have the profile of a Trellis intermediate" in result.problems[0]


def test_a_cross_certificate_or_a_root_never_seals(ctx: Context, tmp_path: Path) -> None:
    """A root's key signs seals no more than an Istio cluster's does: only intermediates do."""
    _records(ctx, 2)
    _sealed(ctx)
    with Session(ctx.engine) as session:
        root = session.exec(select(CaRow).where(CaRow.role == "root")).one()
        cert = x509.load_pem_x509_certificate(root.cert_pem.encode())
        key = load_ca_key(ctx, root).private_key
    seq = _forge_head(ctx, cert, key, signed_at=ctx.clock.now())
    result = audit.verify(ctx, anchors=_bundle(ctx))
    assert not result.ok
    assert result.problems[0].startswith(f"seal at seq {seq}: its signer (")
    assert "is not an intermediate of the mesh authority" in result.problems[0]


def test_a_seal_signs_its_seq_and_time_and_old_seals_still_verify(ctx: Context) -> None:
    _records(ctx, 3)
    _sealed(ctx)
    assert audit.verify(ctx).ok
    # The time moved, the signature kept: before, only the head hash was signed.
    with ctx.engine.begin() as connection:
        later = ctx.clock.now() + dt.timedelta(seconds=1)
        connection.execute(sa.update(audit._SEALS).values(signed_at=later))
    moved = audit.verify(ctx)
    assert not moved.ok and "the CA signature does not verify" in moved.problems[0]

    # A seal an older release made (the head hash alone) is still good.
    cert, key = _active_intermediate(ctx)
    _forge_head(ctx, cert, key, signed_at=ctx.clock.now(), old_format=True)
    old = audit.verify(ctx, anchors=_bundle(ctx))
    assert old.ok and (old.seals_checked, old.not_counted, old.unsigned) == (1, 0, 0)


def _revoked_with_its_key(
    ctx: Context, clock: FixedClock, reason: RevocationReason = RevocationReason.CA_COMPROMISE
) -> tuple[x509.Certificate, PrivateKey, dt.datetime, dt.datetime]:
    """Sealed at T0 by intermediate X, X revoked at T1 (its key file stays where it was),
    sealed again by its successor: X's certificate and key, T0, T1."""
    _records(ctx, 3)
    _sealed(ctx)
    sealed_at = clock.now()
    cert, key = _active_intermediate(ctx)
    clock.advance(dt.timedelta(minutes=1))
    revoke_intermediate(ctx, actor="cli", reason=reason)
    revoked_at = clock.now()
    clock.advance(dt.timedelta(minutes=1))
    _records(ctx, 2)
    _sealed(ctx)
    return cert, key, sealed_at, revoked_at


def test_after_an_emergency_the_old_seals_do_not_count_and_the_trail_is_intact(
    ctx: Context, clock: FixedClock
) -> None:
    """The revoked intermediate's seals prove nothing (its key may be stolen, and signs any
    time), but the successor's seal covers every record they did."""
    _revoked_with_its_key(ctx, clock)
    result = audit.verify(ctx, anchors=_bundle(ctx))
    assert result.ok, result.problems
    assert (result.seals_checked, result.not_counted, result.unsigned) == (2, 1, 0)


def test_a_superseded_intermediate_s_seals_made_before_still_count(
    ctx: Context, clock: FixedClock
) -> None:
    """Its successor's seal removed: the revoked intermediate's seal still signs what it
    covers (the records after it are the unsigned ones), where a compromise leaves none."""
    _revoked_with_its_key(ctx, clock, RevocationReason.SUPERSEDED)
    _execute(ctx, "DELETE FROM audit_seal WHERE id = (SELECT max(id) FROM audit_seal)")
    result = audit.verify(ctx)
    assert result.ok and (result.not_counted, result.unsigned) == (0, 4), result


@FORMATS
def test_a_seal_by_a_revoked_intermediate_dated_after_its_revocation_is_broken(
    ctx: Context, clock: FixedClock, old_format: bool
) -> None:
    cert, key, _, revoked_at = _revoked_with_its_key(ctx, clock)
    _rewrite(ctx, _first_id(ctx) + 1, "mallory")
    seq = _forge_head(ctx, cert, key, signed_at=clock.now(), old_format=old_format)
    result = audit.verify(ctx, anchors=_bundle(ctx))
    assert not result.ok
    assert result.problems[0] == (
        f"seal at seq {seq}: its signer was revoked (cACompromise) at {revoked_at.isoformat()}, "
        f"before the seal's time {clock.now().isoformat()}"
    )


@FORMATS
def test_a_seal_dated_before_the_records_it_covers_is_broken(
    ctx: Context, clock: FixedClock, old_format: bool
) -> None:
    """Backdated to before the revocation: the revocation's own records give it away."""
    cert, key, sealed_at, _ = _revoked_with_its_key(ctx, clock)
    _rewrite(ctx, _first_id(ctx) + 1, "mallory")
    seq = _forge_head(ctx, cert, key, signed_at=sealed_at, old_format=old_format)
    result = audit.verify(ctx, anchors=_bundle(ctx))
    assert not result.ok
    assert result.problems[0] == (
        f"seal at seq {seq}: dated {sealed_at.isoformat()}, before a record it covers "
        f"({clock.now().isoformat()}): the sealer signs after the records it chains"
    )


@FORMATS
def test_a_cut_tail_re_signed_with_a_stolen_key_rests_on_that_key_alone(
    ctx: Context, clock: FixedClock, old_format: bool
) -> None:
    """The records after the theft deleted, the rest rewritten and sealed with the revoked
    key, dated before its revocation: consistent, but proven by nothing but that key."""
    cert, key, sealed_at, revoked_at = _revoked_with_its_key(ctx, clock)
    _execute(ctx, "DELETE FROM audit_log WHERE seq > (SELECT min(seq) FROM audit_seal)")
    _rewrite(ctx, _first_id(ctx) + 1, "mallory")
    seq = _forge_head(ctx, cert, key, signed_at=sealed_at, old_format=old_format)
    clock.advance(audit.LATE)
    result = audit.verify(ctx, anchors=_bundle(ctx))
    assert not result.ok and result.not_counted == 1
    assert result.problems[0].startswith(
        f"seal at seq {seq}: its signer was revoked (cACompromise) at {revoked_at.isoformat()} and "
    )
    assert "they rest on that key alone" in result.problems[0]


def test_an_emergency_never_followed_by_a_seal_says_to_seal(
    ctx: Context, clock: FixedClock
) -> None:
    """A CLI-only installation: sealed once, then an emergency, and nothing seals since."""
    _records(ctx, 3)
    _sealed(ctx)
    clock.advance(dt.timedelta(minutes=1))
    revoke_intermediate(ctx, actor="cli")
    assert audit.verify(ctx).ok  # the server's job seals within seconds
    clock.advance(audit.LATE + dt.timedelta(seconds=1))
    result = audit.verify(ctx)
    assert not result.ok and "'trellis audit seal' signs the head" in result.problems[0]
    _sealed(ctx)
    assert audit.verify(ctx).ok


def test_seals_made_before_init_force_count_against_a_bundle_of_both_roots(
    ctx: Context,
) -> None:
    """``init --force`` forgets the old CA rows; its record in the chain names them."""
    from ca.authority import AuthorityParams, init_authority
    from ca.identity import TrustDomain

    _records(ctx, 2)
    _sealed(ctx)
    old = _bundle(ctx)
    init_authority(ctx, AuthorityParams(TrustDomain.parse("example.org"), force=True))
    _sealed(ctx)
    both = audit.Anchors(old.certificates + _bundle(ctx).certificates, "both bundles")
    result = audit.verify(ctx, anchors=both)
    assert result.ok and result.seals_checked == 2, result.problems


@SQLITE_ONLY  # PostgreSQL holds each column to its type
@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        pytest.param(
            "UPDATE audit_log SET seq = 'abc' WHERE seq = 3",
            "record id {id3}: its seq is damaged ('abc')",
            id="seq-text",
        ),
        pytest.param(
            "UPDATE audit_log SET seq = 2.5 WHERE seq = 3",
            "record id {id3}: its seq is damaged (2.5)",
            id="seq-real",
        ),
        pytest.param(
            "UPDATE audit_log SET detail = x'ff' WHERE seq = 3",
            "record seq 3 (id {id3}, test.event): its detail is damaged (b'\\xff')",
            id="detail-blob",
        ),
        pytest.param(
            "UPDATE audit_log SET actor = x'41' WHERE seq = 3",
            "record seq 3 (id {id3}, test.event): its content does not match its hash (edited)",
            id="actor-blob",
        ),
        pytest.param(
            "UPDATE audit_log SET actor = CAST(x'ff41' AS TEXT) WHERE seq = 3",
            "record seq 3 (id {id3}, test.event): its actor is damaged (b'\\xffA')",
            id="actor-not-utf8",
        ),
        pytest.param(
            "UPDATE audit_seal SET signature = 'abc'",
            "seal at seq 4: the CA signature does not verify",
            id="signature-text",
        ),
        pytest.param(
            "UPDATE audit_seal SET signature = CAST(x'ff00ff' AS TEXT)",
            "seal at seq 4: the CA signature does not verify",
            id="signature-not-utf8",
        ),
        pytest.param(
            "UPDATE audit_seal SET signer_cert_pem = x'ff00'",
            "seal at seq 4: its signer certificate is damaged",
            id="signer-blob",
        ),
        pytest.param(
            "UPDATE audit_seal SET head_hash = CAST(x'ff' AS TEXT)",
            "seal at seq 4: the chain no longer ends in the sealed head",
            id="head-not-utf8",
        ),
        pytest.param(
            "UPDATE audit_seal SET seq = 'abc'",
            "seal id {seal}: its seq is damaged ('abc')",
            id="seal-seq-text",
        ),
    ],
)
def test_a_row_of_the_wrong_type_is_broken_not_a_traceback(
    ctx: Context, damage: str, expected: str
) -> None:
    _records(ctx, 4 - len(audit.list_audit(ctx)))  # 4 records: init's two and two more
    _sealed(ctx)
    with ctx.engine.connect() as connection:
        id3 = connection.execute(sa.text("SELECT id FROM audit_log WHERE seq = 3")).scalar_one()
        seal = connection.execute(sa.text("SELECT id FROM audit_seal")).scalar_one()
    _execute(ctx, damage)
    result = audit.verify(ctx)
    assert not result.ok
    assert expected.format(id3=id3, seal=seal) in result.problems, result.problems


@SQLITE_ONLY
def test_sealing_after_a_damaged_head_or_record_refuses_naming_it(ctx: Context) -> None:
    _records(ctx, 2)
    _sealed(ctx)
    head = max(e.id for e in audit.list_audit(ctx))
    _execute(ctx, "UPDATE audit_log SET seq = 'abc' WHERE id = :id", id=head)
    _records(ctx, 1)
    with pytest.raises(AuditTampered, match=f"the chain's head, record id {head}, is damaged"):
        audit.seal(ctx, settle=dt.timedelta(0))

    _execute(ctx, "UPDATE audit_log SET seq = 99 WHERE id = :id", id=head)
    pending = max(e.id for e in audit.list_audit(ctx))
    _execute(ctx, "UPDATE audit_log SET actor = x'41' WHERE id = :id", id=pending)
    with pytest.raises(AuditTampered, match=f"refused to chain audit record id {pending}: "):
        audit.seal(ctx, settle=dt.timedelta(0))


def test_a_witnessed_head_at_seq_0_is_refused(ctx: Context) -> None:
    _records(ctx, 1)
    _sealed(ctx)
    with pytest.raises(InvalidInput, match="at least 1"):
        audit.verify(ctx, heads=((0, "0" * 64),))


@pytest.mark.parametrize(
    "reason", [RevocationReason.CA_COMPROMISE, RevocationReason.SUPERSEDED], ids=str
)
def test_a_seal_made_in_the_second_of_its_signers_revocation_is_not_broken(
    ctx: Context, clock: FixedClock, reason: RevocationReason
) -> None:
    """A replica's sealer signed with the intermediate it read as active while an emergency
    revocation on another replica committed, in the same whole second: 'audit verify' called
    that honest seal broken, and the trail stayed "broken" for good. Which came first is not
    recorded: the seal is not counted, and the successor's seal covers its records."""
    _records(ctx, 3)
    _sealed(ctx)
    revoke_intermediate(ctx, actor="cli", reason=reason)
    _records(ctx, 2)
    # The old intermediate's seal, made in the revocation's second: the sealer's work as it was
    # then, over the head it read before the revocation's records were chained.
    with Session(ctx.engine) as session:
        old = session.exec(select(CaRow).where(CaRow.state == "revoked")).one()
        cert = x509.load_pem_x509_certificate(old.cert_pem.encode())
        key = load_ca_key(ctx, old).private_key
        assert old.revoked_at == clock.now()
    _forge_head(ctx, cert, key, signed_at=clock.now())
    clock.advance(dt.timedelta(minutes=1))
    _sealed(ctx)  # the successor's, after it

    result = audit.verify(ctx, anchors=_bundle(ctx))
    assert result.ok, result.problems
    assert result.not_counted >= 1


def test_an_emergency_revocation_is_dated_once_it_holds_the_lock(
    ctx: Context, clock: FixedClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It took its time before waiting for the rotation lock (up to 10 s behind a rotation),
    so the revocation was dated before seals other replicas were still honestly making with
    the old intermediate, and those were called broken."""
    from ca import emergency

    taken = emergency.rotation_lock

    def slow_lock(session: Session, authority: str, *, wait: bool = False) -> None:
        clock.advance(dt.timedelta(seconds=8))  # a rotation held it this long
        taken(session, authority, wait=wait)

    before = clock.now()
    monkeypatch.setattr(emergency, "rotation_lock", slow_lock)
    revoke_intermediate(ctx, actor="cli", reason=RevocationReason.KEY_COMPROMISE)
    with Session(ctx.engine) as session:
        old = session.exec(select(CaRow).where(CaRow.state == "revoked")).one()
    assert old.revoked_at == before + dt.timedelta(seconds=8)
