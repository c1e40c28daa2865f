"""Shared fixtures. Everything is real: the gateway on a loopback socket, the demo backend as the
upstream, SQLite files in tmp dirs, and private redis-server / PostgreSQL processes.

Redis and PostgreSQL tests skip when the servers are not installed, except under CI (CI=true),
where a missing server is a failure."""
from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import pytest

from gateway.demo import REQUESTS, start_demo_upstream

from .helpers import (IN_CI, PG_DATABASES, PostgresCluster, RedisServer, RunningGateway, base_config,
                      create_pg_database, free_port, have_redis, start_gateway, write_config)


class Upstream:
    def __init__(self, runner: Any, port: int) -> None:
        self.runner = runner
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    @property
    def requests(self) -> Any:
        return self.runner.app[REQUESTS]


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    runner, port = await start_demo_upstream("127.0.0.1", 0)
    yield Upstream(runner, port)
    await runner.cleanup()


@pytest.fixture
async def make_gateway(tmp_path: Path, upstream: Upstream) -> AsyncIterator[Callable[..., Any]]:
    """``await make_gateway(plugins=[...], **sections)`` starts a gateway in-process on a free port
    against the demo upstream; stopped at the end of the test."""
    started: list[RunningGateway] = []

    async def factory(plugins: list[dict[str, Any]] | None = None, *, name: str = "gateway.yaml",
                      raw: str | None = None, **sections: Any) -> RunningGateway:
        cfg = raw if raw is not None else base_config(upstream.url, tmp_path, plugins, **sections)
        path = write_config(tmp_path / name, cfg)
        g = await start_gateway(path)
        started.append(g)
        return g

    yield factory
    for g in reversed(started):
        await g.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Factory for private redis-server processes on free loopback ports."""
    if not have_redis():
        if IN_CI:
            pytest.fail("redis-server is not installed (.ci/run installs it)")
        pytest.skip("redis-server not installed")
    servers: list[RedisServer] = []

    def factory() -> RedisServer:
        s = RedisServer(free_port(), tmp_path).start()
        servers.append(s)
        return s

    yield factory
    for s in servers:
        s.stop()


async def _drop_databases(admin_dsn: str, names: list[str]) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_dsn)
    try:
        for name in names:
            with contextlib.suppress(Exception):
                try:
                    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                except asyncpg.PostgresSyntaxError:  # before PostgreSQL 13
                    await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[str]:
    """Admin DSN of a PostgreSQL server: $GATEWAY_TEST_PG_DSN if set, else a private cluster."""
    dsn = os.environ.get("GATEWAY_TEST_PG_DSN")
    if dsn:
        yield dsn
        if PG_DATABASES:  # (every gateway using one has stopped by now)
            with contextlib.suppress(Exception):
                asyncio.run(_drop_databases(dsn, PG_DATABASES))
        return
    if PostgresCluster.bindir() is None:
        if IN_CI:
            pytest.fail("PostgreSQL is not installed (.ci/run installs it)")
        pytest.skip("PostgreSQL not installed")
    c = PostgresCluster().start()
    try:
        yield c.admin_dsn
    finally:
        c.stop()


@pytest.fixture
async def pg_url(pg_cluster: str) -> str:
    """A fresh, empty PostgreSQL database for this test (SQLAlchemy asyncpg URL)."""
    return await create_pg_database(pg_cluster, "gw_" + uuid.uuid4().hex[:12])
