"""audit: the audit_events table (hash-chained audit trail).

Revision ID: audit_0001
Revises:
Create Date: 2026-11-25
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "audit_0001"
down_revision = None
branch_labels = ("audit",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("seq", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("time", sa.String(32), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("key_id", sa.String(128), nullable=True),
        sa.Column("owner", sa.String(256), nullable=True),
        sa.Column("client_ip", sa.String(64), nullable=True),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("data", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_audit_events"),
    )
    op.create_index("ix_audit_events_time", "audit_events", ["time"])
    op.create_index("ix_audit_events_type", "audit_events", ["type"])
    op.create_index("ix_audit_events_key_id", "audit_events", ["key_id"])
    op.create_index("ix_audit_events_owner", "audit_events", ["owner"])


def downgrade() -> None:
    op.drop_table("audit_events")
