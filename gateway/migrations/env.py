"""Alembic environment: async engine, run from ``gateway db upgrade`` or at start-up.

Each plugin that stores data owns a migration branch (its first revision has ``down_revision = None``
and a ``branch_labels`` entry with the plugin's name); ``upgrade heads`` applies all of them.
On PostgreSQL an advisory lock serialises instances that start at the same time.
"""
from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import pool, text
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.db import Base

config = context.config
target_metadata = Base.metadata
LOCK_ID = 0x6761746577  # "gatew"


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text(f"SELECT pg_advisory_xact_lock({LOCK_ID})"))
        context.run_migrations()


async def _online(url: str) -> None:
    engine = create_async_engine(url, poolclass=pool.NullPool)
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
