"""API-gateway partners: issuance policy, consumers, delivered certificates, written truststores.

A sibling branch off 0004 (applied with ``upgrade heads``).

Revision ID: 0007
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

from ca.store.models import UtcDateTime

revision = "0007"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gateway_config",
        sa.Column("authority", sa.String(64), primary_key=True),
        sa.Column("default_ttl_seconds", sa.Integer(), nullable=False),
        sa.Column("max_ttl_seconds", sa.Integer(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
    )
    op.create_table(
        "gateway_consumer",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("contact", sa.String(255), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("disabled_at", UtcDateTime(), nullable=True),
    )
    op.create_table(
        "gateway_certificate",
        sa.Column("serial", sa.String(40), primary_key=True),
        sa.Column("consumer", sa.String(64), nullable=False),
        sa.Column("delivery", sa.String(16), nullable=False),
        sa.Column("x5t_s256", sa.String(43), nullable=False, unique=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
    )
    op.create_index("ix_gateway_certificate_consumer", "gateway_certificate", ["consumer"])
    op.create_table(
        "gateway_truststore",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("node", sa.String(255), nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("written_at", UtcDateTime(), nullable=False),
        sa.UniqueConstraint("node", "path", name="uq_gateway_truststore_node_path"),
    )


def downgrade() -> None:
    op.drop_table("gateway_truststore")
    op.drop_index("ix_gateway_certificate_consumer", table_name="gateway_certificate")
    op.drop_table("gateway_certificate")
    op.drop_table("gateway_consumer")
    op.drop_table("gateway_config")
