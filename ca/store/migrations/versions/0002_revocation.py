"""Revocation: CRLs, OCSP responders, revocation details, disabled entries, revoked CAs.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from ca.store.models import UtcDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("certificate") as batch:
        batch.add_column(sa.Column("revocation_request_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("invalidity_date", UtcDateTime(), nullable=True))
    with op.batch_alter_table("entry") as batch:
        batch.add_column(sa.Column("disabled_at", UtcDateTime(), nullable=True))
    with op.batch_alter_table("ca") as batch:
        batch.add_column(sa.Column("revoked_at", UtcDateTime(), nullable=True))
        batch.add_column(sa.Column("revocation_reason", sa.String(32), nullable=True))
    op.create_table(
        "crl",
        sa.Column("ca_id", sa.Integer(), sa.ForeignKey("ca.id"), primary_key=True),
        sa.Column("number", sa.BigInteger(), nullable=False),
        sa.Column("this_update", UtcDateTime(), nullable=False),
        sa.Column("next_update", UtcDateTime(), nullable=False),
        sa.Column("der", sa.LargeBinary(), nullable=False),
    )
    op.create_table(
        "ocsp_responder",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("ca_id", sa.Integer(), sa.ForeignKey("ca.id"), nullable=False),
        sa.Column("key_backend", sa.String(32), nullable=False),
        sa.Column("key_ref", sa.String(255), nullable=False),
        sa.Column("key_type", sa.String(16), nullable=False),
        sa.Column("cert_pem", sa.Text(), nullable=False),
        sa.Column("not_after", UtcDateTime(), nullable=False),
    )
    op.create_index("ix_ocsp_responder_ca_id", "ocsp_responder", ["ca_id"])
    # CRLs list revoked, unexpired certificates of one issuer: make that scan an index range.
    op.create_index("ix_certificate_issuer_status", "certificate", ["issuer_ca_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_certificate_issuer_status", "certificate")
    op.drop_table("ocsp_responder")
    op.drop_table("crl")
    with op.batch_alter_table("ca") as batch:
        batch.drop_column("revocation_reason")
        batch.drop_column("revoked_at")
    with op.batch_alter_table("entry") as batch:
        batch.drop_column("disabled_at")
    with op.batch_alter_table("certificate") as batch:
        batch.drop_column("invalidity_date")
        batch.drop_column("revocation_request_id")
