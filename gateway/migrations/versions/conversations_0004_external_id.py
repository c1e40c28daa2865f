"""conversations: conversations.external_id, a client's own id for its conversation (external_ids)

A chat front-end names each chat with an id of its own and sends its whole history every turn. With
``external_ids`` on, the name is kept on each conversation made under it (forks included), indexed
by owner, so a later turn continues the stored conversation instead of storing the history again.

Revision ID: conversations_0004
Revises: conversations_0003
Create Date: 2026-11-28
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "conversations_0004"
down_revision = "conversations_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("conversations", sa.Column("external_id", sa.String(200), nullable=True))
    op.create_index("ix_conversations_owner_external", "conversations", ["owner", "external_id"])


def downgrade() -> None:
    op.drop_index("ix_conversations_owner_external", table_name="conversations")
    with op.batch_alter_table("conversations") as b:
        b.drop_column("external_id")
