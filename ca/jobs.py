"""Scheduled maintenance, run inside ``trellis serve`` (see ``ca.scheduler``) and by hand.

Every job is idempotent. Each ``trellis serve`` schedules every job (``ca.scheduler``); on
PostgreSQL a run first takes an advisory lock of the job's ``Scope`` and reads the job's record
under it, so that a cluster-wide job runs about once per interval across the replicas, one run
at a time, and a node's job once per interval on each node. The transitions a job performs
re-check their state under their own lock, so even a job that ran twice would change nothing
twice.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlmodel import Session, col, select

from ca import audit, gateway
from ca.bundle import sync_bundle
from ca.config import Context
from ca.crl import refresh_stale_crls
from ca.errors import TrellisError, Unavailable
from ca.federation import list_federations, refresh_due
from ca.istio import RENEWAL_INTERVAL, renew_due_clusters
from ca.openvpn import crl_health, renew_server_certificates, write_crl_files
from ca.readiness import check_issuing_cas
from ca.rotation import RotationInProgress, rotate
from ca.serving import ensure_server_certificate
from ca.store.models import AuthorityRow, RenewalNonceRow

__all__ = ["JOBS", "Job", "Scope", "catch_up", "job_named"]

log = logging.getLogger("trellis.jobs")


def rotate_cas(ctx: Context) -> str:
    """Prepare/activate intermediates when due, and re-publish bundles whose content aged.

    An authority whose rotation lock is held elsewhere (an operator's ``authority rotate``,
    another replica) is skipped this run, not failed: like a job whose lock another replica
    holds, it is no fault to alert on, and the next run, seconds later, does what is due."""
    done = []
    for name in _authorities(ctx):
        done += _rotate_authority(ctx, name)
    return "; ".join(done) or "nothing due"


def _authorities(ctx: Context) -> list[str]:
    with Session(ctx.engine) as session:
        return list(session.exec(select(AuthorityRow.name)).all())


def _rotate_authority(ctx: Context, name: str) -> list[str]:
    try:
        transitions = rotate(ctx, name)
    except RotationInProgress:
        return [f"{name}: skipped, another rotation is running"]
    with Session(ctx.engine) as session:
        sync_bundle(session, name, ctx.clock.now())
        session.commit()
    return [f"{name}: {t.event} {t.serial[:12]}" for t in transitions]


def catch_up(ctx: Context) -> None:
    """Start-up: perform overdue rotations before anything is issued.

    A transition that fails while the authority's active intermediate still issues (a prepared
    key replaced since it was validated stops its activation, docs/rotation.md) is logged, and
    start-up goes on, as a running server goes on issuing: the ``ca-rotation`` job, which the
    scheduler runs at once, retries and records it. Only a failure that leaves the authority
    nothing to issue with (its active intermediate expired or missing) stops start-up."""
    done = []
    for name in _authorities(ctx):
        try:
            done += _rotate_authority(ctx, name)
        except TrellisError as exc:
            try:
                check_issuing_cas(ctx, name)
            except Unavailable:
                raise exc from None
            log.warning("job ca-rotation: %s: %s: %s", name, type(exc).__name__, exc.detail)
            done.append(f"{name}: failed, its active intermediate issues on")
    log.info("job ca-rotation: %s", "; ".join(done) or "nothing due")


def resign_crls(ctx: Context) -> str:
    refreshed = refresh_stale_crls(ctx)
    return f"re-signed {len(refreshed)} CRL(s)"


def renew_server_certificate(ctx: Context) -> str:
    """Keep the serving certificate fresh (files on disk; the listener reloads them). The result
    is read over HTTP (``GET /v1/jobs``): where the files are goes to the log only."""
    tls = ensure_server_certificate(ctx)
    if tls.rechained:
        return "wrote the issuer's current chain after the serving certificate"
    if tls.issued is None:
        return "serving certificate current"
    log.info("renewed the serving certificate in %s (serial %s)", tls.cert_path, tls.issued)
    return f"renewed the serving certificate: serial {tls.issued.hex[:12]}"


def renew_istio_intermediates(ctx: Context) -> str:
    """Renew due intermediates and refresh the root's CRL in ``ca-crl.pem`` outputs."""
    return ", ".join(renew_due_clusters(ctx)) or "nothing due"


def refresh_federated_bundles(ctx: Context) -> str:
    """Fetch each federated bundle whose refresh hint has elapsed. While any relationship's
    last attempt failed (its last good bundle is kept) the run fails, so ``trellis jobs list``
    and ``/readyz`` show it until the partner's endpoint answers again."""
    results = refresh_due(ctx)
    failing = [f"{f.trust_domain}: {f.last_error}" for f in list_federations(ctx) if f.last_error]
    if failing:
        raise Unavailable("; ".join(failing))
    return ", ".join(f"{r.trust_domain} seq {r.sequence}" for r in results) or "nothing due"


def seal_audit(ctx: Context) -> str:
    """In a server, the loop serving requests seals, between them (``audit.seal_on_loop``);
    this thread only waits for it. Elsewhere (no loop, or it has stopped) this thread seals."""
    loop = ctx.serving_loop
    if loop is not None and loop.is_running():
        with audit.one_sealer(ctx):  # taken here: the loop must not wait for it
            sealing = audit.seal_on_loop(ctx, sign_every=audit.SIGN_EVERY)
            result = asyncio.run_coroutine_threadsafe(sealing, loop).result()
    else:
        result = audit.seal(ctx, sign_every=audit.SIGN_EVERY, pause=True)
    return f"sealed {result.records} audit record(s)"


def prune_renewal_nonces(ctx: Context) -> str:
    """A spent proof's jti is only needed until the proof itself expires."""
    with Session(ctx.engine) as session:
        result = session.execute(
            sa.delete(RenewalNonceRow).where(col(RenewalNonceRow.expires_at) < ctx.clock.now())
        )
        session.commit()
    return f"pruned {result.rowcount} spent renewal proof(s)"  # type: ignore[attr-defined]


def _renew_openvpn_servers(ctx: Context) -> str:
    renewed = renew_server_certificates(ctx)
    return "renewed " + ", ".join(renewed) if renewed else "nothing due"


def write_openvpn_crls(ctx: Context) -> str:
    """Keep OpenVPN CRL files current; fail while ``crl_health`` sees a problem (``/readyz``)."""
    written = write_crl_files(ctx)
    problem = crl_health(ctx)
    if problem:
        raise problem
    return f"{len(written)} OpenVPN CRL file(s) current"


class Scope(enum.Enum):
    """What one run of a job keeps current, so where it must run and what excludes it."""

    # Shared state (the database, CA keys): any one replica's run does it for all, so a run is
    # skipped while another replica's is in progress, or when one ran within the interval.
    CLUSTER = "cluster"
    # Files on the node it runs on (``Settings.node_name``): a gateway truststore, an OpenVPN
    # CRL file or server directory read by a server beside it. No other node's run writes them,
    # so each node runs it; only another process of the same node skips it meanwhile (or when
    # one ran it within the interval).
    NODE = "node"
    # The process's own files (its serving certificate in its data directory): every replica.
    REPLICA = "replica"


@dataclass(frozen=True, slots=True)
class Job:
    name: str
    every_seconds: int
    run: Callable[[Context], str]
    description: str
    scope: Scope = Scope.CLUSTER


JOBS = (
    Job("ca-rotation", 10, rotate_cas, "prepare, activate and retire intermediates; prune bundles"),
    Job("crl-resign", 60, resign_crls, "re-sign CRLs well before nextUpdate"),
    Job(
        "openvpn-crl",
        60,
        write_openvpn_crls,
        "rewrite OpenVPN CRL files before nextUpdate",
        Scope.NODE,
    ),
    Job(
        "openvpn-server-certificate",
        300,
        _renew_openvpn_servers,
        "renew OpenVPN server certificates into their server-config directory",
        Scope.NODE,
    ),
    Job(
        "server-certificate",
        10,
        renew_server_certificate,
        "renew this replica's serving certificate",
        Scope.REPLICA,
    ),
    Job(
        "istio-intermediates",
        int(RENEWAL_INTERVAL.total_seconds()),
        renew_istio_intermediates,
        "renew Istio plug-in intermediates",
    ),
    Job("federation-refresh", 10, refresh_federated_bundles, "fetch federated trust bundles"),
    Job(
        "gateway-truststores",
        300,
        gateway.refresh_job,
        "rewrite this node's gateway truststores and CRLs",
        Scope.NODE,
    ),
    Job(
        "audit-seal",
        2,
        seal_audit,
        f"hash-chain settled audit records, sign the head every {audit.SIGN_EVERY.seconds} s",
    ),
    Job("prune-renewal-nonces", 3600, prune_renewal_nonces, "forget expired renewal proofs"),
)


def job_named(name: str) -> Job:
    for job in JOBS:
        if job.name == name:
            return job
    raise KeyError(name)
