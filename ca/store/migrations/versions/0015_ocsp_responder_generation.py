"""OCSP responders get a generation, unique per CA: replicas that make a CA's next responder at
the same moment insert the same (ca_id, generation) and only the first commits, so a CA has one
responder at a time (before, each replica made and used its own).

Existing responders are numbered per CA in the order they expire (``id`` breaks ties, such as two
made by a race).

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

_UNIQUE = "uq_ocsp_responder_ca_generation"


def upgrade() -> None:
    with op.batch_alter_table("ocsp_responder") as batch:
        batch.add_column(sa.Column("generation", sa.Integer(), nullable=True))
    op.execute(
        """
        UPDATE ocsp_responder SET generation = (
            SELECT COUNT(*) FROM ocsp_responder AS earlier
            WHERE earlier.ca_id = ocsp_responder.ca_id
              AND (earlier.not_after < ocsp_responder.not_after
                   OR (earlier.not_after = ocsp_responder.not_after
                       AND earlier.id <= ocsp_responder.id))
        )
        """
    )
    with op.batch_alter_table("ocsp_responder") as batch:
        batch.alter_column("generation", existing_type=sa.Integer(), nullable=False)
        batch.create_unique_constraint(_UNIQUE, ["ca_id", "generation"])


def downgrade() -> None:
    with op.batch_alter_table("ocsp_responder") as batch:
        batch.drop_constraint(_UNIQUE, type_="unique")
        batch.drop_column("generation")
