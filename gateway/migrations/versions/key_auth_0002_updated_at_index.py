"""key_auth: index api_keys.updated_at (each instance reads the keys changed lately)

Revision ID: key_auth_0002
Revises: key_auth_0001
Create Date: 2026-11-26
"""
from __future__ import annotations

from alembic import op

revision = "key_auth_0002"
down_revision = "key_auth_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_api_keys_updated_at", "api_keys", ["updated_at"])


def downgrade() -> None:
    op.drop_index("ix_api_keys_updated_at", table_name="api_keys")
