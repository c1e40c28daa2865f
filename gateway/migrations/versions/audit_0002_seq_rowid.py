"""audit: on SQLite, make audit_events.seq the rowid (INTEGER PRIMARY KEY)

audit_0001 declared seq BIGINT, which SQLite does not take as an alias of the rowid: the table had
a hidden rowid of its own, every secondary index (type, owner, key_id, time) pointed at that, and
a page filtered by one of them and ordered by seq sorted every matching row first (seconds per
page at a million events, an export quadratic). SQLite cannot change a column's type in place:
the table is rebuilt (create, copy every row, drop, rename, index again) in the migration's
transaction. PostgreSQL keeps its BIGINT primary key: nothing to do there.

Revision ID: audit_0002
Revises: audit_0001
Create Date: 2026-11-26
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "audit_0002"
down_revision = "audit_0001"
branch_labels = None
depends_on = None

TABLE = "audit_events"
NEW = "_audit_events_rebuild"
INDEXES = {"ix_audit_events_time": ["time"], "ix_audit_events_type": ["type"],
           "ix_audit_events_key_id": ["key_id"], "ix_audit_events_owner": ["owner"]}
COLUMNS = ("seq", "time", "type", "request_id", "key_id", "owner", "client_ip", "status", "data",
           "prev_hash", "hash")


def _seq_is_rowid(bind: sa.engine.Connection) -> bool:
    for _cid, name, type_, _notnull, _default, pk in bind.exec_driver_sql(f"PRAGMA table_info({TABLE})"):
        if name == "seq":
            return bool(pk) and str(type_).upper() == "INTEGER"
    return False


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite" or _seq_is_rowid(bind):
        return
    # Left by a rebuild that was cut short: its copy never committed (the copy, the drop and the
    # rename share one transaction), but SQLite may have committed the CREATE on its own.
    op.execute(f"DROP TABLE IF EXISTS {NEW}")
    op.create_table(
        NEW,
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=False),
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
    cols = ", ".join(COLUMNS)
    # In seq order: the new table's B-tree is filled from left to right.
    op.execute(f"INSERT INTO {NEW} ({cols}) SELECT {cols} FROM {TABLE} ORDER BY seq")
    op.drop_table(TABLE)  # (its indexes with it)
    op.rename_table(NEW, TABLE)
    for name, on in INDEXES.items():
        op.create_index(name, TABLE, on)


def downgrade() -> None:
    pass  # an INTEGER primary key holds every BIGINT value on SQLite: nothing to undo
