"""Job runs are recorded per node for the jobs of a node's or a replica's own files: the key of
``job_run`` becomes (name, node), ``node`` empty for a cluster-wide job, and the node a run was
on moves to ``ran_on``. With one record per job, node B failing was reset by each success of
node A, so ``trellis jobs list``, ``/readyz`` and the alert showed it only between A's runs.

An existing record of a node job becomes the record of the node that ran it last (its count of
failures in a row is a lower bound of that node's); the other nodes get theirs at their next run.

Revision ID: 0017
Revises: 0016
"""

import contextlib

import sqlalchemy as sa
from alembic import op
from alembic.operations import BatchOperations

from ca.store.models import UtcDateTime

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

# The jobs ``ca.jobs`` scoped NODE or REPLICA at this revision (a migration must not follow a
# later release's list).
_PER_NODE = (
    "gateway-truststores",
    "openvpn-crl",
    "openvpn-server-certificate",
    "server-certificate",
)
_PK = "job_run_pkey"  # PostgreSQL's name for the key the earlier revisions created


def _rebuilt_on_sqlite(key: list[str]) -> sa.Table:
    """``job_run`` as the rebuild copies it, keyed on ``key``: SQLite cannot alter a table's key,
    so the table is created anew and its rows copied."""
    return sa.Table(
        "job_run",
        sa.MetaData(),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("last_started", UtcDateTime(), nullable=True),
        sa.Column("last_finished", UtcDateTime(), nullable=True),
        sa.Column("last_result", sa.String(512), nullable=False),
        sa.Column("last_ok", sa.Boolean(), nullable=False),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.Column("next_run", UtcDateTime(), nullable=True),
        sa.Column("node", sa.String(128), primary_key="node" in key, nullable=False),
        sa.Column("ran_on", sa.String(128), nullable=True),
    )


def _key(key: list[str]) -> contextlib.AbstractContextManager[BatchOperations]:
    """A batch of changes to ``job_run`` that also makes ``key`` its primary key."""
    if op.get_bind().dialect.name == "sqlite":
        return op.batch_alter_table("job_run", copy_from=_rebuilt_on_sqlite(key), recreate="always")
    op.drop_constraint(_PK, "job_run", type_="primary")
    op.create_primary_key(_PK, "job_run", key)
    return op.batch_alter_table("job_run")


def upgrade() -> None:
    with op.batch_alter_table("job_run") as batch:
        batch.add_column(sa.Column("ran_on", sa.String(128), nullable=True))
    job_run = sa.table("job_run", sa.column("name"), sa.column("node"), sa.column("ran_on"))
    op.execute(job_run.update().values(ran_on=job_run.c.node))
    op.execute(job_run.update().where(job_run.c.name.not_in(_PER_NODE)).values(node=""))
    with _key(["name", "node"]) as batch:
        batch.alter_column("ran_on", existing_type=sa.String(128), nullable=False)


def downgrade() -> None:
    """Back to one record per job: the last run's, on whichever node."""
    job_run = sa.table("job_run", sa.column("name"), sa.column("node"), sa.column("last_started"))
    latest: dict[str, str] = {}  # name -> the node of its last run; a tie goes to either
    runs = op.get_bind().execute(sa.select(job_run)).all()
    for name, node, _ in sorted(runs, key=lambda r: (r[2] is not None, r[2] or 0, r[1])):
        latest[name] = node
    for name, node in latest.items():
        op.execute(job_run.delete().where(job_run.c.name == name, job_run.c.node != node))
    job_run = sa.table("job_run", sa.column("node"), sa.column("ran_on"))
    op.execute(job_run.update().values(node=job_run.c.ran_on))
    with _key(["name"]) as batch:
        batch.drop_column("ran_on")
