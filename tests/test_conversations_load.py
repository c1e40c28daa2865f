"""conversations under load: exports held open, big stored messages (memory, pages, exports).

The ``db`` tests run on a real SQLite file and on a real PostgreSQL server."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import select
import socket
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import event
from sqlalchemy import select as sql_select

from gateway.plugins.conversations import digest, new_id
from gateway.plugins.conversations.api import FLUSH_BYTES, MAX_CONCURRENT_EXPORTS
from gateway.plugins.conversations.store import (C, M, PAGE_BYTES, ConversationStore, TurnRecord, dumps,
                                                 message_out, message_row)

from .helpers import ADMIN_TOKEN
from .test_conversations import ADMIN, chat, db, start  # noqa: F401  (db is a fixture)

T0 = dt.datetime(2026, 1, 2, 3, 4, 5)


async def fill(g: Any, owner: str, sizes: list[list[int]], char: str = "x", at: dt.datetime = T0,
               database: Any = None) -> list[str]:
    """Conversations of ``owner`` written straight to the store (``g``'s database, or ``database``):
    one per entry of ``sizes``, with a message of each given length (alternating user/assistant),
    made at ``at``. Returns their ids."""
    store = ConversationStore(database or g.gw.db)
    recs, ids = [], []
    for conv in sizes:
        cid = new_id()
        ids.append(cid)
        msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{cid} {i} " + char * n}
                for i, n in enumerate(conv)]
        rows = [message_row(m, digest(m), tokens=7, tokens_derived=False, created_at=at, model="m",
                            request_id=None, key_id=None, owner=owner) for m in msgs]
        recs.append(TurnRecord(cid, owner, None, True, None, None, 0, rows,
                               {"model": "m", "request_id": None, "key_id": None, "owner": owner,
                                "status": "complete", "http_status": 200, "memory": False, "stream": False,
                                "prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2, "usage": None,
                                "latency_ms": 1.0, "ttft_ms": None, "created_at": at}, at))
    await store.write(recs)
    return ids


async def expected_export(g: Any, owner: str | None = None, cid: str | None = None) -> list[str]:
    """The export's lines as one ``ORDER BY conversation_id, position`` query gives them."""
    stmt = sql_select(M)
    if cid is not None:
        stmt = stmt.where(M.c.conversation_id == cid)
    else:
        stmt = stmt.where(M.c.conversation_id.in_(sql_select(C.c.id).where(C.c.owner == owner)))
    async with g.gw.db.engine.connect() as conn:
        rows = (await conn.execute(stmt.order_by(M.c.conversation_id, M.c.position))).all()
    return [dumps(message_out(r)) for r in rows]


class PoolWatch:
    """The most connections of the gateway's pool checked out at once since ``reset``."""

    def __init__(self, g: Any) -> None:
        self.pool = g.gw.db.engine.sync_engine.pool
        self.peak = 0
        event.listen(self.pool, "checkout", self._out)

    def _out(self, *_: Any) -> None:
        self.peak = max(self.peak, self.pool.checkedout())

    def reset(self) -> None:
        self.peak = self.pool.checkedout()

    def close(self) -> None:
        event.remove(self.pool, "checkout", self._out)


def held_export(port: int, owner: str) -> socket.socket:
    """An admin export whose client never reads (a tiny receive window)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET /conversations/export?owner={owner} HTTP/1.1\r\nHost: x\r\n"
              f"Authorization: Bearer {ADMIN_TOKEN}\r\n\r\n".encode())
    return s


def answered(socks: list[socket.socket]) -> list[socket.socket]:
    return select.select(socks, [], [], 0)[0]


# -- 1. exports held open ----------------------------------------------------------------------------
async def test_exports_held_open_hold_no_connection_and_wait_their_turn(make_gateway: Any, db: dict[str, Any]) -> None:
    """Sixteen owner exports nobody reads (more than SQLite's pool of 5 + 10): the caller API and the
    admin list still answer, the exports never take more than a page's read of connections, and
    only MAX_CONCURRENT_EXPORTS run (the others wait). Closed, the export is still the whole set."""
    g = await start(make_gateway, db)
    await fill(g, "lag", [[50_000 + 97 * i] * 10 for i in range(20)])  # ~10 MB: more than socket buffers
    st, h, _ = await chat(g, [{"role": "user", "content": "mine"}])
    mine = h["X-Conversation-ID"]
    await g.plugin("conversations").flush()
    watch = PoolWatch(g)
    port = int(g.admin_url.rsplit(":", 1)[1])
    socks = [held_export(port, "lag") for _ in range(16)]
    try:
        watch.reset()
        for _ in range(400):  # (a guard against hanging, not a timing check)
            if len(answered(socks)) >= MAX_CONCURRENT_EXPORTS:
                break
            await asyncio.sleep(0.05)
        assert len(answered(socks)) >= MAX_CONCURRENT_EXPORTS
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            for _ in range(5):
                async with s.get(g.url + "/gateway/conversations") as r:
                    assert r.status == 200
                    assert mine in {c["id"] for c in (await r.json())["data"]}
                async with s.get(g.url + f"/gateway/conversations/{mine}") as r:
                    assert r.status == 200 and len((await r.json())["messages"]) == 2
                async with s.get(g.admin_url + "/conversations", params={"owner": "lag"}, headers=ADMIN) as r:
                    assert r.status == 200 and len((await r.json())["data"]) == 20
            st, h, b = await chat(g, [{"role": "user", "content": "still served"}])
            assert st == 200
        # the held exports hold no connection: at most the running exports' page reads and a request
        assert watch.peak <= MAX_CONCURRENT_EXPORTS + 1, watch.peak
        assert len(answered(socks)) == MAX_CONCURRENT_EXPORTS  # the others wait their turn
    finally:
        for x in socks:
            x.close()
        watch.close()
    async with aiohttp.ClientSession(headers=ADMIN, timeout=aiohttp.ClientTimeout(total=30)) as s:
        async with s.get(g.admin_url + "/conversations/export", params={"owner": "lag"}) as r:
            assert r.status == 200
            got = (await r.text()).splitlines()
    assert got == await expected_export(g, owner="lag")
    assert len(got) == 200


async def test_export_pages_release_the_connection_and_keep_the_order(make_gateway: Any, db: dict[str, Any]) -> None:
    """Read by key in pages, the export gives the same lines in the same order as one ordered
    query: conversations by id, messages by position, empty conversations and other owners left
    out. Between pages (the caller writing them out) no connection is held."""
    g = await start(make_gateway, db)
    sizes = [[10, 20, 30], [], [5] * 23, [1], [3000] * 4, [7] * 9]
    ids = await fill(g, "alice", sizes)
    await fill(g, "bob", [[4, 4], [6]])
    await fill(g, "alice", [[8] * 5])  # made later: sorts last
    store = ConversationStore(g.gw.db)
    pool = g.gw.db.engine.sync_engine.pool
    for chunk in (1, 2, 3, 500):
        lines = []
        async for m in store.export(owner="alice", chunk=chunk):
            assert pool.checkedout() == 0  # (the gateway's writer is idle: nothing else reads)
            lines.append(dumps(m))
        assert lines == await expected_export(g, owner="alice")
        assert len(lines) == sum(map(len, sizes)) + 5
    one = [dumps(m) async for m in store.export(cid=ids[2], chunk=4)]
    assert one == await expected_export(g, cid=ids[2]) and len(one) == 23
    assert [dumps(m) async for m in store.export(owner="nobody")] == []
    async with aiohttp.ClientSession(headers=ADMIN) as s:
        async with s.get(g.admin_url + "/conversations/export", params={"owner": "alice"}) as r:
            assert (await r.text()).splitlines() == await expected_export(g, owner="alice")
        async with s.get(g.admin_url + f"/conversations/{ids[4]}/export") as r:
            assert (await r.text()).splitlines() == await expected_export(g, cid=ids[4])


# -- 3. a large export is written in pieces ------------------------------------------------------------
async def test_a_large_export_is_written_in_pieces_of_about_a_megabyte(make_gateway: Any, tmp_path: Path) -> None:
    """Each write of the export (one HTTP chunk) holds about FLUSH_BYTES, not a fixed number of
    messages whatever their size (200 messages of 20 KB were one 4 MB write)."""
    g = await start(make_gateway, {"url": f"sqlite+aiosqlite:///{tmp_path / 'c.db'}"})
    [cid] = await fill(g, "big", [[20_000] * 300])
    chunks: list[int] = []
    body = bytearray()
    async with aiohttp.ClientSession(headers=ADMIN) as s:
        async with s.get(g.admin_url + f"/conversations/{cid}/export") as r:
            assert r.status == 200
            cur = 0
            async for data, end in r.content.iter_chunks():
                cur += len(data)
                body += data
                if end:
                    chunks.append(cur)
                    cur = 0
    lines = body.decode().splitlines()
    assert lines == await expected_export(g, cid=cid)
    line = max(len(x) for x in lines) + 1
    assert len(chunks) >= 5
    assert max(chunks) <= FLUSH_BYTES + line, chunks
    assert all(c >= FLUSH_BYTES for c in chunks[:-1] if c), chunks


# -- 4. a page of big messages -------------------------------------------------------------------------
async def test_a_page_of_big_messages_is_cut_by_bytes(make_gateway: Any, db: dict[str, Any]) -> None:
    """A page stops before the message that would take it past PAGE_BYTES (one message always), with
    has_more/next_after as a page cut by limit has: the caller API and the admin show."""
    g = await start(make_gateway, db)
    big = PAGE_BYTES * 3 // 8  # two fit in a page, three do not
    [cid] = await fill(g, "anonymous", [[big, big, big, big, PAGE_BYTES + 10, 5, 5]])
    async with aiohttp.ClientSession() as s:
        for url, hdr in ((g.url + f"/gateway/conversations/{cid}", {}),
                         (g.admin_url + f"/conversations/{cid}", ADMIN)):
            pages, after = [], -1
            while True:
                async with s.get(url, params={"after": after, "limit": 1000}, headers=hdr) as r:
                    assert r.status == 200
                    p = await r.json()
                pages.append([m["position"] for m in p["messages"]])
                if not p["has_more"]:
                    assert p["next_after"] is None
                    break
                assert p["next_after"] == pages[-1][-1]
                after = p["next_after"]
            assert pages == [[0, 1], [2, 3], [4], [5, 6]], url
        async with s.get(g.url + f"/gateway/conversations/{cid}", params={"after": 4, "limit": 1}) as r:
            p = await r.json()
        assert [m["position"] for m in p["messages"]] == [5] and p["has_more"] and p["next_after"] == 5


# -- 2. memory within a byte budget --------------------------------------------------------------------
def forwarded(upstream: Any) -> tuple[int, list[dict[str, Any]]]:
    req = upstream.requests[-1]
    n = req["headers"].get("Content-Length")
    size = int(n) if n is not None else len(json.dumps(req["body"], ensure_ascii=False, separators=(",", ":")).encode())
    return size, req["body"]["messages"]


async def memory_conversation(g: Any, text: str, turns: int) -> tuple[str, list[str]]:
    """A memory conversation: a system message, then ``turns`` user messages of ``text`` (each
    answered by the demo backend with an echo as long)."""
    h = {"X-Conversation-Memory": "on"}
    st, hh, _ = await chat(g, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "0 " + text}],
                           headers=h)
    assert st == 200
    cid = hh["X-Conversation-ID"]
    sent = ["0 " + text]
    for i in range(1, turns):
        st, _, _ = await chat(g, [{"role": "user", "content": f"{i} " + text}], cid, headers=h)
        assert st == 200
        sent.append(f"{i} " + text)
    return cid, sent


def check_history(msgs: list[dict[str, Any]], sent: list[str], last: str) -> None:
    """The system message, then the newest stored messages in order, then the new one."""
    assert msgs[0] == {"role": "system", "content": "be brief"}
    assert msgs[-1] == {"role": "user", "content": last}
    users = [m["content"] for m in msgs[1:-1] if m["role"] == "user"]
    assert users == sent[len(sent) - len(users):]  # a run of the newest, oldest first


async def test_memory_history_is_trimmed_to_the_max_body_size(make_gateway: Any, upstream: Any,
                                                              tmp_path: Path) -> None:
    g = await start(make_gateway, {"url": f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"},
                    {"memory": {"enabled": True}}, server={"max_body_size": 300_000})
    cid, sent = await memory_conversation(g, "m" * 60_000, 6)  # ~720 KB stored (answers echo)
    st, _, _ = await chat(g, [{"role": "user", "content": "short"}], cid, headers={"X-Conversation-Memory": "on"})
    assert st == 200
    size, msgs = forwarded(upstream)
    assert size <= 300_000, size
    check_history(msgs, sent, "short")
    assert sum(m["role"] == "user" for m in msgs) >= 2  # the budget is used, not emptied
    assert size > 300_000 - 2 * 125_000


async def test_memory_max_bytes_holds_for_text_that_json_makes_longer(make_gateway: Any, upstream: Any,
                                                                     tmp_path: Path) -> None:
    """memory.max_bytes bounds the forwarded body even where the cheap size (characters) is short of
    the bytes (non-ASCII text, escapes); new messages over it alone are forwarded as sent."""
    g = await start(make_gateway, {"url": f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"},
                    {"memory": {"enabled": True, "max_bytes": 150_000}})
    cid, sent = await memory_conversation(g, "é\n" * 10_000, 5)  # 40 KB of JSON per message, 20 K characters
    st, _, _ = await chat(g, [{"role": "user", "content": "court"}], cid, headers={"X-Conversation-Memory": "on"})
    assert st == 200
    size, msgs = forwarded(upstream)
    assert size <= 150_000, size
    check_history(msgs, sent, "court")
    assert sum(m["role"] == "user" for m in msgs) >= 2
    huge = "z" * 200_000
    st, _, b = await chat(g, [{"role": "user", "content": huge}], cid, headers={"X-Conversation-Memory": "on"})
    assert st == 200
    size, msgs = forwarded(upstream)
    assert msgs == [{"role": "system", "content": "be brief"}, {"role": "user", "content": huge}]



async def test_a_purge_of_long_conversations_deletes_a_bounded_number_of_messages_per_transaction(
        make_gateway: Any, db: dict[str, Any], monkeypatch: Any) -> None:
    """A purge takes conversations in transactions of about DELETE_ROWS messages (a long
    conversation alone, whole), not 500 conversations whatever their length (500 conversations of
    5,000 messages held SQLite's write lock for a minute: every writer gave up records). On SQLite,
    another instance's writes go in between the transactions."""
    from gateway.db import Database
    from gateway.plugins.conversations import store as store_mod

    monkeypatch.setattr(store_mod, "DELETE_ROWS", 30)
    g = await start(make_gateway, db)
    old = await fill(g, "purged", [[5] * 20] * 8 + [[5] * 50])
    other = Database(db["url"])  # another instance on the same database
    parts: list[tuple[int, float]] = []
    written: list[float] = []
    clock = asyncio.get_running_loop().time

    async def write_meanwhile() -> None:
        while True:
            await fill(None, "kept", [[5, 5]], at=dt.datetime.now(dt.timezone.utc).replace(tzinfo=None),
                       database=other)
            written.append(clock())
            await asyncio.sleep(0.01)

    writer = asyncio.create_task(write_meanwhile())
    try:
        gone = await ConversationStore(g.gw.db).purge(dt.datetime(2026, 6, 1),
                                                      each=lambda n: parts.append((n, clock())))
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await other.close()
    assert sorted(gone) == sorted(old)
    # 20 + 20 messages are over 30: one conversation per transaction (the 50-message one whole)
    assert [n for n, _ in parts] == [1] * 9
    if g.gw.db.is_sqlite:
        assert any(parts[0][1] < t < parts[-1][1] for t in written), (parts, written)


async def test_history_reads_leave_connections_for_key_and_quota_lookups(make_gateway: Any, db: dict[str, Any]) -> None:
    """Many conversations read back at once (turns continued out of the cache) hold at most a few of
    the pool's connections: a key lookup made meanwhile gets one at once (under load, history
    reads took all 15 of SQLite's and key lookups timed out behind them: 503 for valid keys)."""
    from sqlalchemy import event as sa_event, text

    from gateway.db import LONG_READS

    g = await start(make_gateway, db)
    ids = await fill(g, "big", [[50] * 400] * 3)
    d = g.gw.db
    held, most = [0], [0]

    def out(*_: Any) -> None:
        held[0] += 1
        most[0] = max(most[0], held[0])

    def back(*_: Any) -> None:
        held[0] -= 1

    sa_event.listen(d.engine.sync_engine, "checkout", out)
    sa_event.listen(d.engine.sync_engine, "checkin", back)
    store = ConversationStore(d)
    try:
        reads = [asyncio.create_task(store.load_view(ids[i % 3])) for i in range(40)]
        await asyncio.sleep(0)
        async with d.engine.connect() as conn:  # a key lookup, meanwhile
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1
        views = await asyncio.gather(*reads)
    finally:
        sa_event.remove(d.engine.sync_engine, "checkout", out)
        sa_event.remove(d.engine.sync_engine, "checkin", back)
    assert all(v is not None and len(v[1]) == 400 for v in views)
    limit = LONG_READS if d.is_sqlite else 10  # (the pool_size the tests use)
    assert most[0] <= limit + 1, most  # (+1: the lookup's own)
