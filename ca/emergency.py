"""Emergency revocation of an issuing intermediate (a suspected key compromise).

One transaction: the active intermediate is marked revoked, a freshly keyed intermediate under
the same root becomes active, and the root's CRL is re-signed to list the old one. There is no
moment without an active intermediate: either the whole switch commits or nothing changes. The
trust bundle (roots) is unchanged, so relying parties need no update; workloads holding SVIDs
from the old intermediate must get new ones (the result lists them). Once it commits, the files
programs read their CRLs from (OpenVPN's CRL file, a gateway's nginx truststore) are rewritten
at once, as after any revocation (``ca.certs.publish_revocations``): until then the revoked
intermediate's clients still get in, and the scheduled jobs may be an hour away.

It is a CA transition like a rotation's: it takes the authority's rotation lock
(``ca.rotation.rotation_lock``, waiting for it) and reads the state under it, so a rotation on
another replica can neither retire the revoked CA nor activate a second intermediate beside the
fresh one. A successor the scheduled rotation prepared before the emergency is revoked with it
and its key destroyed: it was keyed from the same key store before anyone noticed, and would
otherwise be activated later as the "fresh" CA.

The intermediate revoked is the one the caller saw active, read before waiting for the lock (a
compare-and-set): a second request that waited while the first revoked it is refused
(``IntermediateJustRevoked``), naming the replacement, instead of revoking the replacement that
nobody suspected. If a rotation retired it meanwhile, it is revoked all the same, and so is the
successor that rotation activated (prepared before the emergency).

Only the root's key is needed: a compromised intermediate's key may well be gone (deleted from
Vault, its file removed) or replaced, and that must not stop its revocation. The old CA's own
final CRL (listing what it issued and revoked) is signed when its key is still usable, and
otherwise skipped, saying why (``final_crl_skipped``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlmodel import Session, col, select

from ca.authority import (
    MESH,
    AuthorityParams,
    active_issuer,
    ca_row_for,
    destroy_quietly,
    no_such_authority,
    record_event,
    sign_new_ca,
)
from ca.cas import ca_certificate, ca_handle, ca_signer
from ca.certs import CertificateInfo, CertStatus, certificate_info, publish_revocations
from ca.config import Context
from ca.crl import refresh_crl, refresh_crl_if_signable
from ca.durations import Ttl
from ca.errors import Conflict, NotInitialised
from ca.identity import TrustDomain
from ca.keys import KeyHandle, KeyType
from ca.profiles import ca_common_name
from ca.revocation import RevocationReason
from ca.rotation import ca_rows, rotation_lock
from ca.serial import Serial
from ca.store.models import AuthorityRow, CaRow, CertificateRow

__all__ = ["IntermediateJustRevoked", "IntermediateRevoked", "revoke_intermediate"]

log = logging.getLogger("trellis.authority")

# Why a CA other than the one asked for is revoked with it (the audit records' detail).
_SUPERSEDED = "keyed before the emergency: activated by a rotation while the revocation waited"
_DISCARDED = "keyed before the emergency: prepared, never active; its key is destroyed"


@dataclass(frozen=True, slots=True)
class IntermediateRevoked:
    revoked_serial: Serial
    new_serial: Serial
    to_reissue: tuple[CertificateInfo, ...]  # live certificates the revoked intermediate issued
    final_crl_skipped: str | None = None  # why the old CA's own CRL was not re-signed
    # why a CRL file or truststore was not rewritten at once (no server path; the jobs retry)
    publish_error: str | None = None
    # keyed before the emergency and revoked with it: a prepared successor (its key destroyed),
    # or the one a rotation activated while this request waited for the lock
    also_revoked: tuple[Serial, ...] = ()


class IntermediateJustRevoked(Conflict):
    """The intermediate this request found active was revoked by another request while it
    waited for the authority's rotation lock. Revoking the replacement instead would withdraw a
    CA nobody suspected: the caller is told which one issues now, and asks again to revoke it."""


def revoke_intermediate(
    ctx: Context,
    *,
    actor: str,
    authority: str = MESH,
    reason: RevocationReason = RevocationReason.CA_COMPROMISE,
) -> IntermediateRevoked:
    """``actor`` and the request being served go into the audit trail as for any revocation
    (``cli`` or ``admin-token:<id>``, and the caller's ``X-Request-ID`` or the command's
    ``cli-<hex>``: ``ca.audit.entry`` reads ``ca.logs.REQUEST_ID``); the records say it was an
    emergency, and why, in their detail."""
    meant = _active_serial(ctx, authority)  # what the caller is revoking, before any wait
    created: list[KeyHandle] = []
    try:
        with Session(ctx.engine) as session:
            rotation_lock(session, authority, wait=True)
            auth = session.get(AuthorityRow, authority)
            if auth is None:
                raise no_such_authority(authority)
            active = next(iter(ca_rows(session, authority, "intermediate", "active")), None)
            old = _target(session, authority, meant, active)
            root = session.get(CaRow, (active or old).parent_id)  # the root issuing now
            assert root is not None
            handle = ctx.keys.create(
                KeyType(old.key_type), f"{authority}-intermediate", old.key_backend
            )
            created.append(handle)
            params = AuthorityParams(
                trust_domain=TrustDomain(auth.trust_domain) if auth.trust_domain else None,
                key_type=KeyType(old.key_type),
                ca_ttl=Ttl(auth.ca_ttl_seconds),
                svid_ttl=Ttl(auth.svid_ttl_seconds),
                name=authority,
                purpose=auth.purpose,
            )
            cert = sign_new_ca(
                ctx,
                handle,
                common_name=ca_common_name(params.label, "intermediate"),
                params=params,
                ttl=params.ca_ttl,
                issuer=(ca_certificate(ctx, root), ca_signer(ctx, root)),
            )
            # The revocation's time: once it holds the lock and has its successor, as close
            # to its commit as it can be. Taken before the wait (up to 10 s behind a rotation),
            # it dated the revocation before seals the other replicas' sealers were still
            # honestly making with the old intermediate, and 'audit verify' called them broken.
            now = ctx.clock.now()
            why = {"emergency": True, "reason": reason.value}
            superseded = [active] if active is not None and active.id != old.id else []
            prepared = ca_rows(session, authority, "intermediate", "prepared")
            for row in (old, *superseded, *prepared):
                row.state, row.revoked_at, row.revocation_reason = "revoked", now, reason.value
                session.add(row)
            session.flush()  # before the replacement is active: one active intermediate
            new = ca_row_for(authority, "intermediate", cert, handle, now)
            new.parent_id = root.id
            session.add(new)
            session.flush()
            record_event(session, old, "revoked", actor, now, detail=why)
            for rows, note in ((superseded, _SUPERSEDED), (prepared, _DISCARDED)):
                for row in rows:
                    record_event(session, row, "revoked", actor, now, detail={**why, "why": note})
            record_event(session, new, "activated", actor, now, detail=why)
            for parent in _parents(session, [old, *superseded, *prepared]):
                refresh_crl(ctx, session, parent)
            skipped = refresh_crl_if_signable(ctx, session, old)  # old is revoked by now
            for row in superseded:
                refresh_crl_if_signable(ctx, session, row)
            live = session.exec(
                select(CertificateRow).where(
                    col(CertificateRow.issuer_ca_id).in_([old.id, *(r.id for r in superseded)]),
                    CertificateRow.status == "active",
                    col(CertificateRow.not_after) > now,
                )
            ).all()
            to_reissue = tuple(
                info
                for info in (certificate_info(row, now) for row in live)
                if info.status is CertStatus.ACTIVE
            )
            revoked_serial = Serial.parse(old.serial)
            also = tuple(Serial.parse(row.serial) for row in (*superseded, *prepared))
            discarded_keys = [ca_handle(row) for row in prepared]
            session.commit()
    except BaseException:
        destroy_quietly(ctx, created)
        raise
    _destroy_discarded(ctx, discarded_keys)
    ctx.cache.clear()
    issuer = active_issuer(ctx, authority)
    # After the commit, and never undoing it: a file that cannot be written is reported.
    failures = publish_revocations(ctx, {authority})
    return IntermediateRevoked(
        revoked_serial,
        Serial(issuer.certificate.serial_number),
        to_reissue,
        skipped,
        "; ".join(failures) or None,
        also,
    )


def _active_serial(ctx: Context, authority: str) -> str | None:
    """The serial of the intermediate the caller sees issuing, read before the lock is waited
    for: what the caller means to revoke."""
    with Session(ctx.engine) as session:
        active = ca_rows(session, authority, "intermediate", "active")
    return active[0].serial if active else None


def _target(session: Session, authority: str, meant: str | None, active: CaRow | None) -> CaRow:
    """The intermediate to revoke, read again under the lock: the one the caller saw active,
    whatever became of it since, unless another request revoked it already."""
    if meant is None:  # the caller saw nothing issuing: whatever issues now, it did not mean
        raise NotInitialised(f"authority {authority!r} has no active intermediate to revoke")
    row = session.exec(
        select(CaRow).where(CaRow.authority == authority, CaRow.serial == meant)
    ).first()
    if row is None or row.parent_id is None:  # an init --force replaced the authority meanwhile
        raise Conflict(
            f"authority {authority!r} was initialised again while this request waited: its "
            "intermediate is not the one the request was for; nothing was changed"
        )
    if row.state == "revoked":
        replacement = active.serial if active is not None else "none"
        raise IntermediateJustRevoked(
            f"the intermediate {row.serial} of authority {authority!r} was just revoked by "
            f"another request; the replacement is {replacement}: nothing was changed (run it "
            "again only if the replacement is to be revoked too)"
        )
    return row


def _parents(session: Session, rows: list[CaRow]) -> list[CaRow]:
    """The roots whose CRLs list ``rows``, each once."""
    ids = sorted({row.parent_id for row in rows if row.parent_id is not None})
    return [root for root in (session.get(CaRow, i) for i in ids) if root is not None]


def _destroy_discarded(ctx: Context, handles: list[KeyHandle]) -> None:
    """The revocation has committed: a key that cannot be destroyed must not undo it (the CA is
    revoked, listed on its root's CRL, and can never be activated), so it is logged for an
    operator to remove."""
    for handle in handles:
        try:
            ctx.keys.destroy(handle)
        except Exception:
            log.error(
                "the key %s/%s of a discarded intermediate could not be destroyed: remove it "
                "by hand",
                handle.backend,
                handle.ref,
            )
