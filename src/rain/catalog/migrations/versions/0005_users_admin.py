"""Administration: users can be disabled and deleted (kept as tombstones), tokens record
when they were last used, and node agents get tokens of their own (a node, no user).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("users", sa.Column("disabled", sa.Boolean, nullable=False,
                                     server_default=sa.false()))
    op.add_column("users", sa.Column("deleted", TS))
    # SQLite cannot drop NOT NULL in place: batch mode copies the table (tokens are small),
    # and the copy never reuses the id of a revoked token (ids are what revoking takes).
    with op.batch_alter_table("tokens", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.alter_column("user_id", existing_type=sa.Integer, nullable=True)
        batch.add_column(sa.Column("node", sa.String(64)))
        batch.add_column(sa.Column("last_used", TS))
        batch.create_index("ix_tokens_node", ["node"])


def downgrade() -> None:
    # Node tokens have no user to belong to: they cannot survive the old schema.
    op.execute("DELETE FROM tokens WHERE user_id IS NULL")
    with op.batch_alter_table("tokens") as batch:
        batch.drop_index("ix_tokens_node")
        batch.drop_column("last_used")
        batch.drop_column("node")
        batch.alter_column("user_id", existing_type=sa.Integer, nullable=False)
    op.drop_column("users", "deleted")
    op.drop_column("users", "disabled")
