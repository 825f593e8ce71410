"""The certificate's SHA-256 fingerprint loses its unique index. Nothing looks a certificate up by
fingerprint, and the primary key already makes it unique (two certificates with one serial cannot
be stored, and certificates that differ hash differently). The index only cost: its keys are
random, so each new certificate wrote one more scattered page (SQLite's WAL, PostgreSQL's
B-tree and WAL): on SQLite, with 150,000 certificates stored, a fifth of the CPU that storing
one takes (docs/benchmarks.md, change 43).

On SQLite the table is rebuilt (its constraint has no name; the naming convention gives the
reflected one a name to drop by): about 2 s per 150,000 certificates here, once.

Revision ID: 0014
Revises: 0013
"""

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

# Names the unnamed constraint SQLite reflects; PostgreSQL named it itself, the same way.
_NAMES = {"uq": "%(table_name)s_%(column_0_name)s_key"}
_UNIQUE = "certificate_fingerprint_sha256_key"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint(_UNIQUE, "certificate", type_="unique")
        return
    with op.batch_alter_table("certificate", naming_convention=_NAMES) as batch:
        batch.drop_constraint(_UNIQUE, type_="unique")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.create_unique_constraint(_UNIQUE, "certificate", ["fingerprint_sha256"])
        return
    with op.batch_alter_table("certificate", naming_convention=_NAMES) as batch:
        batch.create_unique_constraint(_UNIQUE, ["fingerprint_sha256"])
