"""audit: index audit_events on (type, seq) in place of (type)

Each write of the trail (and each chunk of a purge) reads the newest event of two rare types,
MAX(seq) WHERE type = ?. On PostgreSQL the driver prepares that statement, and after five runs
the server plans it once for any type (a generic plan): with an index on type alone it scanned
the primary key backwards through the whole trail when the type had no row (an unsigned trail):
0.5 to 0.9 s per audit write at a million events, the writer falling behind and a stop losing
what it still held. On (type, seq) the newest of a type is one index probe once the statement
names the type (the code writes it into the statement: a generic plan for "any type" may still
prefer the primary key). The new index also serves everything the old one did (its first column
is type), which goes.

On PostgreSQL both are made and dropped CONCURRENTLY (audit writes go on meanwhile), outside a
transaction; an index a cut-short build left invalid is made again. On SQLite the index on type
already held (type, seq) (seq is the rowid): the same index under its new name.

Revision ID: audit_0003
Revises: audit_0002
Create Date: 2026-11-28
"""
from __future__ import annotations

from alembic import op

revision = "audit_0003"
down_revision = "audit_0002"
branch_labels = None
depends_on = None

TABLE = "audit_events"
NEW, NEW_COLUMNS = "ix_audit_events_type_seq", ["type", "seq"]
OLD, OLD_COLUMNS = "ix_audit_events_type", ["type"]


def _swap(make: str, columns: list[str], drop: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        op.create_index(make, TABLE, columns)
        op.drop_index(drop, table_name=TABLE)
        return
    with op.get_context().autocommit_block():
        valid = bind.exec_driver_sql(
            f"SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass('{make}')").scalar()
        if valid is False:  # (left by a build cut short: it would be kept as it is by IF NOT EXISTS)
            bind.exec_driver_sql(f"DROP INDEX CONCURRENTLY IF EXISTS {make}")
        bind.exec_driver_sql(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {make} ON {TABLE} ({', '.join(columns)})")
        bind.exec_driver_sql(f"DROP INDEX CONCURRENTLY IF EXISTS {drop}")


def upgrade() -> None:
    _swap(NEW, NEW_COLUMNS, OLD)


def downgrade() -> None:
    _swap(OLD, OLD_COLUMNS, NEW)
