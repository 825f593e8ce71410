"""At most one active intermediate per authority (a partial unique index), and a revoked CA is
in state ``revoked``.

Before every CA transition took the authority's rotation lock, an emergency revocation racing a
rotation's activation could leave two or more intermediates of one authority active, and the
revoked one back in state ``retired`` with its ``revoked_at`` still set. The rows are mended
first: of several active intermediates of an authority the one ``ca.authority.active_issuer``
signs with (the latest to expire) stays active and the others are retired (they stay trusted
until they expire, as any retired CA); a CA with ``revoked_at`` set is ``revoked`` again (the
root's CRL listed it all along: it is built from ``revoked_at``).

Revision ID: 0019
Revises: 0018
"""

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

_ONE_ACTIVE = "role = 'intermediate' AND state = 'active'"


def upgrade() -> None:
    ca = sa.table(
        "ca",
        sa.column("id"),
        sa.column("authority"),
        sa.column("role"),
        sa.column("state"),
        sa.column("not_after"),
        sa.column("revoked_at"),
    )
    op.execute(ca.update().where(ca.c.revoked_at.is_not(None)).values(state="revoked"))
    rows = op.get_bind().execute(
        sa.select(ca.c.id, ca.c.authority)
        .where(ca.c.role == "intermediate", ca.c.state == "active")
        .order_by(ca.c.authority, ca.c.not_after.desc(), ca.c.id.desc())
    )
    issuing: set[str] = set()
    stray: list[int] = []
    for ca_id, authority in rows:
        if authority in issuing:
            stray.append(ca_id)
        issuing.add(authority)
    if stray:
        op.execute(ca.update().where(ca.c.id.in_(stray)).values(state="retired"))
    op.create_index(
        "uq_ca_one_active_intermediate",
        "ca",
        ["authority"],
        unique=True,
        sqlite_where=sa.text(_ONE_ACTIVE),
        postgresql_where=sa.text(_ONE_ACTIVE),
    )


def downgrade() -> None:
    """The index goes; the mended rows stay as they are (they were wrong before)."""
    op.drop_index("uq_ca_one_active_intermediate", table_name="ca")
