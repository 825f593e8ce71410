"""Istio plug-in CA intermediates per cluster.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

from ca.store.models import UtcDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "istio_cluster",
        sa.Column("cluster", sa.String(63), primary_key=True),
        sa.Column("authority", sa.String(64), sa.ForeignKey("authority.name"), nullable=False),
        sa.Column("serial", sa.String(40), nullable=False),
        sa.Column("not_before", UtcDateTime(), nullable=False),
        sa.Column("not_after", UtcDateTime(), nullable=False),
        sa.Column("key_type", sa.String(16), nullable=False),
        sa.Column("ttl_seconds", sa.Integer(), nullable=False),
        sa.Column("output", sa.String(1024), nullable=True),
        sa.Column("output_format", sa.String(32), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("istio_cluster")
