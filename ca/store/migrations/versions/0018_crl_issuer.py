"""CRL numbers are counted per issuer name, not per CA (``crl_issuer``): each new CA bearing an
earlier one's name (a rotation, an emergency replacement, ``init --force``) counted from 1 again,
below the numbers its predecessor had signed under the same name (RFC 5280 §5.2.3, §5.2.1).

Each name starts from the highest number any CA of that name has stored. Numbers of CRLs deleted
before this revision (the CAs ``init --force`` replaced) are not known any more.

Revision ID: 0018
Revises: 0017
"""

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "crl_issuer",
        sa.Column("name", sa.String(512), primary_key=True),
        sa.Column("number", sa.BigInteger(), nullable=False),
    )
    op.execute(
        "INSERT INTO crl_issuer (name, number)"
        " SELECT ca.subject, MAX(crl.number) FROM crl JOIN ca ON ca.id = crl.ca_id"
        " WHERE crl.number > 0 GROUP BY ca.subject"
    )


def downgrade() -> None:
    op.drop_table("crl_issuer")
