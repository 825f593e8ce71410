"""On PostgreSQL the sealer's query for the oldest unsealed audit records gets a partial index of
its own: it walked every sealed record before the first unsealed one, once per chunk of 250.

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":  # SQLite uses the unique index on seq
        op.create_index(
            "ix_audit_log_unsealed",
            "audit_log",
            ["id"],
            postgresql_where=sa.text("seq IS NULL"),
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index("ix_audit_log_unsealed", table_name="audit_log")
