"""key_auth: key_auth_settings, what the stored keys were made with (the pepper's fingerprint)

Keys are stored as HMACs with the configured pepper. A command run where the pepper is not set
(a shell without GATEWAY_KEY_PEPPER) made keys the gateway refused, and a rotation that way locked
a key out, with nothing to tell "wrong pepper" from "wrong key". The gateway records a fingerprint
of its pepper here at start; the CLI refuses to make or rotate keys with another.

Revision ID: key_auth_0005
Revises: key_auth_0004
Create Date: 2026-11-28
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "key_auth_0005"
down_revision = "key_auth_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("key_auth_settings",
                    sa.Column("name", sa.String(64), primary_key=True),
                    sa.Column("value", sa.String(200), nullable=False),
                    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False))


def downgrade() -> None:
    op.drop_table("key_auth_settings")
