"""``gateway audit top``: who is busy during an incident (a leaked key, a tenant hammering the
backend), from the audit trail, grouped by key, owner or client address, on SQLite and PostgreSQL.
It was answered by exporting the trail and counting by hand."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import aiohttp

from . import test_conversations
from .helpers import ADMIN_TOKEN, until
from .test_audit import acli

db = test_conversations.db  # the fixture: SQLite and PostgreSQL

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def _count(s: aiohttp.ClientSession, g: Any, n: int) -> bool:
    """Are there ``n`` traffic events (requests and refusals) in the trail yet?"""
    async with s.get(g.admin_url + "/audit?limit=100", headers=ADMIN) as r:
        return len([e for e in (await r.json())["data"] if e["type"] in ("request", "auth_failure")]) >= n
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "one two three"}]}


async def test_top_groups_requests_and_refusals_by_key_owner_and_address(make_gateway: Any, db: Any,
                                                                          tmp_path: Path) -> None:
    g = await make_gateway([{"name": "key_auth"}, {"name": "audit", "config": {"flush_interval": 0.05}}],
                           database=db)
    async with aiohttp.ClientSession() as s:
        keys = {}
        for name, owner in (("a", "alice"), ("b", "bob"), ("c", "bob")):
            async with s.post(g.admin_url + "/keys", headers=ADMIN, json={"owner": owner, "name": name}) as r:
                keys[name] = await r.json()
        async with s.post(g.admin_url + f"/keys/{keys['c']['id']}/revoke", headers=ADMIN) as r:
            assert r.status == 200
        for name, n in (("a", 4), ("b", 1), ("c", 2)):
            for _ in range(n):
                async with s.post(g.url + "/v1/chat/completions", json=CHAT,
                                  headers={"Authorization": f"Bearer {keys[name]['key']}"}) as r:
                    await r.read()
                    assert r.status == (401 if name == "c" else 200)

        async def traffic() -> Any:
            async with s.get(g.admin_url + "/audit", headers=ADMIN) as r:
                got = [e for e in (await r.json())["data"] if e["type"] in ("request", "auth_failure")]
            return got if len(got) == 7 else None

        evs = await until(traffic, what="seven audit events")
        # a record holding the JSON escape of a NUL (a path a client sent without a key): PostgreSQL's
        # jsonb refuses it, and `top` failed for everyone while it was in the window
        async with s.post(g.url + "/v1/chat/completions%00", json=CHAT) as r:
            assert r.status in (400, 401)
        await until(lambda: _count(s, g, 8), what="the NUL request's audit event")
    tokens_in = {k: sum(e.get("tokens_in") or 0 for e in evs if e["key_id"] == keys[k]["id"]) for k in keys}
    assert tokens_in["a"] > 0
    cfg = tmp_path / "gateway.yaml"

    r = await acli(cfg, "top", "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    by_key = {row["key"]: row for row in rows}
    a, b, c = (by_key[keys[k]["id"]] for k in "abc")
    assert rows[0]["key"] == keys["a"]["id"]  # the busiest first
    assert (a["events"], a["requests"], a["refused"], a["tokens_in"], a["ips"]) == (4, 4, 0, tokens_in["a"], 1)
    assert a["tokens_out"] > 0
    assert (b["events"], b["requests"], b["refused"]) == (1, 1, 0)
    assert (c["events"], c["requests"], c["refused"], c["tokens_in"]) == (2, 0, 2, 0)

    r = await acli(cfg, "top", "--by", "owner", "--sort", "refused", "--json")
    owners = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(o["owner"], o["events"], o["refused"]) for o in owners] == [("bob", 3, 2), ("alice", 4, 0)], owners

    r = await acli(cfg, "top", "--by", "ip")
    assert r.returncode == 0 and r.stdout.splitlines()[0].split()[:3] == ["IP", "EVENTS", "REQS"], r.stdout
    assert r.stdout.splitlines()[1].split()[:2] == ["127.0.0.1", "8"], r.stdout

    # --until alone: the 15 minutes before it (it looked from 15 minutes before now to then)
    soon = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    r = await acli(cfg, "top", "--by", "ip", "--until", soon, "--json")
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[0])["events"] == 8, r.stdout + r.stderr

    r = await acli(cfg, "top", "--since", "2000-01-01T00:00:00Z", "--until", "2000-01-02T00:00:00Z")
    assert r.returncode == 0 and "(no events)" in r.stdout
    r = await acli(cfg, "top", "--by", "path")
    assert r.returncode == 2 and "invalid choice" in r.stderr


async def test_top_reads_the_time_window_through_its_index_on_sqlite(tmp_path: Path, monkeypatch: Any) -> None:
    """SQLite's planner took the type index (which nearly every row matches) or the grouped
    column's: `top --since 1m` read the whole trail (110 ms on 200,000 events, against 4 ms)."""
    import sqlite3

    import sqlalchemy.ext.asyncio as sea
    from sqlalchemy.dialects import sqlite as sqlite_dialect

    from gateway.db import Database
    from gateway.plugins.audit import store

    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    await db.upgrade()
    seen: list[Any] = []
    execute = sea.AsyncConnection.execute

    async def recording(self: Any, stmt: Any, *a: Any, **k: Any) -> Any:
        seen.append(stmt)
        return await execute(self, stmt, *a, **k)

    monkeypatch.setattr(sea.AsyncConnection, "execute", recording)
    try:
        for by in store.TOP_BY:
            await store.top(db, {"since": "2026-01-01T00:00:00.000000Z", "type": "request,auth_failure"}, by)
            sql = str(seen[-1].compile(dialect=sqlite_dialect.dialect(), compile_kwargs={"literal_binds": True}))
            with sqlite3.connect(tmp_path / "a.db") as con:
                plan = " ".join(r[-1] for r in con.execute("EXPLAIN QUERY PLAN " + sql))
            assert "USING INDEX ix_audit_events_time" in plan, (by, plan)
    finally:
        await db.close()
