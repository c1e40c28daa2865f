"""Alembic environment: async engine, run from ``gateway db upgrade`` or at start-up.

Each plugin that stores data owns a migration branch (its first revision has ``down_revision = None``
and a ``branch_labels`` entry with the plugin's name); ``upgrade heads`` applies all of them.
On PostgreSQL an advisory lock serialises instances that start at the same time.

On SQLite every run is one transaction: a migration that fails or is killed part-way leaves the
database as it was (with each CREATE committed on its own, a table made but its revision not
recorded meant "table ... already exists" on every later upgrade). On PostgreSQL each migration is
one transaction with its revision (a failed one leaves the database at the one before): in one
transaction for the whole run, a later migration waited for a table's lock while holding the locks
of the earlier ones, which older gateways still serving took in the other order (a deadlock
whenever the tables were large enough for the run to last), and every table the run touched stayed
locked until its end (key lookups on the old instances timed out).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from alembic import context
from sqlalchemy import event, pool, text
from sqlalchemy.ext.asyncio import create_async_engine

import gateway.db as gdb
from gateway.db import Base

log = logging.getLogger("gateway.db")

config = context.config
target_metadata = Base.metadata
LOCK_ID = 0x6761746577  # "gatew"


def _pg_lock(connection) -> None:  # type: ignore[no-untyped-def]
    """Take the session's advisory lock (released by _run, or with the connection), saying that it
    waits and giving up after the wait the SQLite lock file allows: a migration stuck in another
    instance must not hold this one's start-up silently for ever.

    Tried every 0.2 s, each try a transaction of its own, never waited for inside one: a migration
    that builds an index CONCURRENTLY (audit_0003) waits until every transaction older than it has
    ended, so a session waiting for the lock in a transaction (``pg_advisory_lock``) and the
    session holding it waited for each other (PostgreSQL ended one: "deadlock detected")."""
    deadline = time.monotonic() + gdb.MIGRATION_LOCK_WAIT
    said = False
    while True:
        got = connection.execute(text(f"SELECT pg_try_advisory_lock({LOCK_ID})")).scalar()
        connection.commit()  # (the lock is the session's: it stays)
        if got:
            return
        if not said:
            said = True
            log.warning("waiting for the migration lock (PostgreSQL advisory lock %d: another gateway or "
                        "`gateway db upgrade` holds it)", LOCK_ID)
        if time.monotonic() > deadline:
            raise gdb.DatabaseError(f"the migration lock (PostgreSQL advisory lock {LOCK_ID}) was held by "
                                    f"another session for {gdb.MIGRATION_LOCK_WAIT:g}s; is a migration stuck?")
        time.sleep(0.2)


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    sqlite = connection.dialect.name == "sqlite"
    pg = connection.dialect.name == "postgresql"
    # (configured before anything runs on the connection: one already in a transaction would be
    # taken as the caller's, and Alembic would begin none of its own)
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=sqlite,
                      transactional_ddl=True,  # (SQLite: see _transactional_sqlite)
                      transaction_per_migration=pg)
    if not pg:
        with context.begin_transaction():
            context.run_migrations()
        return
    _pg_lock(connection)
    try:
        with context.begin_transaction():
            context.run_migrations()
    finally:
        with contextlib.suppress(Exception):  # (a broken connection is closed: the server frees the lock)
            if connection.in_transaction():
                connection.rollback()
            connection.execute(text(f"SELECT pg_advisory_unlock({LOCK_ID})"))
            connection.commit()


def _transactional_sqlite(engine) -> None:  # type: ignore[no-untyped-def]
    """The Python sqlite3 driver commits before each DDL statement itself, so the transaction
    Alembic opens would undo nothing. Turn the driver's transaction handling off and begin the
    transaction here (as SQLAlchemy documents for pysqlite/aiosqlite), for this engine only: the
    gateway's own connections keep the driver's behaviour. IMMEDIATE: the write lock at once."""
    @event.listens_for(engine.sync_engine, "connect")
    def _no_driver_transactions(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_conn.isolation_level = None

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn) -> None:  # type: ignore[no-untyped-def]
        conn.exec_driver_sql("BEGIN IMMEDIATE")


async def _online(url: str) -> None:
    engine = create_async_engine(url, poolclass=pool.NullPool, **gdb.engine_options(url))
    if engine.dialect.name == "sqlite":
        _transactional_sqlite(engine)
    async with engine.connect() as conn:
        await conn.run_sync(_run)
        await conn.commit()
    await engine.dispose()


url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
if context.is_offline_mode():
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_online(url))
