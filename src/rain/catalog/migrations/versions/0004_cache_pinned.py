"""Nodes report the cache bytes live instance disks pin (the rest can be evicted).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Rows of agents from before report 0 until their next heartbeat.
    op.add_column("nodes", sa.Column("cache_pinned", sa.BigInteger, nullable=False,
                                     server_default="0"))


def downgrade() -> None:
    op.drop_column("nodes", "cache_pinned")
