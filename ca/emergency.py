"""Emergency revocation of an issuing intermediate (a suspected key compromise).

One transaction: the active intermediate is marked revoked, a freshly keyed intermediate under
the same root becomes active, and the root's CRL is re-signed to list the old one. There is no
moment without an active intermediate: either the whole switch commits or nothing changes. The
trust bundle (roots) is unchanged, so relying parties need no update; workloads holding SVIDs
from the old intermediate must get new ones (the result lists them). Once it commits, the files
programs read their CRLs from (OpenVPN's CRL file, a gateway's nginx truststore) are rewritten
at once, as after any revocation (``ca.certs.publish_revocations``): until then the revoked
intermediate's clients still get in, and the scheduled jobs may be an hour away.

Only the root's key is needed: a compromised intermediate's key may well be gone (deleted from
Vault, its file removed) or replaced, and that must not stop its revocation. The old CA's own
final CRL (listing what it issued and revoked) is signed when its key is still usable, and
otherwise skipped, saying why (``final_crl_skipped``).
"""

from __future__ import annotations

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
from ca.cas import ca_certificate, ca_signer
from ca.certs import CertificateInfo, CertStatus, certificate_info, publish_revocations
from ca.config import Context
from ca.crl import refresh_crl, refresh_crl_if_signable
from ca.durations import Ttl
from ca.errors import NotInitialised
from ca.identity import TrustDomain
from ca.keys import KeyHandle, KeyType
from ca.profiles import ca_common_name
from ca.revocation import RevocationReason
from ca.serial import Serial
from ca.store.models import AuthorityRow, CaRow, CertificateRow

__all__ = ["IntermediateRevoked", "revoke_intermediate"]


@dataclass(frozen=True, slots=True)
class IntermediateRevoked:
    revoked_serial: Serial
    new_serial: Serial
    to_reissue: tuple[CertificateInfo, ...]  # live certificates the revoked intermediate issued
    final_crl_skipped: str | None = None  # why the old CA's own CRL was not re-signed
    # why a CRL file or truststore was not rewritten at once (no server path; the jobs retry)
    publish_error: str | None = None


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
    now = ctx.clock.now()
    created: list[KeyHandle] = []
    try:
        with Session(ctx.engine) as session:
            old = session.exec(
                select(CaRow)
                .where(
                    CaRow.authority == authority,
                    CaRow.role == "intermediate",
                    CaRow.state == "active",
                )
                .order_by(col(CaRow.not_after).desc())
                .with_for_update()
            ).first()
            auth = session.get(AuthorityRow, authority)
            if auth is None:
                raise no_such_authority(authority)
            if old is None or old.parent_id is None:
                raise NotInitialised(
                    f"authority {authority!r} has no active intermediate to revoke"
                )
            root = session.get(CaRow, old.parent_id)
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
            old.state, old.revoked_at, old.revocation_reason = "revoked", now, reason.value
            session.add(old)
            new = ca_row_for(authority, "intermediate", cert, handle, now)
            new.parent_id = root.id
            session.add(new)
            session.flush()
            why = {"emergency": True, "reason": reason.value}
            record_event(session, old, "revoked", actor, now, detail=why)
            record_event(session, new, "activated", actor, now, detail=why)
            refresh_crl(ctx, session, root)
            skipped = refresh_crl_if_signable(ctx, session, old)  # old is revoked by now
            live = session.exec(
                select(CertificateRow).where(
                    CertificateRow.issuer_ca_id == old.id,
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
            session.commit()
    except BaseException:
        destroy_quietly(ctx, created)
        raise
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
    )
