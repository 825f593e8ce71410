"""Table models. Strings and ints only: value types are rebuilt from them in ``ca.store.repo``.

The schema these classes describe is created by the explicit migrations in
``ca/store/migrations/versions``, never by ``create_all``; a test checks the two agree.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

__all__ = [
    "AuthorityRow",
    "BundleStateRow",
    "CaEventRow",
    "CaRow",
    "CertificateRow",
    "CrlIssuerRow",
    "CrlRow",
    "EntryRow",
    "FederatedBundleRow",
    "IstioClusterRow",
    "JobRunRow",
    "OcspResponderRow",
    "RenewalNonceRow",
    "RootRotationRow",
    "TokenRow",
    "UtcDateTime",
]


class UtcDateTime(TypeDecorator[dt.datetime]):
    """Aware UTC datetimes on every database (SQLite drops the zone; this puts it back)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _time(*, nullable: bool = False, index: bool = False) -> Any:
    return Field(sa_column=sa.Column(UtcDateTime(), nullable=nullable, index=index))


class AuthorityRow(SQLModel, table=True):
    __tablename__ = "authority"

    name: str = Field(primary_key=True, max_length=64)
    purpose: str = Field(max_length=32)
    trust_domain: str = Field(max_length=255)
    key_backend: str = Field(max_length=32)
    ca_ttl_seconds: int
    svid_ttl_seconds: int
    created_at: dt.datetime = _time()


_ONE_ACTIVE = "role = 'intermediate' AND state = 'active'"


class CaRow(SQLModel, table=True):
    __tablename__ = "ca"
    __table_args__ = (
        # At most one issuing intermediate per authority (migration 0019): every transition
        # holds the rotation lock (ca.rotation), and this makes a race that slipped past it fail
        # instead of leaving a second active CA to expire and fail /readyz on every replica.
        sa.Index(
            "uq_ca_one_active_intermediate",
            "authority",
            unique=True,
            sqlite_where=sa.text(_ONE_ACTIVE),
            postgresql_where=sa.text(_ONE_ACTIVE),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    authority: str = Field(foreign_key="authority.name", index=True, max_length=64)
    role: str = Field(max_length=16)
    state: str = Field(max_length=16, index=True)
    serial: str = Field(unique=True, max_length=40)
    parent_id: int | None = Field(default=None, foreign_key="ca.id")
    subject: str = Field(max_length=512)
    key_backend: str = Field(max_length=32)
    key_ref: str = Field(max_length=255)
    key_type: str = Field(max_length=16)
    cert_pem: str = Field(sa_column=sa.Column(sa.Text(), nullable=False))
    not_before: dt.datetime = _time()
    not_after: dt.datetime = _time()
    created_at: dt.datetime = _time()
    revoked_at: dt.datetime | None = _time(nullable=True)
    revocation_reason: str | None = Field(default=None, max_length=32)
    # role "cross": a certificate for the root ``cross_for_id`` signed by the root ``parent_id``
    cross_for_id: int | None = Field(default=None, foreign_key="ca.id")


class EntryRow(SQLModel, table=True):
    __tablename__ = "entry"

    id: str = Field(primary_key=True, max_length=36)
    authority: str = Field(foreign_key="authority.name", max_length=64)
    spiffe_id: str = Field(unique=True, max_length=2048)
    dns_names: str = Field(default="", sa_column=sa.Column(sa.Text(), nullable=False))
    ttl_seconds: int
    max_ttl_seconds: int
    created_at: dt.datetime = _time()
    disabled_at: dt.datetime | None = _time(nullable=True)


class TokenRow(SQLModel, table=True):
    __tablename__ = "token"

    id: str = Field(primary_key=True, max_length=32)
    kind: str = Field(max_length=16)
    secret_hash: str = Field(unique=True, max_length=64)
    entry_id: str | None = Field(default=None, foreign_key="entry.id", index=True, max_length=36)
    uses_remaining: int | None = None
    expires_at: dt.datetime | None = _time(nullable=True)
    revoked_at: dt.datetime | None = _time(nullable=True)
    created_at: dt.datetime = _time()
    description: str = Field(default="", max_length=255)


class CertificateRow(SQLModel, table=True):
    __tablename__ = "certificate"
    __table_args__ = (
        sa.Index("ix_certificate_issuer_status", "issuer_ca_id", "status"),
        # Listing (ca.certs.list_certificates): keyset pages in serial order filtered by status
        # (the primary key serves the unfiltered pages), or by expiry (migration 0012).
        sa.Index("ix_certificate_status_serial", "status", "serial"),
        sa.Index("ix_certificate_expiry_serial", "not_after", "serial"),
    )

    serial: str = Field(primary_key=True, max_length=40)
    authority: str = Field(foreign_key="authority.name", max_length=64)
    issuer_ca_id: int = Field(foreign_key="ca.id")
    profile: str = Field(max_length=32)
    spiffe_id: str = Field(index=True, max_length=2048)
    entry_id: str | None = Field(default=None, max_length=36)
    fingerprint_sha256: str = Field(max_length=64)  # not unique: migration 0014
    not_before: dt.datetime = _time()
    not_after: dt.datetime = _time()
    status: str = Field(max_length=16)
    requested_by: str = Field(max_length=255)
    revoked_at: dt.datetime | None = _time(nullable=True)
    revocation_reason: str | None = Field(default=None, max_length=32)
    revoked_by: str | None = Field(default=None, max_length=255)
    revocation_request_id: str | None = Field(default=None, max_length=64)
    invalidity_date: dt.datetime | None = _time(nullable=True)
    cert_pem: str = Field(sa_column=sa.Column(sa.Text(), nullable=False))
    created_at: dt.datetime = _time()


class RenewalNonceRow(SQLModel, table=True):
    """Renewal proofs already spent: a replayed proof collides on the primary key."""

    __tablename__ = "renewal_nonce"

    jti: str = Field(primary_key=True, max_length=64)
    expires_at: dt.datetime = _time(index=True)


class CrlRow(SQLModel, table=True):
    """The current CRL of one CA. ``number`` only grows (RFC 5280 §5.2.3); replicas serve it."""

    __tablename__ = "crl"

    ca_id: int = Field(primary_key=True, foreign_key="ca.id")
    number: int = Field(sa_column=sa.Column(sa.BigInteger(), nullable=False))
    this_update: dt.datetime = _time()
    next_update: dt.datetime = _time()
    der: bytes = Field(sa_column=sa.Column(sa.LargeBinary(), nullable=False))


class CrlIssuerRow(SQLModel, table=True):
    """The highest CRL number signed under one issuer name (``CaRow.subject``), by whichever CA
    bears it. RFC 5280 §5.2.3 wants CRL numbers to increase per CRL issuer, and §5.2.1 makes one
    name with several keys one issuer: a rotated CA, its emergency replacement and the CA of an
    ``init --force`` take their predecessor's name, and the predecessor may go on signing CRLs
    while its certificates live. Every CRL takes its number from this row (locked until commit),
    so the numbers under a name only grow, whichever CA signs; the row outlives the CAs (``init
    --force`` deletes their CRLs, not this)."""

    __tablename__ = "crl_issuer"

    name: str = Field(primary_key=True, max_length=512)
    number: int = Field(sa_column=sa.Column(sa.BigInteger(), nullable=False))


class OcspResponderRow(SQLModel, table=True):
    """A delegated OCSP signing certificate (id-kp-OCSPSigning) for one CA, and its key."""

    __tablename__ = "ocsp_responder"
    # One responder per CA and generation: replicas racing to make a CA's next responder insert
    # the same (ca_id, generation), and only the first commits (ca.ocsp._new_responder).
    __table_args__ = (
        sa.UniqueConstraint("ca_id", "generation", name="uq_ocsp_responder_ca_generation"),
    )

    id: int | None = Field(default=None, primary_key=True)
    ca_id: int = Field(foreign_key="ca.id", index=True)
    generation: int  # 1 for a CA's first responder, then one more for each renewal
    key_backend: str = Field(max_length=32)
    key_ref: str = Field(max_length=255)
    key_type: str = Field(max_length=16)
    cert_pem: str = Field(sa_column=sa.Column(sa.Text(), nullable=False))
    not_after: dt.datetime = _time()


class CaEventRow(SQLModel, table=True):
    """Every CA state transition, once: the audit of rotation (and the proof of exactly-once)."""

    __tablename__ = "ca_event"

    id: int | None = Field(default=None, primary_key=True)
    authority: str = Field(max_length=64, index=True)
    ca_id: int = Field(foreign_key="ca.id")
    event: str = Field(max_length=32)
    at: dt.datetime = _time()
    actor: str = Field(max_length=255)


class BundleStateRow(SQLModel, table=True):
    """The published trust bundle of an authority; ``sequence`` grows whenever ``pem`` changes."""

    __tablename__ = "bundle_state"

    authority: str = Field(primary_key=True, foreign_key="authority.name", max_length=64)
    sequence: int = Field(sa_column=sa.Column(sa.BigInteger(), nullable=False))
    digest: str = Field(max_length=64)
    pem: str = Field(sa_column=sa.Column(sa.Text(), nullable=False))
    updated_at: dt.datetime = _time()


class JobRunRow(SQLModel, table=True):
    """The last run of a scheduled job, shared by all replicas: one record of a cluster-wide job
    (``node`` empty), one per node of a job that keeps a node's or a replica's own files
    (``ca.jobs.Scope``), so that a node failing is not reset by another node succeeding."""

    __tablename__ = "job_run"

    name: str = Field(primary_key=True, max_length=64)
    node: str = Field(default="", primary_key=True, max_length=128)
    last_started: dt.datetime | None = _time(nullable=True)
    last_finished: dt.datetime | None = _time(nullable=True)
    last_result: str = Field(default="", max_length=512)
    last_ok: bool = True
    consecutive_failures: int = 0
    runs: int = 0
    next_run: dt.datetime | None = _time(nullable=True)
    ran_on: str = Field(default="", max_length=128)  # the node of the last run


class RootRotationRow(SQLModel, table=True):
    """An in-progress root rotation: old root → new root, step by explicit step."""

    __tablename__ = "root_rotation"

    authority: str = Field(primary_key=True, foreign_key="authority.name", max_length=64)
    old_root_id: int = Field(foreign_key="ca.id")
    new_root_id: int = Field(foreign_key="ca.id")
    step: str = Field(max_length=16)  # published | switched | retired
    started_at: dt.datetime = _time()
    switch_after: dt.datetime = _time()


class IstioClusterRow(SQLModel, table=True):
    """The plug-in CA intermediate Trellis issued to one Istio cluster, and where to renew it."""

    __tablename__ = "istio_cluster"

    cluster: str = Field(primary_key=True, max_length=63)
    authority: str = Field(foreign_key="authority.name", max_length=64)
    serial: str = Field(max_length=40)
    not_before: dt.datetime = _time()
    not_after: dt.datetime = _time()
    key_type: str = Field(max_length=16)
    ttl_seconds: int
    output: str | None = Field(default=None, max_length=1024)
    output_format: str = Field(max_length=32)
    updated_at: dt.datetime = _time()
    # Or, instead of ``output``, a ``kubectl apply`` target: a kubeconfig and optional context.
    kubeconfig: str | None = Field(default=None, max_length=1024)
    kube_context: str | None = Field(default=None, max_length=253)
    # ``ca-crl.pem`` in the output: the intermediate's own (empty) CRL, public and signed once at
    # issue time, kept so the root's part can be refreshed without the key; and the number of
    # the root CRL last delivered.
    with_crl: bool = False
    intermediate_crl_pem: str | None = Field(
        default=None, sa_column=sa.Column(sa.Text(), nullable=True)
    )
    root_crl_number: int | None = None
    # Why the last delivery to the output failed (None once one succeeds); such a cluster is
    # re-issued on the job's next run.
    last_error: str | None = Field(default=None, max_length=512)


class FederatedBundleRow(SQLModel, table=True):
    """A federation relationship (SPIFFE Federation §5, §6): a foreign trust domain, how to reach
    and authenticate its bundle endpoint, and the last good bundle fetched from it.

    ``bundle_pem`` is replaced only by a bundle that passed every check; a failed refresh only
    records ``last_error``/``last_attempt``. ``sequence`` never goes backwards.
    """

    __tablename__ = "federated_bundle"

    trust_domain: str = Field(primary_key=True, max_length=255)
    url: str = Field(max_length=2048)
    profile: str = Field(max_length=16)  # https_web | https_spiffe
    endpoint_spiffe_id: str | None = Field(default=None, max_length=2048)
    bootstrap_pem: str | None = Field(default=None, sa_column=sa.Column(sa.Text(), nullable=True))
    web_ca_pem: str | None = Field(default=None, sa_column=sa.Column(sa.Text(), nullable=True))
    bundle_pem: str | None = Field(default=None, sa_column=sa.Column(sa.Text(), nullable=True))
    sequence: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger(), nullable=True))
    refresh_hint: int | None = None
    digest: str | None = Field(default=None, max_length=64)
    bundle_updated_at: dt.datetime | None = _time(nullable=True)
    last_success: dt.datetime | None = _time(nullable=True)
    last_attempt: dt.datetime | None = _time(nullable=True)
    last_error: str | None = Field(default=None, max_length=512)
    next_refresh: dt.datetime = _time()
    created_at: dt.datetime = _time()


# Feature tables live in their own modules; importing them here registers them on the metadata
# that migrations and the schema test compare against.
from ca.store import models_audit, models_gateway, models_openvpn  # noqa: E402, F401
