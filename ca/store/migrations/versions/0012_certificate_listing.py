"""Certificate listing at a million rows: keyset pages in serial order filtered by status use
``(status, serial)`` (the primary key serves unfiltered pages), listing by expiry uses
``(not_after, serial)``; these replace the single-column ``status`` and ``not_after`` indexes.

Revision ID: 0012
Revises: 0011
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_certificate_status_serial", "certificate", ["status", "serial"])
    op.create_index("ix_certificate_expiry_serial", "certificate", ["not_after", "serial"])
    op.drop_index("ix_certificate_status", table_name="certificate")
    op.drop_index("ix_certificate_not_after", table_name="certificate")


def downgrade() -> None:
    op.create_index("ix_certificate_not_after", "certificate", ["not_after"])
    op.create_index("ix_certificate_status", "certificate", ["status"])
    op.drop_index("ix_certificate_expiry_serial", table_name="certificate")
    op.drop_index("ix_certificate_status_serial", table_name="certificate")
