"""The database layer: SQLite pragmas applied and read back, Alembic migrations by `gateway db upgrade`
on a fresh SQLite file and on PostgreSQL, auto-migration at start for the embedded default."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import text

from gateway.db import Database, DatabaseError, alembic_config, store_error
from gateway.plugin import Plugin, registry

from .helpers import write_config


class NeedsDb(Plugin):
    name = "t_db_user"
    uses_database: ClassVar[bool] = True


registry.register(NeedsDb)


def heads() -> set[str]:
    return set(ScriptDirectory.from_config(alembic_config("sqlite+aiosqlite://")).get_heads())


def gateway_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


async def test_sqlite_pragmas_applied_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    db = Database(f"sqlite+aiosqlite:///{path}", busy_timeout_ms=1234)
    try:
        got = await db.check()
        assert got == {"journal_mode": "wal", "busy_timeout": 1234, "synchronous": 1}
        # Every pooled connection gets them, not just the first one.
        conns = [await db.engine.connect() for _ in range(3)]
        try:
            for c in conns:
                assert (await c.execute(text("PRAGMA busy_timeout"))).scalar() == 1234
                assert (await c.execute(text("PRAGMA synchronous"))).scalar() == 1
                assert (await c.execute(text("PRAGMA foreign_keys"))).scalar() == 1
                assert (await c.execute(text("PRAGMA journal_size_limit"))).scalar() == 64 * 1024 * 1024
        finally:
            for c in conns:
                await c.close()
        async with db.session() as s:
            await s.execute(text("CREATE TABLE t (x INTEGER)"))
            await s.execute(text("INSERT INTO t VALUES (1)"))
            await s.commit()
        assert await db.ping()
    finally:
        await db.close()
    # WAL is a property of the file: a plain sqlite3 connection sees it, and the -wal file exists.
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT x FROM t").fetchall() == [(1,)]
    finally:
        raw.close()


async def test_check_refuses_when_pragmas_do_not_apply() -> None:
    db = Database("sqlite+aiosqlite:///:memory:")  # an in-memory database cannot be WAL
    try:
        with pytest.raises(DatabaseError) as ei:
            await db.check()
        assert "journal_mode" in str(ei.value)
    finally:
        await db.close()


async def test_unreachable_database_ping_is_false() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = Database(f"postgresql+asyncpg://nobody@127.0.0.1:{port}/x")
    try:
        assert await db.ping(timeout=3) is False
    finally:
        await db.close()


def _versions_sqlite(path: Path) -> set[str]:
    raw = sqlite3.connect(path)
    try:
        return {r[0] for r in raw.execute("SELECT version_num FROM alembic_version")}
    finally:
        raw.close()


def _config(tmp_path: Path, url: str) -> Path:
    return write_config(tmp_path / "gateway.yaml", f"admin: {{enabled: false}}\nupstream: {{url: http://127.0.0.1:9}}\n"
                                                   f"database:\n  url: {url}\n")


def test_db_upgrade_fresh_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    cfg = _config(tmp_path, f"sqlite+aiosqlite:///{path}")
    assert not path.exists()
    r = gateway_cli("db", "upgrade", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    want = heads()
    assert r.stdout.strip() == f"database at head: {', '.join(sorted(want)) or '(no migrations)'}"
    if want:
        assert _versions_sqlite(path) == want
    # `db current` reports the same heads.
    r = gateway_cli("db", "current", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for h in want:
        assert h in r.stdout
    assert not (tmp_path / "gateway.db").exists()  # only the configured file was touched


async def test_db_upgrade_postgresql(tmp_path: Path, pg_url: str) -> None:
    cfg = _config(tmp_path, pg_url)
    r = await asyncio.to_thread(gateway_cli, "db", "upgrade", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    want = heads()
    db = Database(pg_url)
    try:
        assert await db.check() == {}
        assert await db.ping()
        if want:
            async with db.engine.connect() as c:
                got = {row[0] for row in await c.execute(text("SELECT version_num FROM alembic_version"))}
            assert got == want
        assert set(await db.upgrade()) == want  # running it again is a no-op
    finally:
        await db.close()


async def test_start_refuses_an_unmigrated_database(tmp_path: Path, pg_url: str) -> None:
    """With auto_migrate off (the default for PostgreSQL), a gateway whose plugins use the database
    does not start on a schema that is behind: it says to run `gateway db upgrade` (instead of
    reporting ready and failing every write). After the upgrade it starts."""
    cfg = write_config(tmp_path / "gateway.yaml", f"admin: {{enabled: false}}\nserver: {{host: 127.0.0.1, port: 0}}\n"
                                                   f"upstream: {{url: http://127.0.0.1:9}}\ndatabase:\n  url: {pg_url}\n"
                                                   "plugins:\n  - name: audit\n")
    r = await asyncio.to_thread(gateway_cli, "serve", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 1
    assert "the database schema is not up to date" in r.stderr and "gateway db upgrade" in r.stderr
    assert "Traceback" not in r.stderr
    r = await asyncio.to_thread(gateway_cli, "db", "upgrade", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from gateway.app import Gateway
    from gateway.config import load_config

    gw = Gateway(load_config(cfg))
    try:
        await gw.start()
        assert gw.public_port
    finally:
        await gw.stop()
    # A schema a newer gateway upgraded (a revision this one does not know) does not stop it.
    db = Database(pg_url)
    try:
        async with db.engine.begin() as c:
            await c.execute(text("INSERT INTO alembic_version (version_num) VALUES ('zz_newer_0001')"))
    finally:
        await db.close()
    gw = Gateway(load_config(cfg))
    try:
        await gw.start()
    finally:
        await gw.stop()


async def test_gateway_start_migrates_embedded_sqlite(make_gateway: Any, tmp_path: Path) -> None:
    g = await make_gateway([{"name": "t_db_user"}])
    path = tmp_path / "gateway.db"
    assert g.gw.db.is_sqlite and path.exists()
    want = heads()
    if want:
        assert _versions_sqlite(path) == want
    async with g.gw.db.engine.connect() as c:
        assert (await c.execute(text("PRAGMA journal_mode"))).scalar() == "wal"



async def upgrade_at_once(tmp_path: Path, url: str, n: int) -> None:
    """`gateway db upgrade` in n processes started together; each must succeed."""
    cfg = _config(tmp_path, url)
    procs = [await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", "db", "upgrade", "-c", str(cfg),
                                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
             for _ in range(n)]
    async with asyncio.timeout(90):
        results = [await p.communicate() for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err.decode()[-2000:]


async def test_concurrent_upgrades_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    """Instances starting together migrate one after the other (advisory lock), none fails."""
    await upgrade_at_once(tmp_path, pg_url, 3)
    db = Database(pg_url)
    try:
        if heads():
            async with db.engine.connect() as c:
                got = {row[0] for row in await c.execute(text("SELECT version_num FROM alembic_version"))}
            assert got == heads()
    finally:
        await db.close()


async def test_concurrent_upgrades_on_one_new_sqlite_file(tmp_path: Path) -> None:
    """Several instances started at once on a SQLite file that does not exist yet: one creates the
    tables, the others wait for it (a lock on the file), none fails with "table already exists"."""
    await upgrade_at_once(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}", 4)
    if heads():
        assert _versions_sqlite(tmp_path / "shared.db") == heads()


CONCURRENT_IN_PROCESS = """
import asyncio, sys
from gateway.db import Database

async def main():
    dbs = [Database(f"sqlite+aiosqlite:///{sys.argv[1]}/c{i}.db") for i in range(3)]
    heads = await asyncio.gather(*(db.upgrade() for db in dbs))
    for db in dbs:
        await db.close()
    print(sorted(set(map(tuple, heads))))

asyncio.run(main())
"""


def test_concurrent_upgrades_in_one_process(tmp_path: Path) -> None:
    """Alembic's context is process-global: upgrades started together in one process (two gateways,
    a reload) must not mix up their connections. Run in a subprocess so a hang cannot hang the suite."""
    r = subprocess.run([sys.executable, "-c", CONCURRENT_IN_PROCESS, str(tmp_path)], capture_output=True, text=True,
                       timeout=45)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == str([tuple(sorted(heads()))])
    for i in range(3):
        if heads():
            assert _versions_sqlite(tmp_path / f"c{i}.db") == heads()


async def test_migrations_build_exactly_the_models(tmp_path: Path) -> None:
    """Tables, columns, indexes and keys that `upgrade heads` makes are the ones the models declare:
    a model change without its migration (or the reverse) fails here."""
    import sqlalchemy as sa
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    import gateway.plugins.audit.store  # noqa: F401  (every plugin's tables on Base.metadata)
    import gateway.plugins.conversations.store  # noqa: F401
    import gateway.plugins.key_auth.store  # noqa: F401
    import gateway.plugins.rate_limit.quota  # noqa: F401
    from gateway.db import Base

    path = tmp_path / "m.db"
    db = Database(f"sqlite+aiosqlite:///{path}")
    try:
        assert set(await db.upgrade()) == heads()
    finally:
        await db.close()
    eng = sa.create_engine(f"sqlite:///{path}")
    try:
        with eng.connect() as c:
            diffs = compare_metadata(MigrationContext.configure(c, opts={"compare_type": False}), Base.metadata)
    finally:
        eng.dispose()
    assert diffs == [], diffs


async def test_a_deleted_or_replaced_sqlite_file_is_noticed(make_gateway: Any, tmp_path: Path, caplog: Any) -> None:
    """Moved away while serving: writes fail and are counted (nothing goes into the file the
    connections still hold, no empty file is made in its place), /readyz says not ready. Another
    file put at the path (a backup restored under the running gateway) is not used: opened next to
    this process's write-ahead log it would be corrupted. The same file moved back is written from
    then on; a backup is restored by stopping, removing the -wal and -shm files, starting."""
    import aiohttp

    from .helpers import ADMIN_TOKEN, start_gateway, until

    path = tmp_path / "live.db"
    g = await make_gateway([{"name": "audit", "config": {"retry_for": 1}}],
                           database={"url": f"sqlite+aiosqlite:///{path}"}, server={"readiness_grace": 0.2})
    hdr = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    audit = g.plugin("audit")

    async def flush() -> None:
        for _, w in audit.sinks:
            await w.flush(10)

    async def rows(p: Path) -> int:
        c = sqlite3.connect(p)
        try:
            return c.execute("SELECT count(*) FROM audit_events WHERE type = 'request'").fetchone()[0]
        finally:
            c.close()

    async with aiohttp.ClientSession() as s:
        async def readyz() -> tuple[int, Any]:
            async with s.get(g.admin_url + "/readyz") as r:
                return r.status, await r.json()

        async def not_ready() -> Any:
            st, body = await readyz()
            return body if st == 503 and not body["checks"]["writers"]["ok"] else None

        for _ in range(3):
            async with s.post(g.url + "/v1/chat/completions", json=chat) as r:
                assert r.status == 200
        await flush()
        backup = tmp_path / "backup.db"
        src, dst = sqlite3.connect(path), sqlite3.connect(backup)
        src.backup(dst)  # a consistent copy with the 3 events
        src.close()
        dst.close()
        away = tmp_path / "away.db"
        path.rename(away)
        for _ in range(2):
            async with s.post(g.url + "/v1/chat/completions", json=chat) as r:
                assert r.status == 200  # requests are served; their records are not kept
        ready = await until(not_ready, timeout=15, what="/readyz 503")
        assert ready["checks"]["database"]["ok"] is False, ready
        assert ready["checks"]["writers"]["failing"] == ["audit:database"]
        assert not path.exists()  # no empty database made in its place
        await flush()
        dropped = await _sample(s, g.admin_url, hdr, 'gateway_writer_dropped_total{reason="write_failed",'
                                                     'writer="audit:database"}')
        assert dropped == 2
        async with s.get(g.admin_url + "/audit", headers=hdr) as r:  # the admin API: retry later
            assert r.status == 503 and (await r.json())["error"]["code"] == "database_unavailable"
        # A backup put at the path under the running gateway: refused, said with what to do
        before = backup.read_bytes()
        backup.rename(path)
        async with s.post(g.url + "/v1/chat/completions", json=chat) as r:
            assert r.status == 200
        await flush()
        assert (await readyz())[0] == 503
        assert any("was replaced by another file" in r.getMessage() and "restart" in r.getMessage()
                   for r in caplog.records)
        assert path.read_bytes() == before  # not written to (nor opened: the -wal there is the other file's)
        # the original moved back: ready again without any traffic, and written from then on
        path.rename(backup)
        away.rename(path)

        async def ready_again() -> bool:
            return (await readyz())[0] == 200

        await until(ready_again, timeout=15, what="/readyz 200")  # (the writer's last failure 5 s behind)
        async with s.post(g.url + "/v1/chat/completions", json=chat) as r:
            assert r.status == 200
        await flush()
    assert await rows(path) == 4  # the 3 from before and the one after
    # Restoring the backup as documented: stop, remove the -wal and -shm, put it in place, start.
    await g.stop()
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"live.db{suffix}").unlink(missing_ok=True)
    backup.replace(path)
    g2 = await start_gateway(tmp_path / "gateway.yaml")
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(g2.url + "/v1/chat/completions", json=chat) as r:
                assert r.status == 200
        for _, w in g2.plugin("audit").sinks:
            await w.flush(10)
        assert await rows(path) == 4  # the backup's 3 and the new one
        c = sqlite3.connect(path)
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        c.close()
    finally:
        await g2.stop()


async def _sample(s: Any, admin_url: str, hdr: dict[str, str], series: str) -> float:
    async with s.get(admin_url + "/metrics", headers=hdr) as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(series):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_upgrade_keeps_the_locks_of_open_connections(tmp_path: Path) -> None:
    """A migration check with connections of this process open (a CLI command after its first
    query, a reload that adds a database plugin) must not open and close the database file itself:
    that drops every POSIX lock SQLite holds on it in this process, and the open connections then
    read a WAL they no longer own (stale rows, "database disk image is malformed")."""
    path = tmp_path / "g.db"
    db = Database(f"sqlite+aiosqlite:///{path}")
    try:
        await db.upgrade()
        async with db.engine.begin() as conn:  # a pooled connection, kept open by the pool
            await conn.execute(text("CREATE TABLE t (n INTEGER)"))
            await conn.execute(text("INSERT INTO t VALUES (1)"))
        await db.upgrade()
        # Another process writes, as a CLI command does while a gateway serves.
        code = "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('INSERT INTO t VALUES (2)'); c.commit()"
        subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=30)
        async with db.engine.connect() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar() == 2
            await conn.execute(text("INSERT INTO t VALUES (3)"))
            await conn.commit()
        with sqlite3.connect(path) as c:
            assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            assert c.execute("SELECT count(*) FROM t").fetchone() == (3,)
    finally:
        await db.close()


def _versions(path: Path) -> set[str]:
    with sqlite3.connect(path) as c:
        return {r[0] for r in c.execute("SELECT version_num FROM alembic_version")}


def test_cli_commands_never_migrate_an_existing_database(tmp_path: Path) -> None:
    """A newer CLI pointed at a database older gateways still serve: no command migrates it (a
    migration may rebuild a large table under them, for minutes, or lock an older one out); each
    asks for `gateway db upgrade`, which `db current` names as pending. A new file is still made
    by `keys create`. `gateway serve` migrates at start, and says so."""
    from alembic import command

    path = tmp_path / "old.db"
    url = f"sqlite+aiosqlite:///{path}"
    cfg = _config(tmp_path, url)
    old = sorted(h for h in heads() if not h.startswith("key_auth")) + ["key_auth_0001"]
    for rev in old:  # the schema as a release before key_auth_0002 left it
        command.upgrade(alembic_config(url), rev)
    assert _versions(path) == set(old)
    for args in (("keys", "list"), ("audit", "verify"), ("conversations", "list"), ("keys", "create", "--owner", "o")):
        r = gateway_cli(*args, "-c", str(cfg), cwd=tmp_path)
        assert r.returncode != 0 and "run `gateway db upgrade" in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert _versions(path) == set(old)
    r = gateway_cli("db", "current", "-c", str(cfg), cwd=tmp_path)
    head = next(h for h in heads() if h.startswith("key_auth"))
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == f"pending: {head} (run `gateway db upgrade`)"
    new = tmp_path / "new" / "gateway.db"
    new.parent.mkdir()
    new_cfg = _config(new.parent, f"sqlite+aiosqlite:///{new}")
    r = gateway_cli("db", "current", "-c", str(new_cfg), cwd=new.parent)  # (it makes no file: none there)
    assert r.returncode != 0 and not new.exists()
    r = gateway_cli("keys", "create", "--owner", "o", "-c", str(_config(new.parent, f"sqlite+aiosqlite:///{new}")),
                    cwd=new.parent)
    assert r.returncode == 0, r.stderr
    assert _versions(new) == heads()


async def test_serve_says_it_migrates(make_gateway: Any, tmp_path: Path, caplog: Any) -> None:
    from alembic import command

    url = f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
    old = sorted(h for h in heads() if not h.startswith("key_auth")) + ["key_auth_0001"]
    for rev in old:
        await asyncio.to_thread(command.upgrade, alembic_config(url), rev)
    caplog.set_level(logging.INFO)
    await make_gateway([{"name": "key_auth"}])
    said = [r.getMessage() for r in caplog.records if "schema" in r.getMessage()]
    head = next(h for h in heads() if h.startswith("key_auth"))
    assert said[0] == f"migrating the database schema to {head}: the listeners open when it is done"
    assert said[1].startswith("database schema migrated in ") and head in said[1]


async def test_a_schema_migrated_by_a_newer_gateway_is_left_alone(make_gateway: Any, tmp_path: Path) -> None:
    """A database a newer gateway migrated further (a rollback, or mixed versions during a rolling
    upgrade): this version starts and its CLI works, even with auto_migrate; `db current` names
    the revision it does not know instead of failing."""
    path = tmp_path / "gateway.db"
    url = f"sqlite+aiosqlite:///{path}"
    r = gateway_cli("db", "upgrade", "-c", str(_config(tmp_path, url)), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(path) as c:
        c.execute("INSERT INTO alembic_version VALUES ('key_auth_9999')")
        c.execute("DELETE FROM alembic_version WHERE version_num LIKE 'key_auth_000%'")
    cfg = write_config(tmp_path / "cli.yaml", f"admin: {{enabled: false}}\nupstream: {{url: http://127.0.0.1:9}}\n"
                                              f"database:\n  url: {url}\nplugins:\n- name: key_auth\n")
    r = gateway_cli("db", "current", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "key_auth_9999 (not known to this version: a newer gateway applied it)" in r.stdout
    r = gateway_cli("keys", "create", "--owner", "o", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    g = await make_gateway([{"name": "key_auth"}])
    assert g.gw.runtime.by_name["key_auth"] is not None
    assert "key_auth_9999" in _versions(path)


def test_an_early_parent_index_is_dropped(tmp_path: Path) -> None:
    """Databases made by the first form of conversations_0001 had an index on parent_id that the
    migration no longer makes: the next migration drops it, so every database has one schema."""
    from alembic import command

    path = tmp_path / "early.db"
    url = f"sqlite+aiosqlite:///{path}"
    command.upgrade(alembic_config(url), "conversations_0001")
    with sqlite3.connect(path) as c:
        c.execute("CREATE INDEX ix_conversations_parent_id ON conversations (parent_id)")
    r = gateway_cli("db", "upgrade", "-c", str(_config(tmp_path, url)), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(path) as c:
        names = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "ix_conversations_parent_id" not in names
    assert next(h for h in heads() if h.startswith("conversations")) in _versions(path)  # (past conversations_0002)


def test_multi_row_inserts_use_a_few_statement_sizes() -> None:
    """SQLite keeps every statement text it compiled (128 per connection, ~1.5 KB per row of a
    multi-row INSERT): the writers cut any batch into statements of a fixed set of sizes, so the
    cache (and the process) stops growing instead of keeping one statement per batch size."""
    from gateway.db import ROW_CHUNKS, row_chunks

    sizes: set[int] = set()
    for n in range(0, 3000):
        for most in (ROW_CHUNKS[0], 1600, 49):
            parts = list(row_chunks(n, most))
            assert [i for i, _ in parts] == [sum(k for _, k in parts[:j]) for j in range(len(parts))]
            assert sum(k for _, k in parts) == n and all(k <= most for _, k in parts)
            sizes.update(k for _, k in parts)
    assert sizes == set(ROW_CHUNKS)


async def test_a_held_migration_lock_is_said_and_does_not_hold_the_process(tmp_path: Path, upstream: Any) -> None:
    """Another process holds the SQLite migration lock (a stuck `gateway db upgrade`): a gateway on
    a database already at head starts without it; one that must migrate says what it waits for,
    and SIGTERM stops it (the wait does not hold the process's exit)."""
    import fcntl

    from .helpers import GatewayProcess, base_config, free_port

    at_head = tmp_path / "head.db"
    r = gateway_cli("db", "upgrade", "-c", str(_config(tmp_path, f"sqlite+aiosqlite:///{at_head}")), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    fresh = tmp_path / "fresh.db"
    holders = [open(str(p) + ".lock", "ab") for p in (at_head, fresh)]
    try:
        for f in holders:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        procs = []
        for db in (at_head, fresh):
            port = free_port()
            cfg = base_config(upstream.url, tmp_path, [{"name": "audit"}], server={"port": port},
                              admin={"enabled": False}, database={"url": f"sqlite+aiosqlite:///{db}"})
            procs.append(GatewayProcess(write_config(tmp_path / f"{db.stem}.yaml", cfg), port, None).start())
        try:
            await procs[0].wait_ready()  # at head: started with the lock held elsewhere
            deadline = asyncio.get_running_loop().time() + 20
            while "waiting for the migration lock" not in procs[1].log():
                assert asyncio.get_running_loop().time() < deadline, procs[1].log()[-2000:]
                await asyncio.sleep(0.1)
            procs[1].signal(15)
            assert await asyncio.to_thread(procs[1].wait, 15) == 0
        finally:
            for p in procs:
                p.stop()
    finally:
        for f in holders:
            f.close()


async def test_a_read_only_sqlite_file_is_refused_at_start_and_reopened_after(tmp_path: Path) -> None:
    """SQLite opens a file it may not write read-only, and that connection stays read-only after
    the file is made writable. The start-up check says the file cannot be written; a write refused
    as read-only drops its connection, so the writers' next attempt opens a new one."""
    path = tmp_path / "g.db"
    rw = Database(f"sqlite+aiosqlite:///{path}")
    await rw.upgrade()
    await rw.close()
    ro = Database(f"sqlite+aiosqlite:///file:{path}?mode=ro&uri=true")  # what a read-only file gives
    opened: list[int] = []
    from sqlalchemy import event

    event.listen(ro.engine.sync_engine, "connect", lambda *_: opened.append(1))
    try:
        with pytest.raises(DatabaseError, match="cannot be written"):
            await ro.check()
        n = len(opened)
        for _ in range(2):
            with pytest.raises(Exception, match="readonly"):
                async with ro.engine.begin() as conn:
                    await conn.execute(text("DELETE FROM audit_events"))
        assert len(opened) == n + 2  # each refused write's connection was dropped, a new one opened
    finally:
        await ro.close()


async def test_postgresql_sessions_left_read_only_are_replaced_once_writes_are_taken_again(
        pg_url: str, pg_cluster: str) -> None:
    """A database set read-only (default_transaction_read_only, as an operator does for a full
    disk; a primary demoted by a failover alike) and then writable again: the pool's sessions, begun
    read-only, stay so. A write refused as read-only drops them, so the next attempt writes."""
    import asyncpg

    db = Database(pg_url)
    await db.upgrade()
    name = db.engine.url.database
    admin = await asyncpg.connect(pg_cluster)

    async def write() -> None:
        async with db.engine.begin() as conn:
            await conn.execute(text("DELETE FROM audit_events"))

    try:
        await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
        for _ in range(3):  # (a terminated session is found and replaced first)
            with contextlib.suppress(Exception):
                await write()
        with pytest.raises(Exception, match="read-only") as refused:
            await write()
        # what /readyz and the writers' log lines say of it
        assert store_error(refused.value) == ("ReadOnlySQLTransactionError (SQLSTATE 25006)", False)
        await admin.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        with contextlib.suppress(Exception):
            await write()  # (the session this one found was begun read-only: refused, and dropped)
        await write()
        await write()
    finally:
        await admin.close()
        await db.close()


async def test_start_goes_ahead_while_another_process_holds_the_write_lock(make_gateway: Any, tmp_path: Path) -> None:
    """The start-up check that the SQLite file can be written takes the write lock; another
    process holding it for longer than busy_timeout (a long purge, a VACUUM) must not stop the
    gateway from starting."""
    path = tmp_path / "gateway.db"
    r = gateway_cli("db", "upgrade", "-c", str(_config(tmp_path, f"sqlite+aiosqlite:///{path}")), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA journal_mode=WAL")  # as the gateway leaves it
    try:
        holder.execute("BEGIN IMMEDIATE")
        g = await make_gateway([{"name": "audit"}], database={"url": f"sqlite+aiosqlite:///{path}",
                                                               "busy_timeout_ms": 200})
        assert g.gw.runtime.by_name["audit"] is not None
    finally:
        holder.execute("ROLLBACK")
        holder.close()


async def test_postgresql_migration_waiting_for_the_lock_stops_on_sigterm(tmp_path: Path, pg_url: str,
                                                                          upstream: Any) -> None:
    """Another instance holds the migration's advisory lock (a migration under way, or stuck):
    a gateway starting with auto_migrate waits, and SIGTERM stops it (PostgreSQL migrations are
    transactional, so the wait runs where the exit does not wait for it)."""
    import asyncpg

    from .helpers import GatewayProcess, base_config, free_port

    LOCK_ID = 0x6761746577  # gateway/migrations/env.py (not importable outside a migration run)
    holder = await asyncpg.connect(pg_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        tr = holder.transaction()
        await tr.start()
        await holder.execute(f"SELECT pg_advisory_xact_lock({LOCK_ID})")
        port = free_port()
        cfg = base_config(upstream.url, tmp_path, [{"name": "audit"}], server={"port": port},
                          admin={"enabled": False}, database={"url": pg_url, "auto_migrate": True})
        proc = GatewayProcess(write_config(tmp_path / "pg.yaml", cfg), port, None).start()
        try:
            deadline = asyncio.get_running_loop().time() + 20
            while "gateway starting" not in proc.log():
                assert asyncio.get_running_loop().time() < deadline, proc.log()[-2000:]
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # into the migration, waiting for the lock
            proc.signal(15)
            assert await asyncio.to_thread(proc.wait, 15) == 0
        finally:
            proc.stop()
        await tr.rollback()
    finally:
        await holder.close()


async def test_db_backup_copies_what_the_write_ahead_log_holds_while_the_gateway_runs(
        make_gateway: Any, tmp_path: Path) -> None:
    """`gateway db backup FILE` on a running gateway's SQLite file: a consistent copy, with what
    is still only in the -wal file (a key revoked a moment ago), that verifies; it never
    overwrites a file; on PostgreSQL it points at pg_dump."""
    import aiohttp

    from .test_key_auth import admin, bearer, new_key

    g = await make_gateway([{"name": "key_auth"}, {"name": "audit"}])
    keep, revoked = await new_key(g), await new_key(g)
    assert (await admin(g, "POST", f"/keys/{revoked['id']}/revoke"))[0] == 200
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(g.url + "/v1/chat/completions", headers=bearer(keep["key"]),
                              json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}) as r:
                assert r.status == 200
    for _, w in g.plugin("audit").sinks:
        await w.flush(10)
    cfg = tmp_path / "gateway.yaml"
    out = tmp_path / "backups" / "gw.db"
    out.parent.mkdir()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway", "db", *args, "-c", str(cfg)],
                              capture_output=True, text=True, timeout=60)

    r = await asyncio.to_thread(cli, "backup", str(out))
    assert r.returncode == 0 and "To restore it: stop the gateway" in r.stdout, r.stderr
    c = sqlite3.connect(out)
    try:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert c.execute("SELECT revoked_at IS NOT NULL FROM api_keys WHERE id = ?", (revoked["id"],)).fetchone()[0]
        assert c.execute("SELECT count(*) FROM audit_events WHERE type = 'request'").fetchone()[0] == 3
    finally:
        c.close()
    copy_cfg = tmp_path / "copy.yaml"
    copy_cfg.write_text(cfg.read_text().replace(str(tmp_path / "gateway.db"), str(out)))
    v = subprocess.run([sys.executable, "-m", "gateway", "audit", "verify", "-c", str(copy_cfg)],
                       capture_output=True, text=True, timeout=60)
    assert v.returncode == 0 and "intact" in v.stdout, v.stdout + v.stderr
    before = out.read_bytes()
    r = await asyncio.to_thread(cli, "backup", str(out))
    assert r.returncode == 2 and "exists" in r.stderr and out.read_bytes() == before
    pg = tmp_path / "pg.yaml"
    pg.write_text(cfg.read_text().replace(f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}",
                                          "postgresql+asyncpg://u:p@127.0.0.1:9/x"))
    r = subprocess.run([sys.executable, "-m", "gateway", "db", "backup", str(tmp_path / "x.db"), "-c", str(pg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "pg_dump" in r.stderr


async def test_the_sqlite_write_ahead_log_size_is_a_metric(make_gateway: Any, tmp_path: Path) -> None:
    """gateway_sqlite_wal_bytes follows the -wal file (a read that stops checkpoints makes it grow)."""
    import aiohttp

    from .helpers import ADMIN_TOKEN

    g = await make_gateway([{"name": "audit"}])
    hdr = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    reader = sqlite3.connect(tmp_path / "gateway.db")
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM audit_events").fetchone()  # a read transaction held open
        async with aiohttp.ClientSession() as s:
            first = await _sample(s, g.admin_url, hdr, "gateway_sqlite_wal_bytes")
            for _ in range(20):
                async with s.post(g.url + "/v1/chat/completions",
                                  json={"model": "m", "messages": [{"role": "user", "content": "x" * 2000}]}) as r:
                    assert r.status == 200
            await g.plugin("audit").sinks[0][1].flush(10)
            grown = await _sample(s, g.admin_url, hdr, "gateway_sqlite_wal_bytes")
        wal = (tmp_path / "gateway.db-wal").stat().st_size
        assert grown > first and grown == wal, (first, grown, wal)
    finally:
        reader.close()


async def test_memory_reads_of_reasoning_turns_use_an_index_on_conversation_and_request(tmp_path: Path) -> None:
    """Conversation memory joins answers to their turns by (conversation_id, request_id): SQLite
    must find each turn by both (with conversation_id alone it looked through every turn of the
    conversation for each message, seconds for a conversation of thousands)."""
    from sqlalchemy import event

    from gateway.plugins.conversations.store import ConversationStore

    path = tmp_path / "plan.db"
    d = Database(f"sqlite+aiosqlite:///{path}")
    await d.upgrade()
    seen: list[tuple[str, Any]] = []
    event.listen(d.engine.sync_engine, "before_cursor_execute",
                 lambda conn, cursor, stmt, params, context, many: seen.append((stmt, params)))
    try:
        await ConversationStore(d).load_reasoning("c" * 24, 100)
    finally:
        await d.close()
    (stmt, params), = [x for x in seen if "conversation_turns" in x[0]]
    with sqlite3.connect(path) as c:
        plan = [r[3] for r in c.execute("EXPLAIN QUERY PLAN " + stmt, params)]
    assert any("ix_conversation_turns_conversation_request (conversation_id=? AND request_id=?)" in p
               for p in plan), plan
