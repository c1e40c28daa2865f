"""The right to erasure, as whoever answers an erasure request checks it: an owner's erasure while
their first turn still streams, the erased text gone from the SQLite file and its write-ahead log,
and the CLI's record of whose conversation it deleted."""
from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp

from .helpers import base_config, until, write_config
from .test_conversations import ADMIN, chat, conv_row, db, start, stored  # noqa: F401  (db is a fixture)
from .test_conversations_api_edges import Stream, get_json
from .test_conversations_ops import run_cli_here
from .test_audit import acli

SECRET = "ZEBRA-ERASED-4242"
KEPT = "GIRAFFE-KEPT-7373"


def on_disk(path: Path, text: str) -> int:
    """How many times ``text`` is in the SQLite file and its -wal / -shm files, as bytes."""
    needle = text.encode()
    return sum(p.read_bytes().count(needle) for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists())


async def test_an_owners_erasure_stops_their_first_turn_still_streaming(make_gateway: Any, db: dict[str, Any]) -> None:
    """Erasure by owner while a turn that starts a new conversation streams: the conversation is not
    written when the answer ends (it came back after the erasure before), and is counted as deleted."""
    g = await start(make_gateway, db)
    base = g.url + "/gateway/conversations"
    st, h, _ = await chat(g, [{"role": "user", "content": "stored before the erasure"}])
    before = h["X-Conversation-ID"]
    await g.plugin("conversations").flush()
    async with Stream(g, [{"role": "user", "content": "first turn, streaming during the erasure"}]) as s1:
        st, body = await get_json(f"{base}/{s1.cid}")
        assert st == 200 and body["in_progress"] is True
        async with aiohttp.ClientSession(headers=ADMIN) as s:
            async with s.delete(g.admin_url + "/conversations", params={"owner": body["owner"]}) as r:
                assert r.status == 200 and (await r.json())["deleted"] == 2
        await s1.chunks()
        assert s1.text  # the caller still got the whole answer
    for cid in (before, s1.cid):
        assert await stored(g, cid) == [] and await conv_row(g, cid) is None
        st, _ = await get_json(f"{base}/{cid}")
        assert st == 404
    assert g.plugin("conversations").shared.skipped.labels("deleted")._value.get() >= 1


async def test_erased_text_is_gone_from_the_sqlite_file_and_its_log(make_gateway: Any, upstream: Any,
                                                                   tmp_path: Path) -> None:
    """While the gateway keeps running, an erased conversation's text is neither in the database file
    (secure_delete) nor in the write-ahead log (emptied after the delete), for the admin API's
    erasure and for the CLI's; the conversation kept is still there."""
    path = tmp_path / "erase.db"
    g = await start(make_gateway, {"url": f"sqlite+aiosqlite:///{path}"})
    cids = []
    for text in (f"{SECRET} by the admin API", f"{SECRET} by the CLI", f"{KEPT} stays"):
        st, h, _ = await chat(g, [{"role": "user", "content": text}])
        assert st == 200
        cids.append(h["X-Conversation-ID"])
    await g.plugin("conversations").flush()
    assert on_disk(path, SECRET) >= 2 and Path(f"{path}-wal").stat().st_size > 0
    async with aiohttp.ClientSession(headers=ADMIN) as s:
        async with s.delete(f"{g.admin_url}/conversations/{cids[0]}") as r:
            assert r.status == 200
    await until(lambda: on_disk(path, f"{SECRET} by the admin API") == 0)  # (emptied in the background)
    cfg = write_config(tmp_path / "cli.yaml", base_config(upstream.url, tmp_path, [{"name": "conversations"}],
                                                          database={"url": f"sqlite+aiosqlite:///{path}"}))
    r = await asyncio.to_thread(run_cli_here, cfg, "delete", cids[1], "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"deleted": 1}, r.stderr
    assert on_disk(path, SECRET) == 0
    assert await conv_row(g, cids[2]) is not None and on_disk(path, KEPT) >= 1


async def test_the_clis_erasure_record_names_the_owner(make_gateway: Any, upstream: Any, tmp_path: Path) -> None:
    """`gateway conversations delete ID` records whose conversation it deleted, as the admin API does
    (an erasure is proved from the audit trail without joining it to request events)."""
    path = tmp_path / "cli.db"
    plugins = [{"name": "conversations"}, {"name": "audit", "config": {"sinks": ["database"]}}]
    g = await make_gateway(plugins, database={"url": f"sqlite+aiosqlite:///{path}"})
    st, h, _ = await chat(g, [{"role": "user", "content": "to be erased"}])
    cid = h["X-Conversation-ID"]
    await g.plugin("conversations").flush()
    owner = (await conv_row(g, cid)).owner
    cfg = write_config(tmp_path / "cli.yaml", base_config(upstream.url, tmp_path, plugins,
                                                          database={"url": f"sqlite+aiosqlite:///{path}"}))
    r = await asyncio.to_thread(run_cli_here, cfg, "delete", cid)
    assert r.returncode == 0, r.stderr
    r = await acli(cfg, "query", "--type", "conversation.deleted")
    assert r.returncode == 0, r.stderr
    events = [json.loads(x) for x in r.stdout.splitlines()]
    assert [(e["actor"], e["conversation_id"], e["owner"]) for e in events] == [("cli", cid, owner)]


async def test_a_reader_holding_the_file_holds_back_neither_the_erasure_nor_the_writers(
        make_gateway: Any, tmp_path: Path) -> None:
    """A backup or a sqlite3 shell reading the file during an erasure: the delete answers at once
    and turns are stored meanwhile (emptying the log waits for no lock, even with a long
    busy_timeout_ms); once the reader is done, the log is emptied."""
    path = tmp_path / "held.db"
    g = await start(make_gateway, {"url": f"sqlite+aiosqlite:///{path}", "busy_timeout_ms": 60000})
    st, h, _ = await chat(g, [{"role": "user", "content": f"{SECRET} while a backup reads"}])
    cid = h["X-Conversation-ID"]
    await g.plugin("conversations").flush()
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM conversation_messages").fetchone()  # a snapshot held open
    try:
        async with aiohttp.ClientSession(headers=ADMIN, timeout=aiohttp.ClientTimeout(total=15)) as s:
            async with s.delete(f"{g.admin_url}/conversations/{cid}") as r:
                assert r.status == 200
        st, h, _ = await chat(g, [{"role": "user", "content": f"{KEPT} meanwhile"}])
        assert st == 200 and [m.content for m in await stored(g, h["X-Conversation-ID"])][0] == f'"{KEPT} meanwhile"'
        assert on_disk(path, SECRET) >= 1  # (the reader's snapshot still needs the old pages)
    finally:
        reader.execute("COMMIT")
        reader.close()
    await until(lambda: on_disk(path, SECRET) == 0, timeout=10)


async def test_an_erasure_that_fails_loses_no_turn(make_gateway: Any, tmp_path: Path) -> None:
    """An owner's erasure refused (another process holds the SQLite file's write lock) while a turn of
    theirs on a stored conversation ends: the turn is stored once the lock is gone, as before."""
    path = tmp_path / "failed.db"
    g = await start(make_gateway, {"url": f"sqlite+aiosqlite:///{path}", "busy_timeout_ms": 1500})
    u1 = {"role": "user", "content": "first"}
    st, h, b = await chat(g, [u1])
    cid, a1 = h["X-Conversation-ID"], b["choices"][0]["message"]
    await g.plugin("conversations").flush()
    owner = (await conv_row(g, cid)).owner
    lock = sqlite3.connect(path, isolation_level=None)
    try:
        async with Stream(g, [u1, a1, {"role": "user", "content": "second"}], cid) as s1:
            lock.execute("BEGIN EXCLUSIVE")
            async with aiohttp.ClientSession(headers=ADMIN) as s:
                erase = asyncio.create_task(s.delete(g.admin_url + "/conversations", params={"owner": owner}))
                await s1.chunks()  # the turn ends while the erasure waits for the lock
                r = await erase
                assert r.status >= 500, await r.text()
                r.release()
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()
    rows = await stored(g, cid)
    assert len(rows) == 4 and json.loads(rows[2].content) == "second"


def test_a_clis_erasure_says_when_the_log_could_not_be_emptied(tmp_path: Path) -> None:
    """`gateway conversations delete` while a reader holds the file: deleted, exit 0, and a warning
    that the erased text stays on disk until a checkpoint (its last try failed)."""
    from .test_cli_admin_edges import gw

    path = tmp_path / "cli-held.db"
    con = sqlite3.connect(path)
    con.close()
    cfg = write_config(tmp_path / "cli.yaml", base_config("http://127.0.0.1:9", tmp_path, [{"name": "conversations"}],
                                                          database={"url": f"sqlite+aiosqlite:///{path}"}))
    assert gw("db", "upgrade", "-c", str(cfg)).returncode == 0
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("INSERT INTO conversations (id, owner, created_at, updated_at, message_count, turn_count, "
                "prompt_tokens, completion_tokens) VALUES ('conv_x', 'bob', '2026-01-01', '2026-01-01', 0, 0, 0, 0)")
    con.execute("BEGIN")
    con.execute("SELECT count(*) FROM conversations").fetchone()  # a snapshot held open
    try:
        r = gw("conversations", "delete", "--owner", "bob", "-c", str(cfg))
    finally:
        con.execute("COMMIT")
        con.close()
    assert r.returncode == 0 and "deleted 1 conversation" in r.stdout, r.stderr
    assert "could not be emptied after a delete" in r.stderr and "stays on disk" in r.stderr


async def test_memory_never_sends_a_history_erased_elsewhere(make_gateway: Any, upstream: Any, tmp_path: Path) -> None:
    """A conversation deleted from the CLI (or by another instance) while this gateway has it cached:
    the next turn in memory mode is a 404, and the upstream never gets the erased history (the
    cache's 5 s would have sent it once)."""
    path = tmp_path / "mem.db"
    g = await start(make_gateway, {"url": f"sqlite+aiosqlite:///{path}"}, {"memory": {"enabled": True}})
    st, h, _ = await chat(g, [{"role": "user", "content": f"{SECRET} remembered"}])
    cid = h["X-Conversation-ID"]
    st, _, _ = await chat(g, [{"role": "user", "content": "and then"}], cid)  # cached, memory replays it
    assert st == 200 and SECRET in json.dumps(upstream.requests[-1]["body"])
    await g.plugin("conversations").flush()
    cfg = write_config(tmp_path / "cli.yaml", base_config(upstream.url, tmp_path, [{"name": "conversations"}],
                                                          database={"url": f"sqlite+aiosqlite:///{path}"}))
    r = await asyncio.to_thread(run_cli_here, cfg, "delete", cid)
    assert r.returncode == 0, r.stderr
    sent = len(upstream.requests)
    st, _, b = await chat(g, [{"role": "user", "content": "one more"}], cid)
    assert st == 404 and b["error"]["code"] == "conversation_not_found"
    assert len(upstream.requests) == sent
