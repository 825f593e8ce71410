"""Removing an Istio cluster: Trellis stops renewing its plug-in CA intermediate.

A cluster recorded by ``trellis istio issue`` is renewed by the ``istio-intermediates`` job
until it is removed, so a decommissioned cluster, or an output that no longer exists, would
get a new intermediate (and, for a path, a new CA private key written there) every renewal.
Removal forgets the cluster and leaves its output alone: the ``cacerts`` Secret or files stay
where they are, istiod keeps signing with the intermediate until it expires.

Revoking is an option, not the default: istiod signs workload certificates with the current
intermediate, and once it is on the root's CRL every peer that checks CRLs (``ca-crl.pem``, a
Trellis SVID holder with CRL checks) refuses the whole mesh. ``revoke=True`` is for a cluster
that is gone or whose key is to be withdrawn: it revokes every unexpired intermediate Trellis
issued to the cluster (the current one, those it replaced, undelivered ones), reason
cessationOfOperation (RFC 5280 §5.3.1).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlmodel import Session, col, select

from ca import audit
from ca.certs import CertificateInfo, revoke_certificate
from ca.config import Context
from ca.errors import Conflict, NotFound
from ca.kubectl import dns_label
from ca.revocation import RevocationReason
from ca.serial import Serial
from ca.store import locks
from ca.store.models import CertificateRow, IstioClusterRow

__all__ = ["RemovedCluster", "remove_cluster"]

PROFILE = "istio-intermediate"


@dataclass(frozen=True, slots=True)
class RemovedCluster:
    cluster: str
    serial: str  # the intermediate last issued to it
    not_after: dt.datetime
    output: str | None  # the recorded output, left as it is
    kubeconfig: str | None
    revoked: tuple[CertificateInfo, ...] = ()


def _live_intermediates(session: Session, cluster: str, now: dt.datetime) -> list[str]:
    """Every unexpired, unrevoked intermediate issued to ``cluster``: ``requested_by`` ends in
    ``(istio cluster NAME)`` (``ca.istio.issue_istio_intermediate``), oldest first."""
    rows = session.exec(
        select(CertificateRow)
        .where(
            CertificateRow.profile == PROFILE,
            CertificateRow.status == "active",
            col(CertificateRow.not_after) > now,
        )
        .order_by(col(CertificateRow.created_at), col(CertificateRow.serial))
    ).all()
    suffix = f"(istio cluster {cluster})"
    return [row.serial for row in rows if row.requested_by.endswith(suffix)]


def remove_cluster(
    ctx: Context, cluster: str, *, revoke: bool = False, actor: str = "cli"
) -> RemovedCluster:
    """Forget ``cluster`` so that no renewal is issued to it again (a renewal the job was
    already making is dropped: it issues only while the record it renews is unchanged), and
    with ``revoke`` revoke its live intermediates. Audited as ``istio.cluster.removed``."""
    dns_label(cluster, "a cluster name")
    now = ctx.clock.now()
    with Session(ctx.engine) as session:
        # The write lock before the read on SQLite, where FOR UPDATE locks nothing: read
        # before it, two removals both found the row and both were recorded.
        locks.begin_write(session.connection())
        row = session.get(IstioClusterRow, cluster, with_for_update=True)
        if row is None:
            raise NotFound(f"no Istio cluster {cluster!r} is recorded (trellis istio list)")
        serials = _live_intermediates(session, cluster, now) if revoke else []
        removed = RemovedCluster(cluster, row.serial, row.not_after, row.output, row.kubeconfig)
        session.delete(row)
        audit.record(
            session,
            "istio.cluster.removed",
            f"istio cluster {cluster}",
            actor=actor,
            at=now,
            detail={"serial": row.serial, "authority": row.authority, "revoke": serials},
        )
        session.commit()
    revoked = []
    for serial in serials:
        try:
            revoked.append(
                revoke_certificate(
                    ctx, Serial.parse(serial), RevocationReason.CESSATION_OF_OPERATION, actor
                )
            )
        except Conflict:
            continue  # revoked meanwhile: on the CRL either way
    return RemovedCluster(
        removed.cluster,
        removed.serial,
        removed.not_after,
        removed.output,
        removed.kubeconfig,
        tuple(revoked),
    )
