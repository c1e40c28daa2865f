"""The audit trail at size: a retention purge deletes in chunks (writers get the lock between
them, the chain verifies after each one, even if the purge is cut short); on SQLite ``seq`` is the
rowid (audit_0002 rebuilds older tables), so filtered pages in seq order use their index with no
sort; admin reads of the trail are bounded so they cannot take the request path's connections."""
from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import select
from sqlalchemy.dialects import sqlite as sqlite_dialect

from gateway.db import Database, alembic_config
from gateway.plugins.audit import api as audit_api
from gateway.plugins.audit import store

from .helpers import ADMIN_TOKEN

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def iso(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


NOW = dt.datetime.utcnow()
OLD, NEW, CUTOFF = iso(NOW - dt.timedelta(days=2)), iso(NOW), iso(NOW - dt.timedelta(days=1))


async def fresh_db(path: Path) -> Database:
    d = Database(f"sqlite+aiosqlite:///{path}")
    await d.upgrade()
    return d


def old_events(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"time": OLD, "type": "request", "owner": f"o{i % 7}", "key_id": f"k{i % 11}", "status": 200, "n": i}
            for i in range(start, start + n)]


def types_by_seq(path: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(path) as c:
        return list(c.execute("SELECT seq, type FROM audit_events ORDER BY seq"))


# -- finding 1: the purge, in chunks ---------------------------------------------------------------------
async def test_a_purge_deletes_in_chunks_and_lets_writers_in_between(tmp_path: Path, monkeypatch: Any) -> None:
    """Each chunk is its own transaction with its own audit.purged event: appends from another
    writer commit between chunks, and the chain verifies at every moment while the purge runs."""
    monkeypatch.setattr(store, "PURGE_CHUNK", 400, raising=False)
    monkeypatch.setattr(store, "PURGE_PAUSE", 0.05, raising=False)
    path = tmp_path / "a.db"
    d = await fresh_db(path)
    other = Database(f"sqlite+aiosqlite:///{path}")  # another instance on the same file
    try:
        await store.append(d, old_events(3000))
        await store.append(d, [{"time": NEW, "type": "request", "n": "new"}])
        purge = asyncio.create_task(store.purge(d, CUTOFF))
        checks = 0
        while not purge.done():
            await store.append(other, [{"time": NEW, "type": "key.created", "n": checks}])
            res = await store.verify(other)
            assert res.ok, res.message()
            checks += 1
            await asyncio.sleep(0.01)
        ev = await purge
        rows = types_by_seq(path)
        purged = [s for s, t in rows if t == "audit.purged"]
        assert len(purged) == 8  # 3000 rows in chunks of 400, an event each
        assert all(t != "request" or s > 3000 for s, t in rows)  # every old event gone, the new one kept
        # Appends of the other writer were committed between the chunks, not all after the purge.
        assert any(t == "key.created" and purged[0] < s < purged[-1] for s, t in rows)
        assert ev is not None and ev["total"] == 3000 and ev["anchor"]["seq"] == 3000
        res = await store.verify(d)
        assert res.ok and res.anchor == {"seq": 3000, "hash": ev["anchor"]["hash"]}, res.message()
    finally:
        await other.close()
        await d.close()


class Stop(Exception):
    pass


async def test_a_purge_cut_short_leaves_a_verifiable_chain_and_the_next_one_finishes(tmp_path: Path,
                                                                                      monkeypatch: Any) -> None:
    monkeypatch.setattr(store, "PURGE_CHUNK", 500, raising=False)
    monkeypatch.setattr(store, "PURGE_PAUSE", 0.0, raising=False)
    path = tmp_path / "a.db"
    d = await fresh_db(path)
    try:
        await store.append(d, old_events(1800))
        seen: list[dict[str, Any]] = []

        def die_after_two(ev: dict[str, Any]) -> None:  # the process stops after the second chunk
            seen.append(ev)
            if len(seen) == 2:
                raise Stop

        try:
            await store.purge(d, CUTOFF, on_event=die_after_two)
        except Stop:
            pass
        assert [e["deleted"] for e in seen] == [500, 500]
        assert [e["anchor"]["seq"] for e in seen] == [500, 1000]
        res = await store.verify(d)
        assert res.ok and res.first_seq == 1001 and res.anchor["seq"] == 1000, res.message()
        ev = await store.purge(d, CUTOFF)  # the next run deletes the rest (its own events stay: new)
        assert ev is not None and ev["total"] == 800 and ev["first_deleted_seq"] == 1501
        res = await store.verify(d)
        assert res.ok and res.anchor["seq"] == 1800, res.message()
        assert [t for _, t in types_by_seq(path)] == ["audit.purged"] * 4
    finally:
        await d.close()


# -- finding 2: seq is the rowid on SQLite -----------------------------------------------------------------
def _page_sql(f: dict[str, Any], order: str, cursor: int | None) -> str:
    """The statement store.query runs for a page (and iter_rows, ascending)."""
    c = store.events.c
    q = store._filters(select(c.seq, c.data, c.hash), f)
    if order == "asc":
        q = (q.where(c.seq > cursor) if cursor else q).order_by(c.seq.asc())
    else:
        q = (q.where(c.seq < cursor) if cursor else q).order_by(c.seq.desc())
    q = q.limit(101)
    return str(q.compile(dialect=sqlite_dialect.dialect(), compile_kwargs={"literal_binds": True}))


def assert_pages_use_their_index(path: Path) -> None:
    with sqlite3.connect(path) as c:
        c.execute("ANALYZE")  # as after a while in production: the planner knows the table is big
        for col, f in (("type", {"type": "request"}), ("owner", {"owner": "o3"}), ("key_id", {"key_id": "k5"})):
            for order in ("asc", "desc"):
                for cursor in (None, 1500):
                    sql = _page_sql(f, order, cursor)
                    plan = " | ".join(r[3] for r in c.execute("EXPLAIN QUERY PLAN " + sql))
                    assert "TEMP B-TREE" not in plan and f"ix_audit_events_{col}" in plan, (f, order, cursor, plan)
                    got = [r[0] for r in c.execute(sql)]
                    assert got == sorted(got, reverse=order == "desc") and got  # and the answer is right


def _dump(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as c:
        return list(c.execute("SELECT * FROM audit_events ORDER BY seq"))


def _indexes(path: Path) -> set[tuple[str, str]]:
    with sqlite3.connect(path) as c:
        return {(n, s) for n, s in c.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                                             "AND tbl_name = 'audit_events' AND sql IS NOT NULL")}


def _seq_decl(path: Path) -> str:
    with sqlite3.connect(path) as c:
        return next(t for _, n, t, _, _, pk in c.execute("PRAGMA table_info(audit_events)") if n == "seq" and pk)


async def test_audit_0002_makes_seq_the_rowid_keeping_rows_and_chain(tmp_path: Path) -> None:
    from alembic import command

    path = tmp_path / "old.db"
    url = f"sqlite+aiosqlite:///{path}"
    await asyncio.to_thread(command.upgrade, alembic_config(url), "audit_0001")  # as audit_0001 left it
    assert _seq_decl(path) == "BIGINT"
    d = Database(url)
    try:
        await store.append(d, old_events(2500) + [{"time": NEW, "type": "auth_failure", "client_ip": "10.0.0.9"}])
        assert await store.purge(d, CUTOFF) is not None  # a purge anchor, so verify starts after it
        before, ix_before = _dump(path), _indexes(path)
        assert (await store.verify(d)).ok
    finally:
        await d.close()
    d = Database(url)
    try:
        assert "audit_0003" in await d.upgrade()  # (through audit_0002)
        res = await store.verify(d)
        assert res.ok and res.anchor is not None and res.rows == len(before), res.message()
        await store.append(d, old_events(10, start=9000))  # appends go on after the rebuild
        assert (await store.verify(d)).ok
    finally:
        await d.close()
    assert _seq_decl(path) == "INTEGER"
    after = _dump(path)
    # (the same indexes; the one on type is (type, seq) since audit_0003)
    assert after[:len(before)] == before and _indexes(path) == {
        ("ix_audit_events_type_seq", "CREATE INDEX ix_audit_events_type_seq ON audit_events (type, seq)")
        if name == "ix_audit_events_type" else (name, sql) for name, sql in ix_before}
    with sqlite3.connect(path) as c:
        assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert not c.execute("SELECT name FROM sqlite_master WHERE name LIKE '%rebuild%'").fetchall()
        # seq is the rowid now: no hidden rowid that could differ from it
        assert c.execute("SELECT count(*) FROM audit_events WHERE rowid != seq").fetchone() == (0,)


async def test_filtered_pages_in_seq_order_need_no_sort(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    d = await fresh_db(path)  # a new database: audit_0001 then audit_0002
    try:
        await store.append(d, old_events(3000) + [{"time": NEW, "type": "auth_failure"}] * 50)
    finally:
        await d.close()
    assert _seq_decl(path) == "INTEGER"
    assert_pages_use_their_index(path)


# -- finding 3: admin reads are bounded ------------------------------------------------------------------
async def test_concurrent_admin_audit_reads_wait_their_turn(make_gateway: Any, monkeypatch: Any) -> None:
    """Many slow GET /audit at once: two run, the others wait (each holds a pooled connection the
    request path needs); every one is answered in the end."""
    g = await make_gateway([{"name": "audit"}])
    bound = getattr(audit_api, "MAX_CONCURRENT_READS", 2)
    running, most, gate = 0, 0, asyncio.Event()
    real = store.query

    async def slow_query(*a: Any, **kw: Any) -> Any:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await gate.wait()
            return await real(*a, **kw)
        finally:
            running -= 1

    monkeypatch.setattr(store, "query", slow_query)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        async def get() -> int:
            async with s.get(g.admin_url + "/audit", params={"type": "request"}, headers=AUTH) as r:
                await r.read()
                return r.status

        tasks = [asyncio.create_task(get()) for _ in range(6)]
        for _ in range(500):
            if running >= bound:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # room for the other four to get in, were they let in
        assert most == bound and not any(t.done() for t in tasks), most
        gate.set()
        assert await asyncio.gather(*tasks) == [200] * 6
    assert most == bound


async def test_audit_0002_leaves_postgresql_as_it_is(pg_url: str) -> None:
    """PostgreSQL keeps its BIGINT key (nothing to rebuild there); the chain works after it."""
    from sqlalchemy import text

    d = Database(pg_url)
    try:
        assert "audit_0003" in await d.upgrade()  # (through audit_0002)
        await store.append(d, old_events(50))
        assert await store.purge(d, CUTOFF) is not None
        res = await store.verify(d)
        assert res.ok and res.anchor == {"seq": 50, "hash": res.anchor["hash"]}, res.message()
        async with d.engine.connect() as c:
            typ = (await c.execute(text("SELECT data_type FROM information_schema.columns "
                                        "WHERE table_name = 'audit_events' AND column_name = 'seq'"))).scalar()
        assert typ == "bigint"
    finally:
        await d.close()


async def test_the_newest_event_of_a_type_is_one_index_probe_on_postgresql(pg_url: str) -> None:
    """Every audit write reads MAX(seq) of two rare types (audit.chain_key, audit.purged). The driver
    prepares statements, and PostgreSQL plans a prepared statement once for any value after five
    runs (a generic plan): for "any type", on a trail of requests, a backward scan of the whole
    primary key looked cheapest (0.5 to 0.9 s per write at a million events: the writer fell
    behind, and a stop lost what it still held). The statements the writer runs are planned here
    as the server plans them then: each must probe the (type, seq) index."""
    from sqlalchemy import event, text

    d = Database(pg_url)
    try:
        assert "audit_0003" in await d.upgrade()
        for i in range(4):
            await store.append(d, old_events(5000, 5000 * i))
        await store.append(d, [{"time": NEW, "type": "request", "n": -1}])  # (a purge keeps it)
        ran: list[tuple[str, Any]] = []

        def seen(conn: Any, cursor: Any, statement: str, parameters: Any, *a: Any) -> None:
            if "FROM audit_events" in statement and "audit_events.type =" in statement:
                ran.append((statement, parameters))

        event.listen(d.engine.sync_engine, "before_cursor_execute", seen)
        await store.append(d, old_events(1, 20000))
        assert len(ran) == 2  # (the newest audit.chain_key and audit.purged)
        await store.purge(d, CUTOFF)  # (and the purge's read of the newest purge's anchor)
        event.remove(d.engine.sync_engine, "before_cursor_execute", seen)
        assert any("ORDER BY audit_events.seq DESC" in st for st, _ in ran)
        async with d.engine.connect() as c:
            await c.execute(text("ANALYZE audit_events"))
            await c.execute(text("SET plan_cache_mode = force_generic_plan"))
            raw = (await c.get_raw_connection()).driver_connection
            for i, (statement, parameters) in enumerate(ran):
                types = f"({', '.join(['varchar'] * len(parameters))})" if parameters else ""
                await raw.execute(f"PREPARE newest{i}{types} AS {statement}")
                args = f"({', '.join(repr(p) for p in parameters)})" if parameters else ""
                plan = "\n".join(r[0] for r in await raw.fetch(f"EXPLAIN EXECUTE newest{i}{args}"))
                assert "ix_audit_events_type_seq" in plan and "pk_audit_events" not in plan, (statement, plan)
            indexes = {r[0] for r in await c.execute(text(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'audit_events'"))}
        assert "ix_audit_events_type" not in indexes  # (replaced: the new one serves its queries)
        res = await store.verify(d)
        assert res.ok, res.message()
    finally:
        await d.close()
