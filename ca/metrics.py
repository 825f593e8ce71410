"""Prometheus metrics.

Two kinds: event metrics (issuance outcomes and latency, revocations, Vault errors) counted in
the process where they happen, and state metrics (live certificates, seconds until each CA
expires, CRL age, job results) read from the database at scrape time, so every replica reports
the same state; a scrape that cannot read them leaves them out (``trellis_state_up``). With
several worker processes, ``trellis serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a directory
and event metrics are aggregated across workers (prometheus_client's multiprocess mode).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlmodel import Session, col, select

from ca.config import Context
from ca.store import outage
from ca.store.models import CaRow, CertificateRow, CrlRow, JobRunRow

__all__ = ["ISSUANCE_SECONDS", "ISSUED", "REVOKED", "VAULT_ERRORS", "render"]

log = logging.getLogger("trellis.metrics")

ISSUED = Counter(
    "trellis_certificates_issued",
    "Certificate issuance attempts by authority, profile and result",
    ["authority", "profile", "result"],
)
ISSUANCE_SECONDS = Histogram(
    "trellis_issuance_seconds",
    "Time from CSR to recorded certificate",
    ["authority", "profile"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)
REVOKED = Counter(
    "trellis_revocations", "Revocations by authority and reason", ["authority", "reason"]
)
VAULT_ERRORS = Counter("trellis_vault_errors", "Failed Vault calls by operation", ["operation"])


# How long each state query may run on PostgreSQL (``statement_timeout``, ms): a database that
# holds them (a lock, an overloaded server) leaves the state out of that scrape instead of
# holding it past Prometheus's scrape timeout (10 s by default), and with it the counters. A
# connection is given ``ca.store.db.CONNECTION_DEFAULTS``' ``connect_timeout`` (10 s) and a
# dead network its ``tcp_user_timeout`` (30 s). A SQLite reader waits for no lock (WAL).
STATE_QUERY_TIMEOUT_MS = 2000


class StateCollector(Collector):
    """Database-derived gauges, computed per scrape (a few indexed aggregate queries), and
    ``trellis_state_up``: whether they could be read. When the database cannot be, they are
    left out of that scrape and the event metrics are still served: those are what shows an
    outage's failed issuances (a 503 for the whole scrape hid them exactly then)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "trellis_state_up",
            "1 if this scrape read the database-derived gauges, 0 if the database could not be"
            " read and they are left out",
        )
        try:
            families = self._read()
        except sa.exc.SQLAlchemyError as error:
            log.warning("metrics: the database state is left out: %s", outage.reason(error))
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield from (*families, up)

    def _read(self) -> tuple[Metric, ...]:
        now = self.ctx.clock.now()
        active = GaugeMetricFamily(
            "trellis_active_certificates",
            "Unexpired, unrevoked certificates",
            labels=["authority", "profile"],
        )
        expiry = GaugeMetricFamily(
            "trellis_ca_expiry_seconds",
            "Seconds until each CA certificate expires",
            labels=["authority", "role", "state", "serial"],
        )
        crl_age = GaugeMetricFamily(
            "trellis_crl_age_seconds",
            "Seconds since each CA's CRL was signed",
            labels=["authority", "serial"],
        )
        crl_left = GaugeMetricFamily(
            "trellis_crl_next_update_seconds",
            "Seconds until each CRL's nextUpdate",
            labels=["authority", "serial"],
        )
        # ``node`` is empty for a cluster-wide job, whichever replica ran it: one series
        job_ok = GaugeMetricFamily(
            "trellis_job_last_success",
            "1 if the job's last run (on the node, for a node job) succeeded",
            labels=["job", "node"],
        )
        job_failures = GaugeMetricFamily(
            "trellis_job_consecutive_failures",
            "Failed runs in a row (on the node, for a node job)",
            labels=["job", "node"],
        )
        with Session(self.ctx.engine) as session:
            if self.ctx.engine.dialect.name == "postgresql":  # for this transaction only
                session.execute(
                    sa.text(f"SET LOCAL statement_timeout = {int(STATE_QUERY_TIMEOUT_MS)}")
                )
            counts = session.execute(
                sa.select(
                    col(CertificateRow.authority), col(CertificateRow.profile), sa.func.count()
                )
                .where(col(CertificateRow.status) == "active", col(CertificateRow.not_after) > now)
                .group_by(col(CertificateRow.authority), col(CertificateRow.profile))
            ).all()
            for authority, profile, count in counts:
                active.add_metric([authority, profile], count)
            for ca in session.exec(select(CaRow).where(col(CaRow.not_after) > now)).all():
                expiry.add_metric(
                    [ca.authority, ca.role, ca.state, ca.serial],
                    (ca.not_after - now).total_seconds(),
                )
            for crl, ca in session.exec(
                select(CrlRow, CaRow).where(CrlRow.ca_id == CaRow.id)
            ).all():
                if crl.number > 0:
                    crl_age.add_metric(
                        [ca.authority, ca.serial], (now - crl.this_update).total_seconds()
                    )
                    crl_left.add_metric(
                        [ca.authority, ca.serial], (crl.next_update - now).total_seconds()
                    )
            for job in session.exec(select(JobRunRow)).all():
                job_ok.add_metric([job.name, job.node], 1.0 if job.last_ok else 0.0)
                job_failures.add_metric([job.name, job.node], job.consecutive_failures)
        return (active, expiry, crl_age, crl_left, job_ok, job_failures)


def render(ctx: Context) -> bytes:
    """The exposition text: this process's (or all workers') events plus the shared state."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        for collector in (ISSUED, ISSUANCE_SECONDS, REVOKED, VAULT_ERRORS):
            registry.register(collector)
    registry.register(StateCollector(ctx))
    return generate_latest(registry)
