"""Root rotation by explicit, re-runnable steps, with cross-signing both ways.

1. publish: a new root joins the bundle; each root cross-signs the other, so during the overlap
   a relying party that trusts only one of them can still build a path to SVIDs of either
   hierarchy (issuers add the cross certificate to their chain);
2. switch (after the overlap): issuing moves to a fresh intermediate under the new root; the old
   root is "retiring", still trusted;
3. retire: the old root leaves the bundle, refused while certificates chaining only to it are
   still valid (unless forced); both cross certificates are revoked (listed on their issuers'
   CRLs) and the old root's key is destroyed, so nothing can chain to the old root any more.

Every step rewrites ``<data dir>/bundle.pem`` for the mesh (``ca.bundle.write_bundle_file``).

``trellis authority status`` shows the step and when the next one may run. See docs/rotation.md.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from ca.authority import MESH, ca_row_for, destroy_quietly, sign_new_ca
from ca.bundle import sync_bundle, write_bundle_file
from ca.cas import ca_certificate, ca_handle, ca_signer
from ca.checks import check_ca
from ca.config import Context
from ca.crl import refresh_crl
from ca.durations import Ttl
from ca.errors import Conflict
from ca.identity import TrustDomain
from ca.keys import KeyHandle, KeyType
from ca.profiles import BACKDATE, CaSpec, RevocationUrls, ca_builder, ca_common_name, sign
from ca.revocation import RevocationReason
from ca.rotation import (
    Rotator,
    Transition,
    authority_params,
    ca_rows,
    rotation_lock,
    validate_new_ca,
)
from ca.serial import Serial
from ca.store.models import CaRow, CertificateRow, IstioClusterRow, RootRotationRow

__all__ = ["RootRotation", "rotate_root"]

log = logging.getLogger("trellis.authority")
NAMED = 5  # certificates a refused retirement names


def _cross_sign(rotator: Rotator, subject: CaRow, issuer: CaRow) -> CaRow:
    """A certificate for ``subject``'s name and key, signed by ``issuer``: a second path to it."""
    subject_cert = ca_certificate(rotator.ctx, subject)
    issuer_cert = ca_certificate(rotator.ctx, issuer)
    td = TrustDomain(rotator.auth.trust_domain) if rotator.auth.trust_domain else None
    spec = CaSpec(
        subject=subject_cert.subject,
        public_key=subject_cert.public_key(),  # type: ignore[arg-type]
        spiffe_id=td.id() if td else None,
        serial=Serial.generate(),
        not_before=rotator.now - BACKDATE,
        not_after=min(subject_cert.not_valid_after_utc, issuer_cert.not_valid_after_utc),
        path_length=None,
        issuer=issuer_cert,
        # the signing root's CRL lists it once retired, and its OCSP responder answers for it
        urls=(
            RevocationUrls.under(public_url, rotator.auth.name, issuer_cert.serial_number)
            if (public_url := rotator.ctx.settings.public_url)
            else None
        ),
    )
    cert = sign(ca_builder(spec), ca_signer(rotator.ctx, issuer))
    check_ca(cert, issuer_cert, td.id() if td else None)
    handle = ca_handle(subject)
    row = ca_row_for(rotator.auth.name, "cross", cert, handle, rotator.now)
    row.parent_id, row.cross_for_id = issuer.id, subject.id
    rotator.session.add(row)
    rotator.session.flush()
    rotator.event(row, "cross-signed")
    return row


@dataclass(frozen=True, slots=True)
class RootRotation:
    step: str  # published | switched | retired
    old_root: str
    new_root: str
    switch_after: dt.datetime
    done: tuple[Transition, ...]


def rotate_root(
    ctx: Context,
    authority: str = MESH,
    *,
    overlap: Ttl = Ttl(7 * 86400),
    step: bool = False,
    force: bool = False,
    actor: str = "cli",
) -> RootRotation:
    """Root rotation, one explicit step per call (re-running a call that has nothing to do is a
    no-op that reports the state):

    1. ``rotate_root()`` — publish: a new root, cross-signed both ways, joins the bundle.
    2. ``rotate_root(step=True)`` after ``overlap`` — switch: issuing moves to a new intermediate
       under the new root; the old root is "retiring" but still trusted.
    3. ``rotate_root(step=True)`` — retire: the old root leaves the bundle (refused while
       certificates from the old hierarchy are still valid, unless ``force``), its cross
       certificates are revoked and its key destroyed.

    Concurrent calls are serialised by ``rotation_lock``; one that finds the lock held raises
    ``RotationInProgress`` (a ``Conflict``). The step a call takes is the one after the state it
    read before waiting for the lock (a compare-and-set): one that waited while another acted
    finds the state moved, reports it and changes nothing, so two ``--step`` runs at once cannot
    switch and retire.
    """
    with Session(ctx.engine) as session:
        expected = _position(session.get(RootRotationRow, authority))
    rotator: Rotator | None = None
    retired_key: KeyHandle | None = None
    try:
        with Session(ctx.engine) as session:
            rotation_lock(session, authority)
            rotator = Rotator(ctx, session, authority, actor)
            now = rotator.now
            state = session.get(RootRotationRow, authority)
            moved = _position(state) != expected  # another run acted while this one waited
            if state is None and step:
                raise Conflict("no root rotation in progress: start one before stepping it")
            if state is not None and moved:
                pass  # report the state the other run left
            elif state is None or (state.step == "retired" and not step):
                state = _publish(rotator, overlap, state)
            elif step and state.step == "published":
                early = now < state.switch_after
                if early and not force:
                    raise Conflict(
                        f"the overlap lasts until {state.switch_after.isoformat()}: relying "
                        "parties may not have the new root yet (a forced step switches anyway)"
                    )
                overridden = {"overlap_until": state.switch_after.isoformat()}
                _switch(rotator, state, _forced(overridden) if early else None)
            elif step and state.step == "switched":
                retired_key = _retire(rotator, state, force)
            sync_bundle(session, authority, now)
            result = RootRotation(
                step=state.step,
                old_root=_serial(session, state.old_root_id),
                new_root=_serial(session, state.new_root_id),
                switch_after=state.switch_after,
                done=tuple(rotator.done),
            )
            session.commit()
    except BaseException:
        if rotator is not None:
            destroy_quietly(ctx, rotator.created)
        raise
    ctx.cache.clear()
    if retired_key is not None:
        _destroy_retired(ctx, retired_key)
    if authority == MESH:
        write_bundle_file(ctx)
    return result


def _forced(overridden: dict[str, Any]) -> dict[str, Any]:
    """The detail of a step's audit record when only ``force`` let it happen, with what it
    overrode: the refusal it skipped is in no record, and an auditor must be able to tell a
    step taken early, or past certificates it breaks, from one that was due (docs/rotation.md).
    A step that was due anyway records no ``forced``, whether ``--force`` was given or not."""
    return {"forced": True, **overridden}


def _position(state: RootRotationRow | None) -> tuple[int, str] | None:
    """Where a rotation stands: its new root and step (a later rotation has another root)."""
    return None if state is None else (state.new_root_id, state.step)


def _destroy_retired(ctx: Context, handle: KeyHandle) -> None:
    """The retirement has committed: a failure to destroy the key must not undo it or hide it
    (a re-run has nothing left to do), so it is logged for an operator to remove the key."""
    try:
        ctx.keys.destroy(handle)
    except Exception:
        log.error(
            "the retired root's key %s/%s could not be destroyed: remove it by hand",
            handle.backend,
            handle.ref,
        )


def _serial(session: Session, ca_id: int) -> str:
    row = session.get(CaRow, ca_id)
    return row.serial if row else "?"


def _publish(rotator: Rotator, overlap: Ttl, previous: RootRotationRow | None) -> RootRotationRow:
    session, auth = rotator.session, rotator.auth
    old = ca_rows(session, auth.name, "root", "active")[0]
    key_type = KeyType(old.key_type)
    handle = rotator.ctx.keys.create(key_type, f"{auth.name}-root", old.key_backend)
    rotator.created.append(handle)
    old_cert = ca_certificate(rotator.ctx, old)
    life = Ttl(
        max(1, int((old_cert.not_valid_after_utc - old_cert.not_valid_before_utc).total_seconds()))
    )
    params = authority_params(auth, key_type)
    cert = sign_new_ca(
        rotator.ctx,
        handle,
        common_name=ca_common_name(params.label, "root"),
        params=params,
        ttl=life,
        issuer=None,
    )
    validate_new_ca(cert, rotator.ctx.keys.load(handle))
    new = ca_row_for(auth.name, "root", cert, handle, rotator.now)
    new.state = "prepared"
    session.add(new)
    session.flush()
    rotator.event(new, "root-published")
    _cross_sign(rotator, new, old)  # new root's key, vouched for by the old root
    _cross_sign(rotator, old, new)  # and the other way round
    assert old.id is not None and new.id is not None
    if previous is not None:
        session.delete(previous)
        session.flush()
    state = RootRotationRow(
        authority=auth.name,
        old_root_id=old.id,
        new_root_id=new.id,
        step="published",
        started_at=rotator.now,
        switch_after=rotator.now + overlap.delta,
    )
    session.add(state)
    return state


def _switch(rotator: Rotator, state: RootRotationRow, forced: dict[str, Any] | None) -> None:
    session = rotator.session
    old, new = session.get(CaRow, state.old_root_id), session.get(CaRow, state.new_root_id)
    assert old is not None and new is not None
    old.state, new.state = "retiring", "active"
    session.add_all([old, new])
    rotator.event(new, "root-switched", forced)
    active = next(iter(ca_rows(session, rotator.auth.name, "intermediate", "active")), None)
    key_type = KeyType(active.key_type) if active else KeyType.EC_P256
    backend = active.key_backend if active else new.key_backend
    for stale in ca_rows(session, rotator.auth.name, "intermediate", "prepared"):
        stale.state = "retired"  # prepared under the old root: never used
        session.add(stale)
    prepared = rotator.prepare_intermediate(new, key_type, backend)
    rotator.activate(prepared)
    state.step = "switched"
    session.add(state)
    _warn_istio_clusters(session, old)


def _warn_istio_clusters(session: Session, old: CaRow) -> None:
    """Istio clusters keep signing with the intermediate they hold, under the old root, until
    it is re-issued (the renewal job does so only at 2/3 of its life): the retirement waits for
    it, so the operator should re-issue them now (docs/istio.md)."""
    clusters = session.exec(
        select(IstioClusterRow.cluster)
        .join(CertificateRow, col(CertificateRow.serial) == col(IstioClusterRow.serial))
        .where(IstioClusterRow.authority == old.authority, CertificateRow.issuer_ca_id == old.id)
        .order_by(col(IstioClusterRow.cluster))
    ).all()
    if clusters:
        log.warning(
            "Istio cluster(s) %s still have an intermediate under the old root: re-issue them "
            "under the new root before retiring it",
            ", ".join(clusters),
        )


def _retire(rotator: Rotator, state: RootRotationRow, force: bool) -> KeyHandle:
    """Retire the old root; returns its key, to destroy once this commits.

    Refused (unless ``force``) while a certificate of the old hierarchy is valid: one issued by
    an intermediate under the old root (SVIDs), or one the old root signed itself (an Istio
    cluster's intermediate, recorded with the root as its issuer). The CA rows the rotation
    manages (its intermediates, the cross certificates) are not issued certificates."""
    session, now = rotator.session, rotator.now
    old = session.get(CaRow, state.old_root_id)
    assert old is not None
    under_old = [
        row.id
        for row in session.exec(
            select(CaRow).where(CaRow.parent_id == old.id, CaRow.role == "intermediate")
        ).all()
    ]
    valid = (CertificateRow.status == "active", col(CertificateRow.not_after) > now)
    blocking = col(CertificateRow.issuer_ca_id).in_([*under_old, old.id])
    count = session.exec(
        select(sa.func.count()).select_from(CertificateRow).where(blocking, *valid)
    ).one()
    if count and not force:
        latest = session.exec(
            select(CertificateRow)
            .where(blocking, *valid)
            .order_by(col(CertificateRow.not_after).desc(), col(CertificateRow.serial))
            .limit(NAMED)
        ).all()
        direct = session.exec(
            select(CertificateRow)
            .where(CertificateRow.issuer_ca_id == old.id, *valid)
            .order_by(col(CertificateRow.not_after))
        ).all()
        raise Conflict(_still_valid(count, latest) + _signed_by_old_root(direct))
    old.state = "retired"
    session.add(old)
    rotator.event(old, "root-retired", _forced({"still_valid": count}) if count else None)
    _end_cross_certificates(rotator, old)
    state.step = "retired"
    session.add(state)
    return ca_handle(old)


def _still_valid(count: int, latest: Sequence[CertificateRow]) -> str:
    """Names what holds the retirement up, latest to expire first, so the operator can tell a
    certificate to wait for (an SVID, gone within its TTL) from one to revoke (a serving or
    OpenVPN server certificate a replica or node no longer presents, which lives as long as the
    old intermediate): the count alone left them guessing which."""
    named = [
        f"{r.serial} {_shortened(r.spiffe_id)} ({r.profile}, until {r.not_after.isoformat()})"
        for r in latest
    ]
    more = f" and {count - len(latest)} more" if count > len(latest) else ""
    return (
        f"{count} certificate(s) from the old hierarchy stay valid until "
        f"{latest[0].not_after.isoformat()}: " + ", ".join(named) + more + "; retiring the old "
        "root now would break them: wait until they expire, revoke those no longer in use, "
        "or force the step"
    )


def _shortened(identity: str, limit: int = 80) -> str:
    """An identity may be 2048 bytes long: five of them would bury the advice that follows."""
    return identity if len(identity) <= limit else identity[: limit - 1] + "…"


def _signed_by_old_root(rows: Sequence[CertificateRow]) -> str:
    """Names what the old root signed itself: Istio intermediates live 30 days by default, so
    waiting is seldom the answer; re-issuing the cluster under the new root is."""
    if not rows:
        return ""
    named = [f"{r.profile} {r.serial[:16]} ({r.requested_by})" for r in rows[:5]]
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    return (
        "; signed by the old root itself: " + ", ".join(named) + more + " (re-issue those "
        "Istio clusters under the new root, then revoke the replaced intermediates once their "
        "workload certificates have been renewed)"
    )


def _end_cross_certificates(rotator: Rotator, old: CaRow) -> None:
    """Retiring the old root ends every trust path through it. "Old signed by new" would
    otherwise let anyone holding the old key mint certificates that verify against the new root
    alone until the cross certificate expires (years): it is revoked and listed on the new root's
    CRL (and OCSP), like "new signed by old" on the old root's final CRL. RFC 5280 §5.3.1:
    cessationOfOperation, the certificate is no longer needed for its purpose. The old key is
    destroyed once this commits, so it can sign nothing more."""
    session, now = rotator.session, rotator.now
    crosses = session.exec(
        select(CaRow).where(
            CaRow.role == "cross",
            sa.or_(col(CaRow.cross_for_id) == old.id, col(CaRow.parent_id) == old.id),
            col(CaRow.revoked_at).is_(None),
        )
    ).all()
    issuers = {old.id: old}
    for row in crosses:
        row.state, row.revoked_at = "revoked", now
        row.revocation_reason = RevocationReason.CESSATION_OF_OPERATION.value
        session.add(row)
        session.flush()
        rotator.event(row, "cross-revoked")
        if row.parent_id is not None and row.parent_id not in issuers:
            issuer = session.get(CaRow, row.parent_id)
            assert issuer is not None
            issuers[row.parent_id] = issuer
    for issuer in issuers.values():
        refresh_crl(rotator.ctx, session, issuer, final=issuer is old)
