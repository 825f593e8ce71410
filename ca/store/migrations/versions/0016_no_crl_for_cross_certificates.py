"""A cross-certificate is not a CRL issuer: CRL rows stored under one are deleted.

Before 3143cbb an unauthenticated ``GET /v1/crl/<authority>/<cross serial>.crl`` made the root
sign and store a CRL under the cross row's id: the root's name and key identifier, numbered from
1 again, listing nothing. Such rows are no longer served, but they would stay in the table, and
the CRL freshness metric would report them stale for ever.

Revision ID: 0016
Revises: 0015
"""

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DELETE FROM crl WHERE ca_id IN (SELECT id FROM ca WHERE role = 'cross')")


def downgrade() -> None:
    """Nothing to restore: the rows deleted were never a CRL anyone should read."""
