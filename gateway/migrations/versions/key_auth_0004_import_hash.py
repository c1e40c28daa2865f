"""key_auth: api_keys.import_hash, keys issued elsewhere that their clients keep using

A team moving to the gateway from another one imports the keys its clients hold (their SHA-256,
as such gateways store them, or the keys themselves): each gets a record of its own, found by the
hash of the token a client sends. Unique: one token, one key.

Revision ID: key_auth_0004
Revises: key_auth_0003
Create Date: 2026-11-28
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "key_auth_0004"
down_revision = "key_auth_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("import_hash", sa.String(64), nullable=True))
    op.add_column("api_keys", sa.Column("import_valid_until", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ux_api_keys_import_hash", "api_keys", ["import_hash"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_api_keys_import_hash", table_name="api_keys")
    with op.batch_alter_table("api_keys") as b:
        b.drop_column("import_valid_until")
        b.drop_column("import_hash")
