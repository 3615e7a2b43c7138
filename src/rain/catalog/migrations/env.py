"""Alembic environment: rain runs migrations in-process on the catalog's connection."""

from alembic import context

from rain.catalog.schema import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
