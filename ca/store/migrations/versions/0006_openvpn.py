"""OpenVPN: the deployment of each openvpn authority and its client names.

A sibling branch off 0004 (applied with ``upgrade heads``).

Revision ID: 0006
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

from ca.store.models import UtcDateTime

revision = "0006"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "openvpn",
        sa.Column("authority", sa.String(64), primary_key=True),
        sa.Column("remote", sa.String(253), nullable=True),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("proto", sa.String(8), nullable=False),
        sa.Column("crl_path", sa.String(1024), nullable=True),
        sa.Column("server_cn", sa.String(64), nullable=True),
        sa.Column("secret_store", sa.String(16), nullable=False),
        sa.Column("tls_crypt_v2_ref", sa.String(255), nullable=False),
        sa.Column("tls_crypt_ref", sa.String(255), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
    )
    op.create_table(
        "openvpn_client",
        sa.Column("authority", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("serial", sa.String(40), nullable=True),
        sa.Column("tls_crypt", sa.String(8), nullable=False),
        sa.Column("claimed_at", UtcDateTime(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("openvpn_client")
    op.drop_table("openvpn")
