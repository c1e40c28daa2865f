"""conversations: caller and admin APIs, CLI, retention, queue policy, database outage, SIGTERM."""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from .helpers import GatewayProcess, base_config, free_port, write_config
from .test_conversations import ADMIN, chat, db, start, stored  # noqa: F401  (db is a fixture)


async def metric(g: Any, name: str, **labels: str) -> float:
    async with aiohttp.ClientSession() as s:
        async with s.get(g.admin_url + "/metrics", headers=ADMIN) as r:
            text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- caller API ----------------------------------------------------------------------------------------
async def test_caller_api_list_read_delete_paginated(make_gateway: Any, upstream: Any, tmp_path: Path) -> None:
    # server.paths limits what is proxied; the plugin's own API stays reachable.
    g = await start(make_gateway, {"url": f"sqlite+aiosqlite:///{tmp_path / 'c.db'}"}, {"page_size": 2},
                    server={"paths": ["/v1/"]})
    ids = []
    for i in range(3):
        st, h, b = await chat(g, [{"role": "system", "content": "s"}, {"role": "user", "content": f"hello {i}"}])
        ids.append(h["X-Conversation-ID"])
    n_upstream = len(upstream.requests)
    base = g.url + "/gateway/conversations"
    async with aiohttp.ClientSession() as s:
        for other in ("/gateway/other", "/gateway/conversationsX/secret", "/gateway/conversations-admin"):
            async with s.get(g.url + other) as r:
                assert r.status == 404, other  # outside server.paths and not the plugin's
        async with s.get(base) as r:
            p1 = await r.json()
        assert p1["object"] == "list" and len(p1["data"]) == 2 and p1["has_more"]
        async with s.get(base, params={"cursor": p1["next_cursor"]}) as r:
            p2 = await r.json()
        assert len(p2["data"]) == 1 and not p2["has_more"]
        assert {c["id"] for c in p1["data"] + p2["data"]} == set(ids)
        assert p1["data"][0]["id"] == ids[-1]           # newest activity first
        async with s.get(f"{base}/{ids[0]}", params={"limit": 2}) as r:
            c = await r.json()
        assert [m["position"] for m in c["messages"]] == [0, 1] and c["has_more"] and c["message_count"] == 3
        async with s.get(f"{base}/{ids[0]}", params={"after": c["next_after"]}) as r:
            c2 = await r.json()
        assert [m["role"] for m in c2["messages"]] == ["assistant"] and not c2["has_more"]
        assert c2["messages"][0]["status"] == "complete"
        async with s.delete(f"{base}/{ids[0]}") as r:
            assert r.status == 200 and (await r.json())["deleted"] is True
        async with s.get(f"{base}/{ids[0]}") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "conversation_not_found"
        async with s.post(base) as r:
            assert r.status == 405 and (await r.json())["error"]["code"] == "method_not_allowed"
        async with s.get(f"{base}/a/b") as r:
            assert r.status == 404
        async with s.get(base, params={"limit": "x"}) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "limit"
        async with s.get(base, params={"cursor": "!!"}) as r:
            assert r.status == 400
    assert len(upstream.requests) == n_upstream          # the caller API is never forwarded
    st, h, b = await chat(g, [{"role": "user", "content": "again"}], ids[0])
    assert st == 404                                     # a deleted conversation cannot be continued


# -- admin API -------------------------------------------------------------------------------------------
async def test_admin_api_search_show_export_delete_purge(make_gateway: Any, db: dict[str, Any]) -> None:
    g = await start(make_gateway, db, key_auth=True)
    events: list[tuple[str, dict[str, Any]]] = []
    g.services.events.subscribe(lambda t, f: events.append((t, f)))
    keys = {}
    async with aiohttp.ClientSession() as s:
        for owner in ("alice", "bob"):
            async with s.post(g.admin_url + "/keys", json={"owner": owner, "name": owner}, headers=ADMIN) as r:
                keys[owner] = await r.json()
    st, h, _ = await chat(g, [{"role": "user", "content": "Zebra stripes"}], key=keys["alice"]["key"])
    a1 = h["X-Conversation-ID"]
    st, h, _ = await chat(g, [{"role": "user", "content": "café crème"}], key=keys["alice"]["key"])
    a2 = h["X-Conversation-ID"]
    st, h, _ = await chat(g, [{"role": "user", "content": "bob here"}], key=keys["bob"]["key"])
    b1 = h["X-Conversation-ID"]
    adm = g.admin_url
    async with aiohttp.ClientSession(headers=ADMIN) as s:
        async def get(path: str, **params: Any) -> Any:
            async with s.get(adm + path, params=params) as r:
                assert r.status == 200, await r.text()
                return await r.json()
        assert {c["id"] for c in (await get("/conversations"))["data"]} == {a1, a2, b1}
        assert {c["id"] for c in (await get("/conversations", owner="alice"))["data"]} == {a1, a2}
        assert {c["id"] for c in (await get("/conversations", key_id=keys["bob"]["id"]))["data"]} == {b1}
        # a whole key (pasted when hunting a leaked one) means its id; what is neither is refused
        # (an empty list would read as "this key started nothing"), and not echoed
        assert {c["id"] for c in (await get("/conversations", key_id=keys["bob"]["key"]))["data"]} == {b1}
        for bad in ("bob", keys["bob"]["key"][:-1] + "!"):
            async with s.get(adm + "/conversations", params={"key_id": bad}) as r:
                body = await r.text()
                assert r.status == 400 and json.loads(body)["error"]["param"] == "key_id", body
                assert bad not in body
        assert [c["id"] for c in (await get("/conversations", q="zebra"))["data"]] == [a1]
        assert [c["id"] for c in (await get("/conversations", q="CAFÉ"))["data"]] in ([a2], [])  # case folding of
        assert [c["id"] for c in (await get("/conversations", q="café"))["data"]] == [a2]           # non-ASCII varies
        assert (await get("/conversations", since="2999-01-01T00:00:00Z"))["data"] == []
        assert len((await get("/conversations", until="2999-01-01T00:00:00Z"))["data"]) == 3
        p1 = await get("/conversations", limit=2)
        p2 = await get("/conversations", limit=2, cursor=p1["next_cursor"])
        assert len(p1["data"]) == 2 and p1["has_more"] and len(p2["data"]) == 1 and not p2["has_more"]
        one = await get(f"/conversations/{a1}", turns="true")
        assert one["owner"] == "alice" and len(one["messages"]) == 2 and one["turns"][0]["prompt_tokens"] > 0
        async with s.get(adm + f"/conversations/{a1}/export") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("application/x-ndjson")
            lines = (await r.text()).splitlines()
        assert [json.loads(x)["position"] for x in lines] == [0, 1]
        assert json.loads(lines[0])["content"] == "Zebra stripes"
        async with s.get(adm + "/conversations/export", params={"owner": "alice"}) as r:
            lines = [json.loads(x) for x in (await r.text()).splitlines()]
        assert len(lines) == 4 and {x["conversation_id"] for x in lines} == {a1, a2}
        for path, code in (("/conversations/export", 400), ("/conversations/conv_nope/export", 404),
                           ("/conversations/conv_nope", 404)):
            async with s.get(adm + path) as r:
                assert r.status == code and "error" in await r.json()
        async with s.delete(adm + "/conversations") as r:       # erasure needs an owner
            assert r.status == 400 and (await r.json())["error"]["param"] == "owner"
        async with s.delete(adm + f"/conversations/{b1}") as r:
            assert r.status == 200
        async with s.delete(adm + "/conversations", params={"owner": "alice"}) as r:
            assert (await r.json())["deleted"] == 2
        assert (await get("/conversations"))["data"] == []
        st, h, _ = await chat(g, [{"role": "user", "content": "new"}], key=keys["bob"]["key"])
        async with s.post(adm + "/conversations/purge", params={"older_than_days": "30"}) as r:
            assert (await r.json())["deleted"] == 0
        async with s.post(adm + "/conversations/purge", params={"older_than_days": "-1"}) as r:
            assert r.status == 400
        async with s.get(adm + "/openapi.json") as r:
            paths = (await r.json())["paths"]
        assert {"/conversations", "/conversations/{cid}", "/conversations/{cid}/export", "/conversations/export",
                "/conversations/purge"} <= set(paths)
    async with aiohttp.ClientSession() as s:
        async with s.get(adm + "/conversations") as r:
            assert r.status == 401
    kinds = [t for t, _ in events if t.startswith("conversation")]
    assert kinds == ["conversation.exported", "conversation.exported", "conversation.deleted",
                     "conversation.deleted", "conversations.purged"]
    assert all(f["actor"] == "admin" for t, f in events if t.startswith("conversation"))


async def test_a_deletion_records_each_part_as_it_commits(make_gateway: Any, tmp_path: Path) -> None:
    """A purge or an erasure deletes in parts, one transaction each: each part is recorded as it
    commits, so one cut short (a crash, the database going away) leaves a record of what it did
    delete, not thousands of conversations gone without a trace. Nothing matched: one record of 0."""
    from sqlalchemy import true
    from gateway.plugins.conversations.store import C
    g = await start(make_gateway, {"url": f"sqlite+aiosqlite:///{tmp_path / 'p.db'}"})
    for i in range(5):
        assert (await chat(g, [{"role": "user", "content": f"c{i}"}]))[0] == 200
    await g.plugin("conversations").flush()
    store = g.plugin("conversations").shared.store
    parts: list[int] = []

    def each(n: int) -> None:
        parts.append(n)
        if len(parts) == 2:
            raise RuntimeError("the connection went away")  # (after the second part's commit)

    with pytest.raises(RuntimeError):
        await store._delete_where(C.c.id.is_not(None), chunk=2, each=each)
    assert parts == [2, 2] and (await store.counts())["conversations"] == 1
    parts.clear()
    assert len(await store._delete_where(true(), chunk=2, each=parts.append)) == 1 and parts == [1]
    parts.clear()
    assert await store._delete_where(true(), chunk=2, each=parts.append) == [] and parts == [0]


async def test_retention_runs_in_background(make_gateway: Any, tmp_path: Path) -> None:
    g = await start(make_gateway, {"url": f"sqlite+aiosqlite:///{tmp_path / 'r.db'}"},
                    {"retention_days": 1 / 86400, "retention_interval": 0.3})
    events: list[str] = []
    g.services.events.subscribe(lambda t, f: events.append(t))
    st, h, _ = await chat(g, [{"role": "user", "content": "short-lived"}])
    cid = h["X-Conversation-ID"]
    assert len(await stored(g, cid)) == 2
    for _ in range(60):
        await asyncio.sleep(0.1)
        if not await stored(g, cid):
            break
    assert await stored(g, cid) == [] and "conversations.purged" in events
    st, h, b = await chat(g, [{"role": "user", "content": "x"}], cid)
    assert st == 404


async def test_retention_runs_soon_after_start_and_purges_in_chunks(make_gateway: Any, tmp_path: Path) -> None:
    """A gateway restarted more often than retention_interval still applies retention: the first
    purge runs a few seconds after start. A purge deletes in chunks, and deletes everything."""
    dbu = {"url": f"sqlite+aiosqlite:///{tmp_path / 'rs.db'}"}
    g = await start(make_gateway, dbu)
    cids = []
    for i in range(5):
        st, h, _ = await chat(g, [{"role": "user", "content": f"old {i}"}])
        cids.append(h["X-Conversation-ID"])
    await g.plugin("conversations").flush()
    await g.stop()
    db = sqlite3.connect(tmp_path / "rs.db")
    db.execute("UPDATE conversations SET updated_at = '2020-01-01 00:00:00.000000'")
    db.commit()
    db.close()
    g2 = await start(make_gateway, dbu, {"retention_days": 30, "retention_interval": 3600}, name="g2.yaml")
    events: list[str] = []
    g2.services.events.subscribe(lambda t, f: events.append(t))
    for _ in range(100):
        await asyncio.sleep(0.1)
        if "conversations.purged" in events:
            break
    assert "conversations.purged" in events  # well before the hour
    for cid in cids:
        assert await stored(g2, cid) == []
    store = g2.plugin("conversations").shared.store
    for i in range(5):
        await chat(g2, [{"role": "user", "content": f"new {i}"}])
    await g2.plugin("conversations").flush()
    from gateway.plugins.conversations.store import C as CT

    # chunks of two: three transactions, every conversation and its messages gone
    deleted = await store._delete_where(CT.c.id.isnot(None), chunk=2)
    assert len(deleted) == 5 and len(set(deleted)) == 5
    assert (await store.counts())["messages"] == 0


async def test_reload_keeps_recording(make_gateway: Any, upstream: Any, tmp_path: Path) -> None:
    dbu = {"url": f"sqlite+aiosqlite:///{tmp_path / 'rl.db'}"}
    g = await start(make_gateway, dbu)
    st, h, b = await chat(g, [{"role": "user", "content": "before reload"}])
    cid = h["X-Conversation-ID"]
    history = [{"role": "user", "content": "before reload"}, b["choices"][0]["message"]]
    path = tmp_path / "gateway.yaml"

    async def reload(plugins: list[dict[str, Any]]) -> None:
        write_config(path, base_config(upstream.url, tmp_path, plugins, database=dbu))
        async with aiohttp.ClientSession(headers=ADMIN) as s:
            async with s.post(g.admin_url + "/config/reload") as r:
                assert r.status == 200, await r.text()

    await reload([{"name": "conversations", "config": {"memory": {"enabled": True}}}])
    st, h, b = await chat(g, [{"role": "user", "content": "after reload"}], cid)  # memory now on
    assert st == 200 and h["X-Conversation-ID"] == cid
    history += [{"role": "user", "content": "after reload"}, b["choices"][0]["message"]]
    await reload([])                                              # plugin removed: its writer flushes
    await reload([{"name": "conversations"}])                     # and back
    history.append({"role": "user", "content": "back again"})
    st, h, b = await chat(g, history, cid)
    assert st == 200 and h["X-Conversation-ID"] == cid
    rows = await stored(g, cid)
    assert [r.position for r in rows] == list(range(6)) and rows[4].content == '"back again"'


# -- CLI -----------------------------------------------------------------------------------------------
def run_cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real command line, in a subprocess."""
    return subprocess.run([sys.executable, "-m", "gateway", "conversations", *args, "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60)


def run_cli_here(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The same entry point (gateway.cli.main) in this process: subprocess start-up costs seconds."""
    from gateway.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(["conversations", *args, "-c", str(cfg)])
        except SystemExit as e:
            rc = int(e.code or 0)
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


async def test_cli_list_show_export_delete_purge(make_gateway: Any, upstream: Any, tmp_path: Path) -> None:
    dbfile = tmp_path / "cli.db"
    g = await start(make_gateway, {"url": f"sqlite+aiosqlite:///{dbfile}"})
    ids = []
    for owner_text in ("first", "second"):
        st, h, _ = await chat(g, [{"role": "user", "content": f"{owner_text} conversation"}])
        ids.append(h["X-Conversation-ID"])
    await g.plugin("conversations").flush()
    await g.stop()
    cfg = write_config(tmp_path / "cli.yaml", base_config(upstream.url, tmp_path, [{"name": "conversations"}],
                                                          database={"url": f"sqlite+aiosqlite:///{dbfile}"}))
    r = await asyncio.to_thread(run_cli, cfg, "list", "--json")
    assert r.returncode == 0, r.stderr
    assert {c["id"] for c in json.loads(r.stdout)["data"]} == set(ids)
    r = await asyncio.to_thread(run_cli_here, cfg, "list", "-q", "second")
    assert ids[1] in r.stdout and ids[0] not in r.stdout
    r = await asyncio.to_thread(run_cli_here, cfg, "show", ids[0])
    assert "first conversation" in r.stdout and "assistant" in r.stdout
    r = await asyncio.to_thread(run_cli_here, cfg, "export", ids[0])
    assert [json.loads(x)["role"] for x in r.stdout.splitlines()] == ["user", "assistant"]
    out = tmp_path / "all.jsonl"
    r = await asyncio.to_thread(run_cli_here, cfg, "export", "--owner", "anonymous", "-o", str(out))
    assert r.returncode == 0 and len(out.read_text().splitlines()) == 4
    r = await asyncio.to_thread(run_cli_here, cfg, "delete", ids[0], "--json")
    assert json.loads(r.stdout) == {"deleted": 1}
    r = await asyncio.to_thread(run_cli_here, cfg, "show", ids[0])
    assert r.returncode == 1
    r = await asyncio.to_thread(run_cli_here, cfg, "purge", "--older-than", "30d")
    assert r.returncode == 0 and "purged 0" in r.stdout
    await asyncio.sleep(1.1)
    r = await asyncio.to_thread(run_cli_here, cfg, "purge", "--older-than", "1s", "--json")
    assert json.loads(r.stdout) == {"deleted": 1}
    r = await asyncio.to_thread(run_cli_here, cfg, "purge", "--older-than", "soon")
    assert r.returncode == 2


# -- the writer under pressure ---------------------------------------------------------------------------
def lock_sqlite(path: Path) -> sqlite3.Connection:
    """Another process-level writer holding the database: every write from the gateway gets SQLITE_BUSY."""
    c = sqlite3.connect(path, isolation_level=None, timeout=5)
    c.execute("BEGIN EXCLUSIVE")
    return c


async def burst_while_locked(g: Any, path: Path) -> tuple[list[Any], float]:
    """12 new conversations while the SQLite file is locked, after one warm-up record: with a queue of
    2 that drops, some are dropped, and every record is written or counted."""
    lock = lock_sqlite(path)
    try:
        res = await asyncio.gather(*(chat(g, [{"role": "user", "content": f"m{i}"}]) for i in range(12)))
        assert all(st == 200 for st, _, _ in res)        # the request path never waits on the database
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    await g.plugin("conversations").flush()
    written = await metric(g, "gateway_writer_written_total", writer="conversations")
    dropped = await metric(g, "gateway_writer_dropped_total", writer="conversations", reason="queue_full")
    assert dropped >= 1 and written + dropped == 13
    return res, dropped


async def test_queue_full_drops_are_counted(make_gateway: Any, tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    g = await start(make_gateway, {"url": f"sqlite+aiosqlite:///{path}", "busy_timeout_ms": 100},
                    {"queue_size": 2, "batch_size": 1, "on_queue_full": "drop", "flush_interval": 0.05})
    st, h, _ = await chat(g, [{"role": "user", "content": "warm up"}])
    await g.plugin("conversations").flush()
    res, dropped = await burst_while_locked(g, path)
    lost = [h["X-Conversation-ID"] for _, h, _ in res]
    found = [len(await stored(g, cid)) for cid in lost]
    assert sorted(set(found)) in ([0, 2], [2], [0])
    assert found.count(0) == dropped
    # a conversation whose only record was dropped does not exist: its id answers 404, not stale data
    gone = lost[found.index(0)]
    st, _, b = await chat(g, [{"role": "user", "content": "m"}], gone)
    assert st == 404


async def test_writer_settings_change_by_reload(make_gateway: Any, upstream: Any, tmp_path: Path) -> None:
    """Started with the default queue (10000, wait); a reload to a 2-record queue that drops applies
    at once, to the writer already running: the same locked-database burst now drops, and counts."""
    path = tmp_path / "r.db"
    dbu = {"url": f"sqlite+aiosqlite:///{path}", "busy_timeout_ms": 100}
    g = await start(make_gateway, dbu)
    st, h, _ = await chat(g, [{"role": "user", "content": "warm up"}])
    await g.plugin("conversations").flush()
    write_config(tmp_path / "gateway.yaml", base_config(upstream.url, tmp_path, [{"name": "conversations", "config": {
        "queue_size": 2, "batch_size": 1, "on_queue_full": "drop", "flush_interval": 0.05}}], database=dbu))
    async with aiohttp.ClientSession(headers=ADMIN) as s:
        async with s.post(g.admin_url + "/config/reload") as r:
            assert r.status == 200, await r.text()
    await burst_while_locked(g, path)


async def test_database_outage_during_traffic(make_gateway: Any, db: dict[str, Any], tmp_path: Path) -> None:
    url = db["url"]
    if url.startswith("sqlite"):
        db = {**db, "busy_timeout_ms": 100}
    g = await start(make_gateway, db, {"flush_interval": 0.05, "retry_for": 60})
    st, h, b = await chat(g, [{"role": "user", "content": "before the outage"}])
    cid = h["X-Conversation-ID"]
    await g.plugin("conversations").flush()
    history = [{"role": "user", "content": "before the outage"}, b["choices"][0]["message"]]
    if url.startswith("sqlite"):
        lock = lock_sqlite(Path(url.split("///", 1)[1]))
    else:
        name = url.rsplit("/", 1)[1]
        admin = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql").rsplit("/", 1)[0] + "/postgres")
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
    try:
        new_ids = []
        for i in range(5):    # new conversations and a cached one keep working while the store is down
            st, h, _ = await chat(g, [{"role": "user", "content": f"during {i}"}])
            assert st == 200
            new_ids.append(h["X-Conversation-ID"])
            history.append({"role": "user", "content": f"turn {i}"})
            st, h, b = await chat(g, history, cid)
            assert st == 200 and h["X-Conversation-ID"] == cid
            history.append(b["choices"][0]["message"])
        t0 = time.monotonic()
        while await metric(g, "gateway_writer_retries_total", writer="conversations") == 0:
            assert time.monotonic() - t0 < 10
            await asyncio.sleep(0.1)
    finally:
        if url.startswith("sqlite"):
            lock.execute("ROLLBACK")
            lock.close()
        else:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            await admin.close()
    await g.plugin("conversations").flush(30)
    assert await metric(g, "gateway_writer_dropped_total", writer="conversations") == 0
    for nid in new_ids:
        assert len(await stored(g, nid)) == 2
    rows = await stored(g, cid)
    assert [r.position for r in rows] == list(range(len(history)))


async def test_sigterm_flushes_queued_writes(upstream: Any, tmp_path: Path) -> None:
    dbfile = tmp_path / "sig.db"
    port, admin_port = free_port(), free_port()
    cfg = base_config(upstream.url, tmp_path, [{"name": "conversations", "config": {"flush_interval": 3.0,
                                                                                     "batch_size": 1000}}],
                      server={"port": port}, admin={"port": admin_port},
                      database={"url": f"sqlite+aiosqlite:///{dbfile}"})
    p = GatewayProcess(write_config(tmp_path / "sig.yaml", cfg), port, admin_port).start()
    try:
        await p.wait_ready()
        async with aiohttp.ClientSession() as s:
            async def one(i: int) -> int:
                async with s.post(p.url + "/v1/chat/completions", json={
                        "model": "demo-chat", "messages": [{"role": "user", "content": f"q{i}"}]}) as r:
                    await r.read()
                    return r.status
            assert await asyncio.gather(*(one(i) for i in range(30))) == [200] * 30
        c = sqlite3.connect(dbfile)
        queued = c.execute("SELECT count(*) FROM conversation_messages").fetchone()[0]
        c.close()
        assert queued < 60                                # still in the writer's queue
        p.signal(signal.SIGTERM)
        assert await asyncio.to_thread(p.wait, 30) == 0
    finally:
        p.stop()
    c = sqlite3.connect(dbfile)
    try:
        assert c.execute("SELECT count(*) FROM conversation_messages").fetchone()[0] == 60
        assert c.execute("SELECT count(*) FROM conversations").fetchone()[0] == 30
        assert c.execute("SELECT count(*) FROM conversation_turns").fetchone()[0] == 30
    finally:
        c.close()
    assert "not written" not in p.log()


async def test_store_writes_a_large_batch_in_chunks(db: dict[str, Any]) -> None:
    """A batch bigger than one statement's parameter limit is split, rows keep their exact values."""
    import datetime as dt

    from gateway.db import Database
    from gateway.plugins.conversations import digest, new_id
    from gateway.plugins.conversations.store import ConversationStore, TurnRecord, message_row

    d = Database(db["url"])
    await d.upgrade()
    store = ConversationStore(d)
    t0 = dt.datetime(2026, 1, 2, 3, 4, 5)
    recs = []
    for i in range(1000):
        msgs = [{"role": "user", "content": f"q{i}", "name": "n"}, {"role": "assistant", "content": [{"type": "text", "text": "é"}]}]
        rows = [message_row(m, digest(m), tokens=i, tokens_derived=j == 0, created_at=t0, model="m", request_id=str(i),
                            key_id=None, owner="o") for j, m in enumerate(msgs)]
        recs.append(TurnRecord(new_id(), "o", None, True, None, None, 0, rows,
                               {"model": "m", "request_id": str(i), "key_id": None, "owner": "o", "status": "complete",
                                "http_status": 200, "memory": False, "stream": False, "prompt_tokens": i,
                                "completion_tokens": 1, "total_tokens": i + 1, "usage": None, "latency_ms": 1.5,
                                "ttft_ms": None, "created_at": t0}, t0))
    await store.write(recs)
    assert (await store.counts()) == {"conversations": 1000, "messages": 2000, "turns": 1000}
    msgs, _ = await store.messages(recs[777].conversation_id)
    assert [(m["position"], m["role"], m["content"], m["tokens"], m["tokens_derived"], m["created_at"]) for m in msgs] == [
        (0, "user", "q777", 777, True, "2026-01-02T03:04:05.000000Z"),
        (1, "assistant", [{"type": "text", "text": "é"}], 777, False, "2026-01-02T03:04:05.000000Z")]
    assert msgs[0]["name"] == "n"
    data, _ = await store.list(owner="o", since=t0, limit=5)
    assert len(data) == 5 and data[0]["message_count"] == 2 and data[0]["prompt_tokens"] in range(1000)
    await d.close()


async def test_store_batch_is_atomic(db: dict[str, Any]) -> None:
    """A batch whose last statement fails leaves nothing behind: the rows inserted before it in the
    same transaction are rolled back too, and the same records written again are stored once."""
    import datetime as dt

    from gateway.db import Database
    from gateway.plugins.conversations import digest, new_id
    from gateway.plugins.conversations.store import ConversationStore, TurnRecord, message_row

    d = Database(db["url"])
    await d.upgrade()
    store = ConversationStore(d)
    t0 = dt.datetime(2026, 1, 2, 3, 4, 5)
    recs = []
    for i in range(3):
        m = {"role": "user", "content": f"q{i}"}
        rows = [message_row(m, digest(m), tokens=1, tokens_derived=True, created_at=t0, model="m", request_id=str(i),
                            key_id=None, owner="o")]
        recs.append(TurnRecord(new_id(), "o", None, True, None, None, 0, rows,
                               {"model": "m", "request_id": str(i), "key_id": None, "owner": "o", "status": "complete",
                                "http_status": 200, "memory": False, "stream": False, "prompt_tokens": 1,
                                "completion_tokens": 1, "total_tokens": 2, "usage": None, "latency_ms": 1.0,
                                "ttft_ms": None, "created_at": t0}, t0))
    recs[2].turn["owner"] = None  # NOT NULL: the turns insert, the batch's last statement, fails
    with pytest.raises(Exception):
        await store.write(recs)
    assert (await store.counts()) == {"conversations": 0, "messages": 0, "turns": 0}
    recs[2].turn["owner"] = "o"
    await store.write(recs)  # the writer's retry: the same records again
    assert (await store.counts()) == {"conversations": 3, "messages": 3, "turns": 3}
    msgs, _ = await store.messages(recs[1].conversation_id)
    assert [(m["position"], m["content"]) for m in msgs] == [(0, "q1")]
    await d.close()


async def test_out_of_range_query_values_are_400s(make_gateway: Any, db: dict[str, Any]) -> None:
    """Numbers no column holds get a 400 naming the parameter, on the caller and the admin API (on
    PostgreSQL they reached the driver and came back as 503 or 500)."""
    g = await start(make_gateway, db)
    st, h, _ = await chat(g, [{"role": "user", "content": "hello"}])
    cid = h["X-Conversation-ID"]
    huge = "9" * 30
    async with aiohttp.ClientSession() as s:
        for url, headers, param in ((f"{g.url}/gateway/conversations/{cid}?after={huge}", {}, "after"),
                                    (f"{g.admin_url}/conversations/{cid}?after={huge}", ADMIN, "after")):
            async with s.get(url, headers=headers) as r:
                body = await r.json()
                assert r.status == 400 and body["error"]["param"] == param, body
        for days in ("inf", "1e308", "nan", "0"):
            async with s.post(f"{g.admin_url}/conversations/purge?older_than_days={days}", headers=ADMIN) as r:
                body = await r.json()
                assert r.status == 400 and body["error"]["param"] == "older_than_days", (days, body)
        async with s.get(f"{g.url}/gateway/conversations/{cid}?after=0") as r:
            assert r.status == 200 and [m["position"] for m in (await r.json())["messages"]] == [1]


async def test_store_turns_after_a_write_time_fork_follow_it_across_batches(db: dict[str, Any]) -> None:
    """A turn planned on the history that a write-time fork took away, written in a later batch,
    goes to that fork; a turn planned on the stored history stays in the original."""
    import datetime as dt

    from gateway.db import Database
    from gateway.plugins.conversations import digest, new_id
    from gateway.plugins.conversations.store import ConversationStore, TurnRecord, message_row

    d = Database(db["url"])
    await d.upgrade()
    store = ConversationStore(d)
    t0 = dt.datetime(2026, 1, 2, 3, 4, 5)

    def rec(cid: str, create: bool, base: int, texts: list[str], prev: str | None) -> TurnRecord:
        msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]
        rows = [message_row(m, digest(m), tokens=1, tokens_derived=True, created_at=t0, model="m",
                            request_id="r", key_id=None, owner="o") for m in msgs]
        r = TurnRecord(cid, "o", None, create, None, None, base, rows,
                       {"model": "m", "request_id": "r", "key_id": None, "owner": "o", "status": "complete",
                        "http_status": 200, "memory": False, "stream": False, "prompt_tokens": 1,
                        "completion_tokens": 1, "total_tokens": 2, "usage": None, "latency_ms": 1.0,
                        "ttft_ms": None, "created_at": t0}, t0)
        r.prev_digest = prev
        return r

    def dg(text: str, i: int) -> str:
        return digest({"role": "user" if i % 2 == 0 else "assistant", "content": text})

    cid = new_id()
    await store.write([rec(cid, True, 0, ["u1", "a1"], None)])
    await store.write([rec(cid, False, 2, ["u2", "a2 other"], dg("a1", 1))])  # another instance's turn
    _, _, late = await store.write([rec(cid, False, 2, ["u2", "a2 mine"], dg("a1", 1))])  # a stale one
    assert len(late) == 1
    _, _, late2 = await store.write([rec(cid, False, 4, ["u3", "a3"], dg("a2 mine", 1))])  # later batch
    assert late2 == []
    original, _ = await store.messages(cid)
    fork, _ = await store.messages(late[0])
    assert [m["content"] for m in original] == ["u1", "a1", "u2", "a2 other"]
    assert [m["content"] for m in fork] == ["u1", "a1", "u2", "a2 mine", "u3", "a3"]
    # continuing the stored history (its last message is "a2 other") stays in the original
    await store.write([rec(cid, False, 4, ["u3'", "a3'"], dg("a2 other", 1))])
    original, _ = await store.messages(cid)
    assert [m["content"] for m in original][-2:] == ["u3'", "a3'"]
    await d.close()


async def test_a_cursor_of_the_wrong_shape_is_a_400(make_gateway: Any, tmp_path: Path) -> None:
    """Valid base64 and JSON, but not a position in the list: 400 naming the cursor, on the caller
    and the admin API (not a 503 saying the store is down, nor a 500). The CLI refuses a purge of
    everything (--older-than 0)."""
    import base64

    g = await start(make_gateway, {"url": f"sqlite+aiosqlite:///{tmp_path / 'c.db'}"})
    await chat(g, [{"role": "user", "content": "hello"}])
    bad = base64.urlsafe_b64encode(b"[1,2]").decode().rstrip("=")
    async with aiohttp.ClientSession() as s:
        for url, headers in ((f"{g.url}/gateway/conversations?cursor={bad}", {}),
                             (f"{g.admin_url}/conversations?cursor={bad}", ADMIN)):
            async with s.get(url, headers=headers) as r:
                body = await r.json()
                assert r.status == 400 and body["error"]["param"] == "cursor", (url, body)
    res = run_cli(tmp_path / "gateway.yaml", "purge", "--older-than", "0")
    assert res.returncode == 2 and "more than 0" in res.stderr


async def test_an_answer_stored_first_as_history_gets_its_own_metadata(make_gateway: Any, tmp_path: Path) -> None:
    """Two instances on one database, a client sending the whole history, turns back to back: the
    next turn (on the other instance) can be written before this turn's writer flushes, storing
    this turn's answer as client history (no request id, no status, a derived token count). When
    this turn's record is written, the stored answer gets its own metadata."""
    conv = {"name": "conversations", "config": {"cache_ttl": 0}}
    slow = await make_gateway([{**conv, "config": {"cache_ttl": 0, "flush_interval": 1.5}}], name="slow.yaml")
    fast = await make_gateway([{**conv, "config": {"cache_ttl": 0, "flush_interval": 0.05}}], name="fast.yaml")
    first = [{"role": "user", "content": "q1"}]
    async with aiohttp.ClientSession() as s:
        async with s.post(fast.url + "/v1/chat/completions", json={"model": "demo-chat", "messages": first}) as r:
            cid = r.headers["X-Conversation-ID"]
            a1 = (await r.json())["choices"][0]["message"]
        await asyncio.sleep(0.3)
        second = first + [{"role": "assistant", "content": a1["content"]}, {"role": "user", "content": "q2"}]
        async with s.post(slow.url + "/v1/chat/completions", headers={"X-Conversation-ID": cid},
                          json={"model": "demo-chat", "messages": second}) as r:
            rid2 = r.headers["X-Request-ID"]
            body2 = await r.json()
            a2, usage2 = body2["choices"][0]["message"], body2["usage"]
        third = second + [{"role": "assistant", "content": a2["content"]}, {"role": "user", "content": "q3"}]
        async with s.post(fast.url + "/v1/chat/completions", headers={"X-Conversation-ID": cid},
                          json={"model": "demo-chat", "messages": third}) as r:
            assert r.status == 200
    db = tmp_path / "gateway.db"
    deadline = time.monotonic() + 10
    while True:
        with sqlite3.connect(db) as c:
            rows = c.execute("SELECT position, role, request_id, status, tokens, tokens_derived FROM "
                             "conversation_messages WHERE conversation_id = ? ORDER BY position", (cid,)).fetchall()
            turns = c.execute("SELECT count(*) FROM conversation_turns WHERE conversation_id = ?", (cid,)).fetchone()[0]
        if turns == 3:
            break
        assert time.monotonic() < deadline, (rows, turns)
        await asyncio.sleep(0.1)
    assert [r[1] for r in rows] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert rows[3][2:] == (rid2, "complete", usage2["completion_tokens"], 0), rows


async def test_written_turns_leave_the_cache(make_gateway: Any, tmp_path: Path) -> None:
    """Conversations used once (a request without X-Conversation-ID, never continued) stay in the
    cache; once their turn is written the entry must not hold it (its message bodies): the
    gateway's memory grew by each request's whole prompt and answer, up to the cache's 10,000
    entries."""
    g = await start(make_gateway, {"url": f"sqlite+aiosqlite:///{tmp_path / 'c.db'}"})
    for i in range(5):
        status, _, _ = await chat(g, [{"role": "user", "content": f"{i} " + "x" * 100_000}])
        assert status == 200
    await g.plugin("conversations").flush()
    views = g.plugin("conversations").shared.views
    assert len(views) == 5 and [len(v.records) for v in views.values()] == [0] * 5


async def test_caller_api_405_names_the_methods_allowed(make_gateway: Any, tmp_path: Path) -> None:
    g = await start(make_gateway, {"url": f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"})
    async with aiohttp.ClientSession() as s:
        for method, path, allow in (("POST", "/gateway/conversations", "GET"),
                                    ("PUT", "/gateway/conversations/conv_x", "GET, DELETE")):
            async with s.request(method, g.url + path) as r:
                assert r.status == 405 and r.headers.get("Allow") == allow, (method, path, r.headers)
                assert (await r.json())["error"]["code"] == "method_not_allowed"


async def test_the_turns_shown_with_a_page_of_messages_are_that_pages(make_gateway: Any, db: dict[str, Any]) -> None:
    """`GET /conversations/{id}?turns=true` pages the turns with the messages (a conversation of
    20,000 turns answered 9.5 MB of turns for a page of one message)."""
    g = await start(make_gateway, db)
    history: list[dict[str, Any]] = []
    cid = None
    for i in range(3):
        history.append({"role": "user", "content": f"question {i}"})
        st, h, body = await chat(g, history, cid=cid)
        assert st == 200
        cid = h["X-Conversation-ID"]
        history.append(body["choices"][0]["message"])
    await g.plugin("conversations").flush()
    async with aiohttp.ClientSession(headers=ADMIN) as s:
        async def page(**params: Any) -> Any:
            async with s.get(g.admin_url + f"/conversations/{cid}", params={"turns": "true", **params}) as r:
                assert r.status == 200, await r.text()
                return await r.json()

        whole = await page()
        assert [t["first_position"] for t in whole["turns"]] == [0, 2, 4]
        got, after = [], None
        while True:
            p = await page(limit=2, **({"after": after} if after is not None else {}))
            got.append(([m["position"] for m in p["messages"]], [t["first_position"] for t in p["turns"]]))
            if not p["has_more"]:
                break
            after = p["next_after"]
        assert got == [([0, 1], [0]), ([2, 3], [2]), ([4, 5], [4])]
        assert (await page(limit=1))["turns"] == [whole["turns"][0]]
        assert (await page(after=5))["turns"] == []


async def test_a_turn_waits_a_bounded_time_for_a_database_that_does_not_answer(
        make_gateway: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """A frozen database (or a locked table) holds the conversation's read: the turn is answered
    503 conversation_store_unavailable after VIEW_WAIT, not held for as long as the database is."""
    import gateway.plugins.conversations as conv

    monkeypatch.setattr(conv, "VIEW_WAIT", 1.0)
    g = await make_gateway([{"name": "conversations", "config": {"cache_ttl": 0}}])
    st, h, b = await chat(g, [{"role": "user", "content": "hello"}])
    cid = h["X-Conversation-ID"]
    await g.plugin("conversations").flush()
    shared = g.plugin("conversations").shared
    shared.views.clear()  # (not cached: read from the database)

    async def frozen(*_: Any) -> Any:
        await asyncio.sleep(3600)

    monkeypatch.setattr(shared, "_read_view", frozen)
    t0 = time.monotonic()
    st, h, b = await chat(g, [{"role": "user", "content": "hello"}, b["choices"][0]["message"],
                              {"role": "user", "content": "and?"}], cid)
    took = time.monotonic() - t0
    assert (st, b["error"]["code"], h.get("Retry-After")) == (503, "conversation_store_unavailable", "1")
    assert took < 5, took


async def test_a_recent_id_not_found_while_writes_fail_is_retryable_not_gone(
        make_gateway: Any, tmp_path: Path) -> None:
    """An id made moments ago by another instance whose write the database has not taken yet (it
    refuses this instance's writes too): 503 with Retry-After, not a 404 telling the client the
    conversation does not exist. Without write failures it is 404 as before."""
    from gateway.plugins.conversations import new_id

    g = await make_gateway([{"name": "conversations"}])
    shared = g.plugin("conversations").shared
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "more"}]
    st, _, b = await chat(g, msgs, new_id())
    assert (st, b["error"]["code"]) == (404, "conversation_not_found")
    shared.writer.failing_for = lambda recent=10.0: 12.0  # the database refusing writes for 12 s
    st, h, b = await chat(g, msgs, new_id())
    assert (st, b["error"]["code"], h.get("Retry-After")) == (503, "conversation_store_unavailable", "1")
    st, _, b = await chat(g, msgs, "conv_" + "0" * 22)  # an id made long ago: gone
    assert (st, b["error"]["code"]) == (404, "conversation_not_found")
