"""Nodes: registered node agents, deployments, instances and image torrents.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    # New tables only: nothing existing is rewritten.
    op.create_table(
        "nodes",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("address", sa.String(255), nullable=False),
        sa.Column("agent_key", sa.String(128), nullable=False),
        sa.Column("owner_id", sa.Integer, sa.ForeignKey("users.id", ondelete="SET NULL")),
        sa.Column("capacity_instances", sa.Integer, nullable=False),
        sa.Column("running_instances", sa.Integer, nullable=False),
        sa.Column("cache_capacity", sa.BigInteger, nullable=False),
        sa.Column("cache_used", sa.BigInteger, nullable=False),
        sa.Column("cached", sa.JSON, nullable=False),
        sa.Column("in_flight", sa.JSON, nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("registered", TS, nullable=False),
        sa.Column("last_heartbeat", TS, nullable=False),
    )
    op.create_table(
        "deployments",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("owner_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"),
                  nullable=False, index=True),
        sa.Column("image_id", sa.String(36), sa.ForeignKey("images.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("nodes", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("report", sa.JSON, nullable=False),
        sa.Column("options", sa.JSON, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("prefetch", sa.Boolean, nullable=False),
        sa.Column("created", TS, nullable=False),
        sa.Column("finished", TS),
    )
    op.create_index("ix_deployments_image_created", "deployments", ["image_id", "created"])
    op.create_index("ix_deployments_created", "deployments", ["created"])
    op.create_table(
        "instances",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("deployment_id", sa.String(36),
                  sa.ForeignKey("deployments.id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("owner_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"),
                  nullable=False, index=True),
        sa.Column("node", sa.String(64), nullable=False, index=True),
        sa.Column("image_id", sa.String(36), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("disk", sa.Text, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("created", TS, nullable=False),
        sa.Column("ready", TS),
    )
    op.create_table(
        "image_torrents",
        sa.Column("image_id", sa.String(36), sa.ForeignKey("images.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("info_hash", sa.String(64), nullable=False),
        sa.Column("piece_size", sa.Integer, nullable=False),
        sa.Column("torrent", sa.LargeBinary, nullable=False),
        sa.Column("created", TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("image_torrents")
    op.drop_table("instances")
    op.drop_index("ix_deployments_created", "deployments")
    op.drop_index("ix_deployments_image_created", "deployments")
    op.drop_table("deployments")
    op.drop_table("nodes")
