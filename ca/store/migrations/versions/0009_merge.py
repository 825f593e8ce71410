"""Join the feature branches (federation, OpenVPN, gateway, audit) into one head.

Revision ID: 0009
Revises: 0005, 0006, 0007, 0008
"""

revision = "0009"
down_revision = ("0005", "0006", "0007", "0008")
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
