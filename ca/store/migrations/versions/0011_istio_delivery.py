"""Istio: a ``kubectl apply`` target (kubeconfig, context) as the output of a cluster's
intermediate, the optional ``ca-crl.pem`` (the intermediate's own CRL and the root CRL number
last delivered), and the last delivery error.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("istio_cluster") as batch:
        batch.add_column(sa.Column("kubeconfig", sa.String(1024), nullable=True))
        batch.add_column(sa.Column("kube_context", sa.String(253), nullable=True))
        # Existing rows get false; the model has no server default, so it is dropped again.
        batch.add_column(
            sa.Column("with_crl", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("intermediate_crl_pem", sa.Text(), nullable=True))
        batch.add_column(sa.Column("root_crl_number", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("last_error", sa.String(512), nullable=True))
    with op.batch_alter_table("istio_cluster") as batch:
        batch.alter_column("with_crl", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("istio_cluster") as batch:
        batch.drop_column("last_error")
        batch.drop_column("root_crl_number")
        batch.drop_column("intermediate_crl_pem")
        batch.drop_column("with_crl")
        batch.drop_column("kube_context")
        batch.drop_column("kubeconfig")
