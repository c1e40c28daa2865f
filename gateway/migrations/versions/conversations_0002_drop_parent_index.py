"""conversations: drop ix_conversations_parent_id where an early conversations_0001 made it

The first form of conversations_0001 indexed conversations.parent_id; nothing queries by it, and
the index was taken out of that migration. Databases made before then still have it (and pay for
it on every new conversation): this brings them to the same schema as the others.

Revision ID: conversations_0002
Revises: conversations_0001
Create Date: 2026-11-26
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "conversations_0002"
down_revision = "conversations_0001"
branch_labels = None
depends_on = None

INDEX = "ix_conversations_parent_id"


def upgrade() -> None:
    if INDEX in {ix["name"] for ix in sa.inspect(op.get_bind()).get_indexes("conversations")}:
        op.drop_index(INDEX, table_name="conversations")


def downgrade() -> None:
    pass  # the index was never part of the schema the models describe
