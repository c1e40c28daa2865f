"""``gateway db copy --to URL``: every table of the configured database into another, empty one.

The way from one gateway on a SQLite file to several on PostgreSQL (or back) without issuing the
keys again or losing the history and the audit trail: the target gets the schema (its
migrations), then each table's rows in primary-key order, in batches, read from one snapshot of
the source; PostgreSQL's serial sequences are moved past the copied ids. Rows are copied as they
are, so the audit trail's hashes (over each event's stored text) verify on the copy.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from typing import Any, Callable

from sqlalchemy import DateTime, Integer, Table, func, select, text

from .db import (Base, Database, DatabaseError, create_private, newer_revisions, revisions_sync, shown_url,
                 sqlite_place_problem, upgrade_sync)
from .cli import redact_url

#: Rows per INSERT.
BATCH = 1000


def _tables() -> list[Table]:
    """The gateway's tables (every installed plugin's), parents before children."""
    from .plugin import registry

    for name in registry.names():
        registry.get(name)  # (a plugin's tables are declared when its module is imported)
    return list(Base.metadata.sorted_tables)


def _say(line: str) -> None:
    print(line, flush=True)  # (as each table is done: a long copy shows where it is)


async def copy_database(source_url: str, target_url: str, say: Callable[[str], None] = _say) -> dict[str, int]:
    """Copy every table from ``source_url`` into ``target_url``; returns the rows copied per table.
    Raises DatabaseError when the target is the source, already holds rows, either schema is
    newer than this version's, the source's is behind, or the target cannot be used."""
    if source_url == target_url:
        raise DatabaseError("the target is the configured database itself")
    src, dst = Database(source_url, pool_size=2), Database(target_url, pool_size=2)
    try:
        if dst.is_sqlite and dst.file:
            problem = sqlite_place_problem(target_url)
            if problem:
                raise DatabaseError(problem)
            create_private(dst.file)  # (its owner's only, as the gateway's own files: see create_private)
        known = (await asyncio.to_thread(revisions_sync, source_url))[1]
        newer = newer_revisions(await src.applied_revisions(), known, source_url)
        if newer:  # (copied by this version, what the newer one added would be left behind)
            raise DatabaseError(f"the configured database was migrated by a newer gateway ({', '.join(sorted(newer))}): "
                                "copy it with that version's `gateway db copy`")
        if await src.pending_migrations():
            raise DatabaseError("the configured database's schema is behind this version of the gateway: run "
                                "`gateway db upgrade` first")
        await _target(target_url, _prepare(dst, target_url, known))
        tables = _tables()
        async with dst.engine.connect() as conn:
            for t in tables:
                if (await conn.execute(select(func.count()).select_from(t))).scalar():
                    raise DatabaseError(f"the target {shown_url(target_url)} holds rows already (in {t.name}): "
                                        "copy into an empty database")
        counts: dict[str, int] = {}
        async with _snapshot(src) as read, dst.engine.connect() as write:
            try:
                await write.begin()
                for t in tables:
                    n = 0
                    order = list(t.primary_key.columns) or list(t.columns)
                    aware = [c.name for c in t.columns if isinstance(c.type, DateTime) and c.type.timezone]
                    result = await read.stream(select(t).order_by(*order))
                    async for part in result.mappings().partitions(BATCH):
                        await write.execute(t.insert(), [_utc(dict(r), aware) for r in part])
                        n += len(part)
                    counts[t.name] = n
                    say(f"{t.name}: {n} row(s)")
                if not dst.is_sqlite:
                    await _move_sequences(write, tables)
                await write.commit()
            except BaseException:
                # Cut (Ctrl-C, SIGTERM) or failed, perhaps in the middle of a statement: the
                # connection is dropped, not rolled back over the wire (a rollback sent after half
                # an INSERT waits for ever); the server rolls the transaction back as it closes.
                with contextlib.suppress(Exception):
                    await write.invalidate()
                raise
        return counts
    finally:
        await src.close()
        await dst.close()


async def _prepare(dst: Database, url: str, known: set[str]) -> None:
    """The target's schema, as this version has it (refused if a newer gateway migrated it)."""
    newer = newer_revisions(await dst.applied_revisions(), known, url)
    if newer:
        raise DatabaseError(f"the target {shown_url(url)} was migrated by a newer gateway ({', '.join(sorted(newer))})")
    await asyncio.to_thread(upgrade_sync, url)


async def _target(url: str, step: Any) -> None:
    """Run ``step``; a failure of the target itself (its login, host, a driver error) is said to be
    the target's, naming it (without its password)."""
    try:
        await step
    except DatabaseError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise DatabaseError(f"the target {shown_url(url)} cannot be used: {type(e).__name__}: {redact_url(first)}") \
            from None


def _utc(row: dict[str, Any], aware: list[str]) -> dict[str, Any]:
    """A time SQLite gives back without its zone, for a column that keeps one, is UTC (what the
    gateway writes): read as local time elsewhere, it would move by the machine's offset."""
    for k in aware:
        v = row.get(k)
        if isinstance(v, dt.datetime) and v.tzinfo is None:
            row[k] = v.replace(tzinfo=dt.timezone.utc)
    return row


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
