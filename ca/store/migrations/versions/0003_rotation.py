"""Rotation: CA events, published bundle state, job runs, root rotations, cross-signed roots.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

from ca.store.models import UtcDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ca") as batch:
        batch.add_column(sa.Column("cross_for_id", sa.Integer(), nullable=True))
        batch.create_foreign_key("fk_ca_cross_for_id", "ca", ["cross_for_id"], ["id"])
    op.create_table(
        "ca_event",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("authority", sa.String(64), nullable=False),
        sa.Column("ca_id", sa.Integer(), sa.ForeignKey("ca.id"), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("at", UtcDateTime(), nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
    )
    op.create_index("ix_ca_event_authority", "ca_event", ["authority"])
    op.create_table(
        "bundle_state",
        sa.Column("authority", sa.String(64), sa.ForeignKey("authority.name"), primary_key=True),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("pem", sa.Text(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
    )
    op.create_table(
        "job_run",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("last_started", UtcDateTime(), nullable=True),
        sa.Column("last_finished", UtcDateTime(), nullable=True),
        sa.Column("last_result", sa.String(512), nullable=False),
        sa.Column("last_ok", sa.Boolean(), nullable=False),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.Column("next_run", UtcDateTime(), nullable=True),
        sa.Column("node", sa.String(128), nullable=False),
    )
    op.create_table(
        "root_rotation",
        sa.Column("authority", sa.String(64), sa.ForeignKey("authority.name"), primary_key=True),
        sa.Column("old_root_id", sa.Integer(), sa.ForeignKey("ca.id"), nullable=False),
        sa.Column("new_root_id", sa.Integer(), sa.ForeignKey("ca.id"), nullable=False),
        sa.Column("step", sa.String(16), nullable=False),
        sa.Column("started_at", UtcDateTime(), nullable=False),
        sa.Column("switch_after", UtcDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("root_rotation")
    op.drop_table("job_run")
    op.drop_table("bundle_state")
    op.drop_index("ix_ca_event_authority", "ca_event")
    op.drop_table("ca_event")
    with op.batch_alter_table("ca") as batch:
        batch.drop_constraint("fk_ca_cross_for_id", type_="foreignkey")
        batch.drop_column("cross_for_id")
