"""conversations: index turns by (conversation_id, request_id), in place of conversation_id alone

Conversation memory reads the turns whose usage reports reasoning tokens, joined to the answers
by (conversation_id, request_id). With an index on conversation_id alone, SQLite looked through
every turn of the conversation for each of its messages: a conversation of 8,000 messages took
seconds each time its history was read from the database. The new index leads with
conversation_id, so it serves the queries the old one did.

Revision ID: conversations_0003
Revises: conversations_0002
Create Date: 2026-11-27
"""
from __future__ import annotations

from alembic import op

revision = "conversations_0003"
down_revision = "conversations_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_conversation_turns_conversation_request", "conversation_turns",
                    ["conversation_id", "request_id"])
    op.drop_index("ix_conversation_turns_conversation_id", table_name="conversation_turns")


def downgrade() -> None:
    op.create_index("ix_conversation_turns_conversation_id", "conversation_turns", ["conversation_id"])
    op.drop_index("ix_conversation_turns_conversation_request", table_name="conversation_turns")
