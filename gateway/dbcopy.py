"""``gateway db copy --to URL``: every table of the configured database into another, empty one.

The way from one gateway on a SQLite file to several on PostgreSQL (or back) without issuing the
keys again or losing the history and the audit trail: the target gets the schema (its
migrations), then each table's rows in primary-key order, in batches, read from one snapshot of
the source; PostgreSQL's serial sequences are moved past the copied ids. Rows are copied as they
are, so the audit trail's hashes (over each event's stored text) verify on the copy.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable

from sqlalchemy import Integer, Table, func, select, text

from .db import Base, Database, DatabaseError, create_private, shown_url, sqlite_place_problem, upgrade_sync

#: Rows per INSERT.
BATCH = 1000


def _tables() -> list[Table]:
    """The gateway's tables (every installed plugin's), parents before children."""
    from .plugin import registry

    for name in registry.names():
        registry.get(name)  # (a plugin's tables are declared when its module is imported)
    return list(Base.metadata.sorted_tables)


async def copy_database(source_url: str, target_url: str, say: Callable[[str], None] = print) -> dict[str, int]:
    """Copy every table from ``source_url`` into ``target_url``; returns the rows copied per table.
    Raises DatabaseError when the target is the source, already holds rows, or a schema is behind."""
    if source_url == target_url:
        raise DatabaseError("the target is the configured database itself")
    src, dst = Database(source_url, pool_size=2), Database(target_url, pool_size=2)
    try:
        if dst.is_sqlite and dst.file:
            problem = sqlite_place_problem(target_url)
            if problem:
                raise DatabaseError(problem)
            create_private(dst.file)  # (its owner's only, as the gateway's own files: see create_private)
        if await src.pending_migrations():
            raise DatabaseError("the configured database's schema is behind this version of the gateway: run "
                                "`gateway db upgrade` first")
        await asyncio.to_thread(upgrade_sync, target_url)  # (its schema, as this version has it)
        tables = _tables()
        async with dst.engine.connect() as conn:
            for t in tables:
                if (await conn.execute(select(func.count()).select_from(t))).scalar():
                    raise DatabaseError(f"the target {shown_url(target_url)} holds rows already (in {t.name}): "
                                        "copy into an empty database")
        counts: dict[str, int] = {}
        async with _snapshot(src) as read:
            async with dst.engine.begin() as write:
                for t in tables:
                    n = 0
                    order = list(t.primary_key.columns) or list(t.columns)
                    result = await read.stream(select(t).order_by(*order))
                    async for part in result.mappings().partitions(BATCH):
                        await write.execute(t.insert(), [dict(r) for r in part])
                        n += len(part)
                    counts[t.name] = n
                    say(f"{t.name}: {n} row(s)")
                if not dst.is_sqlite:
                    await _move_sequences(write, tables)
        return counts
    finally:
        await src.close()
        await dst.close()


class _snapshot:
    """One read snapshot of the source for the whole copy (SQLite: a deferred transaction;
    PostgreSQL: REPEATABLE READ), so rows written meanwhile by a running gateway are all in or
    all out, table by table alike."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def __aenter__(self) -> Any:
        self._cm = self.db.engine.connect()
        conn = await self._cm.__aenter__()
        if self.db.is_sqlite:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.exec_driver_sql("BEGIN")
        else:
            conn = await conn.execution_options(isolation_level="REPEATABLE READ")
            await conn.begin()
        self.conn = conn
        return conn

    async def __aexit__(self, *exc: Any) -> None:
        try:
            if self.db.is_sqlite:
                await self.conn.exec_driver_sql("ROLLBACK")
            else:
                await self.conn.rollback()
        finally:
            await self._cm.__aexit__(*exc)


async def _move_sequences(conn: Any, tables: list[Table]) -> None:
    """PostgreSQL: each serial column's sequence past the largest id copied (the next row made
    there would otherwise take id 1, which a copied row holds)."""
    for t in tables:
        for c in t.primary_key.columns:
            if not isinstance(c.type, Integer):
                continue
            seq = (await conn.execute(text("SELECT pg_get_serial_sequence(:t, :c)"),
                                      {"t": t.name, "c": c.name})).scalar()
            if seq:
                await conn.execute(text(f'SELECT setval(:s, COALESCE((SELECT max("{c.name}") FROM "{t.name}"), 1), '
                                        f'(SELECT max("{c.name}") FROM "{t.name}") IS NOT NULL)'), {"s": seq})
