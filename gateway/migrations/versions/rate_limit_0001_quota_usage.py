"""rate_limit: token quota usage per subject and period

Revision ID: rate_limit_0001
Revises:
Create Date: 2026-11-25
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "rate_limit_0001"
down_revision = None
branch_labels = ("rate_limit",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rate_limit_quota_usage",
        sa.Column("subject", sa.String(200), nullable=False),
        sa.Column("period", sa.String(16), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("subject", "period", name="pk_rate_limit_quota_usage"),
    )


def downgrade() -> None:
    op.drop_table("rate_limit_quota_usage")
