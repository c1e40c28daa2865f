"""key_auth: api_keys.max_parallel, a key's own cap on requests running at once (rate_limit)

Revision ID: key_auth_0003
Revises: key_auth_0002
Create Date: 2026-11-28
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "key_auth_0003"
down_revision = "key_auth_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("max_parallel", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as b:
        b.drop_column("max_parallel")
