"""OpenVPN: remember where server-config wrote the server's files, so the server certificate
can be renewed in place.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("openvpn") as batch:
        batch.add_column(sa.Column("server_dir", sa.String(1024), nullable=True))
        batch.add_column(sa.Column("server_ttl_seconds", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("server_key_type", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("openvpn") as batch:
        batch.drop_column("server_key_type")
        batch.drop_column("server_ttl_seconds")
        batch.drop_column("server_dir")
