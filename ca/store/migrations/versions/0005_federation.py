"""SPIFFE federation: foreign trust domains, their bundle endpoints and last good bundles.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

from ca.store.models import UtcDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "federated_bundle",
        sa.Column("trust_domain", sa.String(255), primary_key=True),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("profile", sa.String(16), nullable=False),
        sa.Column("endpoint_spiffe_id", sa.String(2048), nullable=True),
        sa.Column("bootstrap_pem", sa.Text(), nullable=True),
        sa.Column("web_ca_pem", sa.Text(), nullable=True),
        sa.Column("bundle_pem", sa.Text(), nullable=True),
        sa.Column("sequence", sa.BigInteger(), nullable=True),
        sa.Column("refresh_hint", sa.Integer(), nullable=True),
        sa.Column("digest", sa.String(64), nullable=True),
        sa.Column("bundle_updated_at", UtcDateTime(), nullable=True),
        sa.Column("last_success", UtcDateTime(), nullable=True),
        sa.Column("last_attempt", UtcDateTime(), nullable=True),
        sa.Column("last_error", sa.String(512), nullable=True),
        sa.Column("next_refresh", UtcDateTime(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("federated_bundle")
