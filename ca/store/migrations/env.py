"""Alembic environment: always run with a connection handed in by ``ca.store.db.upgrade``."""

from alembic import context
from sqlmodel import SQLModel

import ca.store.models  # noqa: F401  (registers the tables on SQLModel.metadata)

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    render_as_batch=True,
    on_version_apply=context.config.attributes.get("on_version_apply"),  # ca.store.db._counting
)
with context.begin_transaction():
    context.run_migrations()
