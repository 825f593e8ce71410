"""Initial schema: authorities, CA certificates, entries, tokens, issued certificates, nonces.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from ca.store.models import UtcDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "authority",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("trust_domain", sa.String(255), nullable=False),
        sa.Column("key_backend", sa.String(32), nullable=False),
        sa.Column("ca_ttl_seconds", sa.Integer(), nullable=False),
        sa.Column("svid_ttl_seconds", sa.Integer(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
    )
    op.create_table(
        "ca",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("authority", sa.String(64), sa.ForeignKey("authority.name"), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("serial", sa.String(40), nullable=False, unique=True),
        sa.Column("parent_id", sa.Integer(), sa.ForeignKey("ca.id"), nullable=True),
        sa.Column("subject", sa.String(512), nullable=False),
        sa.Column("key_backend", sa.String(32), nullable=False),
        sa.Column("key_ref", sa.String(255), nullable=False),
        sa.Column("key_type", sa.String(16), nullable=False),
        sa.Column("cert_pem", sa.Text(), nullable=False),
        sa.Column("not_before", UtcDateTime(), nullable=False),
        sa.Column("not_after", UtcDateTime(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
    )
    op.create_index("ix_ca_authority", "ca", ["authority"])
    op.create_index("ix_ca_state", "ca", ["state"])
    op.create_table(
        "entry",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("authority", sa.String(64), sa.ForeignKey("authority.name"), nullable=False),
        sa.Column("spiffe_id", sa.String(2048), nullable=False, unique=True),
        sa.Column("dns_names", sa.Text(), nullable=False),
        sa.Column("ttl_seconds", sa.Integer(), nullable=False),
        sa.Column("max_ttl_seconds", sa.Integer(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
    )
    op.create_table(
        "token",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("entry_id", sa.String(36), sa.ForeignKey("entry.id"), nullable=True),
        sa.Column("uses_remaining", sa.Integer(), nullable=True),
        sa.Column("expires_at", UtcDateTime(), nullable=True),
        sa.Column("revoked_at", UtcDateTime(), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("description", sa.String(255), nullable=False),
    )
    op.create_index("ix_token_entry_id", "token", ["entry_id"])
    op.create_table(
        "certificate",
        sa.Column("serial", sa.String(40), primary_key=True),
        sa.Column("authority", sa.String(64), sa.ForeignKey("authority.name"), nullable=False),
        sa.Column("issuer_ca_id", sa.Integer(), sa.ForeignKey("ca.id"), nullable=False),
        sa.Column("profile", sa.String(32), nullable=False),
        sa.Column("spiffe_id", sa.String(2048), nullable=False),
        sa.Column("entry_id", sa.String(36), nullable=True),
        sa.Column("fingerprint_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("not_before", UtcDateTime(), nullable=False),
        sa.Column("not_after", UtcDateTime(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("requested_by", sa.String(255), nullable=False),
        sa.Column("revoked_at", UtcDateTime(), nullable=True),
        sa.Column("revocation_reason", sa.String(32), nullable=True),
        sa.Column("revoked_by", sa.String(255), nullable=True),
        sa.Column("cert_pem", sa.Text(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
    )
    op.create_index("ix_certificate_spiffe_id", "certificate", ["spiffe_id"])
    op.create_index("ix_certificate_not_after", "certificate", ["not_after"])
    op.create_index("ix_certificate_status", "certificate", ["status"])
    op.create_table(
        "renewal_nonce",
        sa.Column("jti", sa.String(64), primary_key=True),
        sa.Column("expires_at", UtcDateTime(), nullable=False),
    )
    op.create_index("ix_renewal_nonce_expires_at", "renewal_nonce", ["expires_at"])


def downgrade() -> None:
    for table in ("renewal_nonce", "certificate", "token", "entry", "ca", "authority"):
        op.drop_table(table)
