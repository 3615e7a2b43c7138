"""Builds: the build jobs table; templates, build reference and phase timings on images.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    # Plain ADD COLUMNs (nullable, no defaults): no table rebuild, even on SQLite.
    op.add_column("images", sa.Column("template_text", sa.Text))
    op.add_column("images", sa.Column("template_parents", sa.JSON))
    op.add_column("images", sa.Column("build_id", sa.String(36)))
    op.add_column("images", sa.Column("build_timings", sa.JSON))
    op.create_table(
        "builds",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("owner_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"),
                  nullable=False, index=True),
        sa.Column("template_digest", sa.String(64), nullable=False, index=True),
        sa.Column("template_text", sa.Text, nullable=False),
        sa.Column("template_parents", sa.JSON),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("phase", sa.String(32), nullable=False),
        sa.Column("progress", sa.Float, nullable=False),
        sa.Column("log", sa.Text, nullable=False),
        sa.Column("log_size", sa.Integer, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("image_id", sa.String(36), sa.ForeignKey("images.id", ondelete="SET NULL"),
                  index=True),
        sa.Column("rebuild_of", sa.String(36), sa.ForeignKey("images.id", ondelete="SET NULL"),
                  index=True),
        sa.Column("timings", sa.JSON),
        sa.Column("cached", sa.Boolean, nullable=False),
        sa.Column("created", TS, nullable=False),
        sa.Column("started", TS),
        sa.Column("finished", TS),
        sa.Column("worker", sa.String(255)),
        sa.Column("heartbeat", TS),
    )
    op.create_index("ix_builds_status_created", "builds", ["status", "created"])


def downgrade() -> None:
    op.drop_index("ix_builds_status_created", "builds")
    op.drop_table("builds")
    with op.batch_alter_table("images") as batch:
        for column in ("build_timings", "build_id", "template_parents", "template_text"):
            batch.drop_column(column)
