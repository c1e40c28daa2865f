"""Audit trail end to end: one event per request under load, the hash chain against tampering,
retention, hostile strings in the JSON-lines sink, flush on SIGTERM, admin events, the admin API
and CLI, and two gateways appending to one PostgreSQL database."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.db import Database
from gateway.plugins.audit import store
from gateway.plugins.audit.chain import row_hash

from .helpers import ADMIN_TOKEN, GatewayProcess, base_config, free_port, write_config

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hello audit trail"}]}
T = aiohttp.ClientTimeout(total=20)


def rows(db_path: Path, where: str = "1=1") -> list[dict[str, Any]]:
    con = sqlite3.connect(db_path)
    try:
        out = [json.loads(d) for (d,) in con.execute(f"SELECT data FROM audit_events WHERE {where} ORDER BY seq")]
    finally:
        con.close()
    return out


async def verify_file(db_path: Path) -> Any:
    """``gateway audit verify`` on a SQLite file."""
    db = Database(f"sqlite+aiosqlite:///{db_path}")
    try:
        return await store.verify(db)
    finally:
        await db.close()


async def wait_for(pred: Any, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def cli(cfg: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "audit", *args, "-c", str(cfg)],
                          capture_output=True, text=True, timeout=timeout)


async def acli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, cfg, *args)


async def post(s: aiohttp.ClientSession, url: str, body: Any = CHAT, **headers: str) -> tuple[int, bytes]:
    async with s.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
        return r.status, await r.read()


async def abort_mid_stream(url: str, key: str) -> int:
    """Start a slow stream, read the first chunk, then drop the connection."""
    async with aiohttp.ClientSession(timeout=T) as s:
        r = await s.post(url + "/v1/chat/completions", json={**CHAT, "stream": True},
                         headers={"Authorization": f"Bearer {key}", "X-Demo-Delay": "0.2", "X-Demo-Words": "40"})
        assert r.status == 200
        await r.content.readany()
        r.close()  # closes the connection under the gateway's feet
        return r.status


async def create_key(s: aiohttp.ClientSession, admin_url: str, owner: str, **extra: Any) -> dict[str, Any]:
    async with s.post(admin_url + "/keys", json={"owner": owner, **extra}, headers=AUTH) as r:
        assert r.status == 201, await r.text()
        return await r.json()


# -- one event per request ----------------------------------------------------------------------------
async def test_one_event_per_request_under_concurrent_load(make_gateway, tmp_path):
    db_path = tmp_path / "gateway.db"
    g = await make_gateway([{"name": "key_auth"}, {"name": "rate_limit"}, {"name": "audit"}])
    # A second instance on the same SQLite file whose upstream is unreachable: both append to one chain.
    dead = await make_gateway([{"name": "audit"}], name="dead.yaml",
                              upstream={"url": f"http://127.0.0.1:{free_port()}"})
    sem = asyncio.Semaphore(16)
    async with aiohttp.ClientSession(timeout=T) as s:
        alice = await create_key(s, g.admin_url, "alice")
        bob = await create_key(s, g.admin_url, "bob", limits={"rpm": 3})
        ka = {"Authorization": f"Bearer {alice['key']}"}
        kb = {"Authorization": f"Bearer {bob['key']}"}
        bad_key = "gw_not-a-real-key-but-a-secret-looking-string"

        async def one(url: str, body: Any = CHAT, **h: str) -> int:
            async with sem:
                return (await post(s, url, body, **h))[0]

        jobs = ([one(g.url, **ka) for _ in range(20)]
                + [one(g.url, {**CHAT, "stream": True}, **ka) for _ in range(10)]
                + [one(g.url, **ka, **{"X-Demo-Status": "500"}) for _ in range(5)]
                + [one(g.url) for _ in range(5)]
                + [one(g.url, Authorization=f"Bearer {bad_key}") for _ in range(5)]
                + [one(g.url, **kb) for _ in range(8)]
                + [one(dead.url) for _ in range(4)]
                + [abort_mid_stream(g.url, alice["key"]) for _ in range(4)])
        statuses = await asyncio.wait_for(asyncio.gather(*jobs), 60)
    sent = Counter(statuses)
    assert sent[200] == 20 + 10 + 3 + 4 and sent[500] == 5 and sent[401] == 10 and sent[429] == 5
    assert sent[502] == 4
    total = len(statuses)
    req_types = "type IN ('request','auth_failure','rate_limited')"
    await wait_for(lambda: len(rows(db_path, req_types)) == total, what=f"{total} audit rows")
    await g.stop()
    await dead.stop()

    evs = rows(db_path, req_types)
    assert len(evs) == total
    assert len({e["request_id"] for e in evs}) == total
    assert Counter(e["status"] for e in evs) == sent
    by = Counter(e["answered_by"] for e in evs)
    assert by == {"upstream": 20 + 10 + 5 + 3, "gateway_refusal": 15, "error": 4, "client_abort": 4}

    auth = [e for e in evs if e["type"] == "auth_failure"]
    assert len(auth) == 10 and {e["reason"] for e in auth} >= {"missing"}
    assert all(e["client_ip"] == "127.0.0.1" and e["status"] == 401 for e in auth)
    limited = [e for e in evs if e["type"] == "rate_limited"]
    assert len(limited) == 5
    assert all(e["key_id"] == bob["id"] and e["owner"] == "bob" and e["limit"] for e in limited)
    assert {e["reason"] for e in limited} == {"rate_limit_exceeded"}

    ok = [e for e in evs if e["status"] == 200 and e["answered_by"] == "upstream"]
    assert all(e["tokens_in"] and e["tokens_out"] and e["model"] == "demo-chat" for e in ok)
    assert sum(e["streamed"] for e in ok) == 10
    for e in ok:
        assert e["latency_ms"] >= e["upstream_ms"] >= 0 and e["overhead_ms"] >= 0
        # overhead = latency - upstream, to the microsecond (each figure rounded alone missed by one)
        assert round(e["latency_ms"] * 1000) - round(e["upstream_ms"] * 1000) == round(e["overhead_ms"] * 1000), e
        assert e["ttfb_ms"] is not None and e["bytes_out"] > 0 and e["bytes_in"] > 0
    aborted = [e for e in evs if e["answered_by"] == "client_abort"]
    assert all(e["outcome"] == "client_disconnected" and e["streamed"] for e in aborted)
    assert all(e["bytes_out"] > 0 for e in aborted)  # what was delivered before the client left
    errs = [e for e in evs if e["answered_by"] == "error"]
    assert all(e["outcome"] == "upstream_error" and e["error"] == "upstream_unavailable" for e in errs)
    alice_ok = [e for e in evs if e["key_id"] == alice["id"]]
    assert alice_ok and all(e["owner"] == "alice" for e in alice_ok)

    # The admin actions went through the event bus into the same trail, with the admin identity.
    created = rows(db_path, "type = 'key.created'")
    assert {e["key_id"] for e in created} == {alice["id"], bob["id"]}
    assert all(e["actor"] == "admin" for e in created)

    raw = db_path.read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("gateway.db-*"))
    for secret in (bad_key, alice["key"], bob["key"], ADMIN_TOKEN):
        assert secret.encode() not in raw

    res = await verify_file(db_path)
    assert res.ok, res.message()
    assert res.rows == total + 2


# -- tamper evidence ----------------------------------------------------------------------------------
def _copy_db(src: Path, dst: Path) -> None:
    a, b = sqlite3.connect(src), sqlite3.connect(dst)
    try:
        a.backup(b)
    finally:
        a.close()
        b.close()


def _config_for(tmp_path: Path, upstream_url: str, db: Path, name: str) -> Path:
    cfg = base_config(upstream_url, tmp_path, [{"name": "audit"}], database={"url": f"sqlite+aiosqlite:///{db}"})
    return write_config(tmp_path / name, cfg)


async def test_chain_detects_edited_deleted_and_inserted_rows(make_gateway, upstream, tmp_path):
    g = await make_gateway([{"name": "audit"}])
    async with aiohttp.ClientSession(timeout=T) as s:
        for i in range(12):
            await post(s, g.url, **({"X-Demo-Status": "500"} if i == 3 else {}))
    await wait_for(lambda: len(rows(tmp_path / "gateway.db")) == 12, what="12 rows")
    await g.stop()
    cfg = tmp_path / "gateway.yaml"

    intact, export, query, tail = await asyncio.gather(
        acli(cfg, "verify"), acli(cfg, "export", "--format", "jsonl"),
        acli(cfg, "query", "--status", "5xx"), acli(cfg, "tail", "-n", "3"))
    assert intact.returncode == 0, intact.stdout + intact.stderr
    assert "intact" in intact.stdout and "12 events" in intact.stdout
    lines = export.stdout.splitlines()
    assert export.returncode == 0 and [json.loads(x)["seq"] for x in lines] == list(range(1, 13))
    q = [json.loads(x) for x in query.stdout.splitlines()]
    assert [e["status"] for e in q] == [500]
    assert [json.loads(x)["seq"] for x in tail.stdout.splitlines()] == [10, 11, 12]

    cases = {}
    for case in ("edited", "deleted", "inserted"):
        p = tmp_path / f"{case}.db"
        _copy_db(tmp_path / "gateway.db", p)
        con = sqlite3.connect(p)
        with con:
            if case == "edited":
                # Someone rewrites a failed request as a success, keeping the columns consistent.
                (data,) = con.execute("SELECT data FROM audit_events WHERE seq = 4").fetchone()
                assert '"status":500' in data
                con.execute("UPDATE audit_events SET data = ?, status = 200 WHERE seq = 4",
                            (data.replace('"status":500', '"status":200'),))
            elif case == "deleted":
                con.execute("DELETE FROM audit_events WHERE seq = 6")
            else:
                # Make room after seq 7 and insert a well-formed row chained onto seq 7.
                con.execute("UPDATE audit_events SET seq = seq + 1000 WHERE seq > 7")
                con.execute("UPDATE audit_events SET seq = seq - 999 WHERE seq > 1000")
                (h7,) = con.execute("SELECT hash FROM audit_events WHERE seq = 7").fetchone()
                ev = {"time": store.iso(), "type": "request", "request_id": "forged", "status": 200, "seq": 8,
                      "key_id": None, "owner": None, "client_ip": "10.0.0.1"}
                data = json.dumps(ev, sort_keys=True, separators=(",", ":"))
                con.execute("INSERT INTO audit_events (seq, time, type, request_id, key_id, owner, client_ip, "
                            "status, data, prev_hash, hash) VALUES (8, ?, 'request', 'forged', NULL, NULL, "
                            "'10.0.0.1', 200, ?, ?, ?)", (ev["time"], data, h7, row_hash(h7, data)))
        con.close()
        cases[case] = _config_for(tmp_path, upstream.url, p, f"{case}.yaml")
    results = await asyncio.gather(*(acli(c, "verify") for c in cases.values()))
    got = dict(zip(cases, results))
    assert got["edited"].returncode == 1 and "BROKEN at seq 4 (edited)" in got["edited"].stdout
    assert got["deleted"].returncode == 1 and "BROKEN at seq 7 (deleted)" in got["deleted"].stdout
    assert "seq 6 missing" in got["deleted"].stdout
    assert got["inserted"].returncode == 1 and "BROKEN at seq 9 (inserted)" in got["inserted"].stdout


async def test_retention_purge_keeps_the_chain_verifiable(make_gateway, upstream, tmp_path):
    jl = tmp_path / "audit.jsonl"
    g = await make_gateway([{"name": "audit", "config": {
        "sinks": ["database", {"type": "jsonl", "path": str(jl)}],
        "retention_days": 3.0 / 86400, "purge_interval": 0.3}}])
    db_path = tmp_path / "gateway.db"
    async with aiohttp.ClientSession(timeout=T) as s:
        for _ in range(6):
            await post(s, g.url)
        await wait_for(lambda: len(rows(db_path, "type = 'audit.purged'")) >= 1, what="a purge")
        for _ in range(3):
            await post(s, g.url)
    await wait_for(lambda: len(rows(db_path, "type = 'request'")) >= 3, what="new rows")
    await g.stop()
    purged = rows(db_path, "type = 'audit.purged'")
    first = purged[0]
    assert first["deleted"] >= 6 and first["anchor"]["seq"] >= 6 and first["actor"] == "retention"
    assert first["seq"] > first["anchor"]["seq"]
    remaining = rows(db_path)
    assert all(e["type"] != "request" or e["seq"] > first["anchor"]["seq"] for e in remaining)
    res = await acli(tmp_path / "gateway.yaml", "verify")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "purge anchor" in res.stdout
    # The purge is in the other sinks too.
    assert any(json.loads(x)["type"] == "audit.purged" for x in jl.read_text().splitlines())
    # Deleting the first row left after the purge is still caught. Done on a copy (SQLite's backup
    # reads the file under a read transaction): the test's own write to the stopped gateway's file
    # had to wait for the write lock, which a purge the stop cancelled, still finishing on the
    # driver's thread, or its connection closing, held for a moment or, on a busy machine, longer
    # than a minute (once, in a fresh-clone run, past a minute of retries).
    copy = tmp_path / "tampered.db"
    src, dst = sqlite3.connect(db_path), sqlite3.connect(copy)
    try:
        src.backup(dst)
        dst.execute("DELETE FROM audit_events WHERE seq = (SELECT MIN(seq) FROM audit_events)")
        dst.commit()
    finally:
        src.close()
        dst.close()
    cfg = _config_for(tmp_path, upstream.url, copy, "tampered.yaml")
    res = await acli(cfg, "verify")
    assert res.returncode == 1 and "(deleted)" in res.stdout


# -- JSON lines -----------------------------------------------------------------------------------------
async def test_jsonl_sink_after_a_torn_line_and_a_failed_write(make_gateway, tmp_path, monkeypatch):
    """A crash (or a full disk) mid-write leaves the file ending in a torn line: the next records
    start on a line of their own. A write that fails part-way is cut back off, so the writer's
    retry of the whole batch neither extends the fragment nor repeats records."""
    from gateway.plugins.audit import sinks
    jl = tmp_path / "audit.jsonl"
    jl.write_bytes(b'{"type": "request", "seq": 1}\n{"type": "request", "request_id": "torn')
    g = await make_gateway([{"name": "audit", "config": {"sinks": [{"type": "jsonl", "path": str(jl)}]}}])
    async with aiohttp.ClientSession(timeout=T) as s:
        for _ in range(2):
            await post(s, g.url)
    await g.stop()
    lines = jl.read_bytes().split(b"\n")
    assert lines[1] == b'{"type": "request", "request_id": "torn' and lines[-1] == b""
    assert [json.loads(x)["type"] for x in lines[2:-1]] == ["request", "request"]

    real_write, calls = os.write, []

    def failing(fd: int, data: Any) -> int:  # a full disk: the first write stops half-way, the next fails
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[:len(data) // 2]))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    before = jl.read_bytes()
    sink = sinks.JsonlSink(str(jl))
    monkeypatch.setattr(sinks.os, "write", failing)
    with pytest.raises(OSError):
        sink._write('{"a": 1}\n{"b": 2}\n')
    assert jl.read_bytes() == before
    sink._write('{"a": 1}\n{"b": 2}\n')  # the retry
    assert jl.read_bytes() == before + b'{"a": 1}\n{"b": 2}\n'


async def test_a_leaked_key_is_found_by_pasting_the_whole_key(make_gateway, tmp_path):
    """Hunting a leaked key, an operator pastes the whole key into the key_id filter: its id is
    taken (as `keys show` / `keys revoke` do). What is neither a key id nor a key is refused, not
    answered with an empty list that reads as "never used", and is not echoed."""
    g = await make_gateway([{"name": "key_auth"}, {"name": "audit", "config": {"flush_interval": 0.05}}])
    async with aiohttp.ClientSession(timeout=T) as s:
        alice, bob = (await create_key(s, g.admin_url, "alice")), (await create_key(s, g.admin_url, "bob"))
        for k in (alice, alice, bob):
            assert (await post(s, g.url, Authorization=f"Bearer {k['key']}"))[0] == 200
        await wait_for(lambda: len(rows(tmp_path / "gateway.db", "type = 'request'")) == 3, what="3 events")
        for kid in (alice["id"], alice["key"], f" {alice['key']}\n"):
            async with s.get(g.admin_url + "/audit", params={"key_id": kid, "type": "request"}, headers=AUTH) as r:
                assert r.status == 200
                assert [e["key_id"] for e in (await r.json())["data"]] == [alice["id"]] * 2
        for bad in ("alice", alice["key"][:-2]):
            async with s.get(g.admin_url + "/audit", params={"key_id": bad}, headers=AUTH) as r:
                body = await r.text()
                assert r.status == 400 and json.loads(body)["error"]["param"] == "key_id", body
                assert "not a key id" in body and (len(bad) < 8 or bad not in body)
    await g.stop()
    cfg = tmp_path / "gateway.yaml"
    whole, wrong = await asyncio.gather(acli(cfg, "query", "--type", "request", "--key-id", bob["key"]),
                                        acli(cfg, "query", "--key-id", bob["key"][:-2]))
    assert whole.returncode == 0 and [json.loads(x)["key_id"] for x in whole.stdout.splitlines()] == [bob["id"]]
    assert wrong.returncode == 2 and "--key-id: not a key id" in wrong.stderr and bob["key"][:-2] not in wrong.stderr


async def test_a_huge_model_name_is_kept_cut_in_the_event(make_gateway, tmp_path):
    """A client's 1,000,000-character model name (echoed by the upstream) is stored as its first
    256 characters and its length, not as a 2 MB row kept for the retention period."""
    g = await make_gateway([{"name": "key_auth"}, {"name": "audit"}])
    huge = "m" * 1_000_000
    async with aiohttp.ClientSession(timeout=T) as s:
        key = (await create_key(s, g.admin_url, "alice"))["key"]
        st, _ = await post(s, g.url, {**CHAT, "model": huge}, Authorization=f"Bearer {key}")
    await g.stop()
    ev = [e for e in rows(tmp_path / "gateway.db") if e["type"] == "request"][-1]
    assert ev["model"] == "m" * 256 + "... (1000000 characters)", ev["model"][-40:]
    assert ev["response_model"] in (None, "m" * 256 + "... (1000000 characters)")
    con = sqlite3.connect(tmp_path / "gateway.db")
    try:
        assert max(len(d) for (d,) in con.execute("SELECT data FROM audit_events")) < 5000
    finally:
        con.close()
    assert (await verify_file(tmp_path / "gateway.db")).ok


async def test_jsonl_sink_one_valid_line_per_event_with_hostile_strings(make_gateway, tmp_path):
    jl = tmp_path / "audit.jsonl"
    g = await make_gateway([{"name": "key_auth"}, {"name": "audit", "config": {
        "sinks": [{"type": "jsonl", "path": str(jl)}]}}])
    hostile_model = 'evil\n"}\r{"type":"forged"}\u2028\u2029\x00\x1b[31m \\ üñï 💥'
    hostile_path = "/v1/chat/completions/%0A%0D%22%7D%7B%5C%E2%80%A8%F0%9F%92%A5"
    hostile_key = 'gw_abc"def\\ghi{}<%0a>'
    sent = 0
    async with aiohttp.ClientSession(timeout=T) as s:
        key = (await create_key(s, g.admin_url, 'own"er\\name ü'))["key"]
        for auth in (f"Bearer {key}", f"Bearer {hostile_key}", None):
            h = {"Authorization": auth} if auth else {}
            await post(s, g.url, {**CHAT, "model": hostile_model}, **h)
            async with s.post(g.url + hostile_path, json=CHAT, headers=h) as r:
                await r.read()
            sent += 2
    await g.stop()
    data = jl.read_bytes()
    data.decode("ascii")  # everything non-ASCII is escaped
    lines = data.split(b"\n")
    assert lines[-1] == b""
    evs = [json.loads(x) for x in lines[:-1]]
    assert len(evs) == sent + 1  # + key.created
    reqs = [e for e in evs if e["type"] != "key.created"]
    # (the requests refused by key_auth have no model: their body was never read; the NUL is
    # recorded as U+FFFD, which PostgreSQL's JSON can hold)
    recorded = hostile_model.replace("\x00", "\ufffd")
    assert {e["model"] for e in reqs if e["path"] == "/v1/chat/completions"} == {recorded, None}
    assert {e["model"] for e in reqs if e["path"] == "/v1/chat/completions" and e["status"] == 200} == {recorded}
    assert {e["path"] for e in reqs} == {"/v1/chat/completions", '/v1/chat/completions/\n\r"}{\\\u2028💥'}
    assert [e["owner"] for e in evs if e["type"] == "key.created"] == ['own"er\\name ü']
    assert key.encode() not in data and b"abc\\\"def" not in data


# -- shutdown ------------------------------------------------------------------------------------------
async def test_events_survive_sigterm(upstream, tmp_path):
    jl = tmp_path / "audit.jsonl"
    port, admin_port = free_port(), free_port()
    cfg = base_config(upstream.url, tmp_path, [{"name": "audit", "config": {
        "sinks": ["database", "stdout", {"type": "jsonl", "path": str(jl)}],
        "flush_interval": 3.0, "batch_size": 10000}}],
        server={"port": port}, admin={"port": admin_port})
    path = write_config(tmp_path / "gw.yaml", cfg)
    p = GatewayProcess(path, port, admin_port).start()
    try:
        await p.wait_ready()
        t0 = time.monotonic()
        async with aiohttp.ClientSession(timeout=T) as s:
            statuses = await asyncio.gather(*(post(s, p.url) for _ in range(30)))
        assert all(st == 200 for st, _ in statuses)
        if time.monotonic() - t0 < 2.5:  # (on a very slow machine the batch may already be written)
            assert jl.stat().st_size == 0  # (made at start-up) still queued: the writers gather a batch for flush_interval
        p.signal(signal.SIGTERM)
        assert await asyncio.to_thread(p.wait, 30) == 0
    finally:
        p.stop()
    assert len(rows(tmp_path / "gateway.db", "type = 'request'")) == 30
    assert len([x for x in jl.read_text().splitlines() if json.loads(x)["type"] == "request"]) == 30
    out = [json.loads(x) for x in p.log().splitlines() if x.startswith("{")]
    assert len([e for e in out if e.get("type") == "request"]) == 30


# -- admin events, API -------------------------------------------------------------------------------
async def test_admin_events_and_reads(make_gateway, tmp_path):
    g = await make_gateway([{"name": "audit"}])
    db_path = tmp_path / "gateway.db"
    g.services.events.emit("conversation.deleted", actor="admin", conversation_id="c-1",
                           api_key="sk-must-not-be-stored", detail={"token": "x", "count": 2})
    async with aiohttp.ClientSession(timeout=T) as s:
        for i in range(5):
            await post(s, g.url, **({"X-Demo-Status": "429"} if i == 0 else {}))
        async with s.post(g.admin_url + "/config/reload", headers=AUTH) as r:
            assert r.status == 200
        g.services.events.emit("conversations.purged", actor="cli", deleted=3)
        await wait_for(lambda: len(rows(db_path)) == 8, what="8 rows")
        evs = rows(db_path)
        assert Counter(e["type"] for e in evs) == {"request": 5, "conversation.deleted": 1,
                                                   "config.reloaded": 1, "conversations.purged": 1}
        cd = next(e for e in evs if e["type"] == "conversation.deleted")
        assert cd["actor"] == "admin" and cd["conversation_id"] == "c-1" and "api_key" not in cd
        assert cd["detail"] == {"count": 2}
        rl = next(e for e in evs if e["type"] == "config.reloaded")
        assert rl["actor"] == "admin" and rl["result"] == "success"

        # GET /audit: filters and cursor pagination.
        seen, cursor = [], None
        while True:
            q = {"limit": "3", **({"cursor": cursor} if cursor else {})}
            async with s.get(g.admin_url + "/audit", params=q, headers=AUTH) as r:
                assert r.status == 200
                page = await r.json()
            seen += [e["seq"] for e in page["data"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == list(range(8, 0, -1))
        for params, want in (({"type": "request"}, 5), ({"status": "429"}, 1), ({"status": "2xx"}, 4),
                             ({"type": "config.reloaded,conversations.purged"}, 2), ({"ip": "127.0.0.1"}, 5),
                             ({"ip": " ::ffff:127.0.0.1"}, 5), ({"ip": "127.0.0.1:5123"}, 5),
                             ({"ip": "127.0.0.2"}, 0),
                             ({"since": "1h", "until": store.iso(time.time() + 60)}, 8),
                             ({"until": "2000-01-01"}, 0), ({"key_id": "abcdefABCDEF"}, 0)):
            async with s.get(g.admin_url + "/audit", params=params, headers=AUTH) as r:
                assert r.status == 200, params
                assert len((await r.json())["data"]) == want, params
        async with s.get(g.admin_url + "/audit", params={"since": "yesterday-ish"}, headers=AUTH) as r:
            assert r.status == 400
            err = (await r.json())["error"]
            assert err["type"] == "invalid_request_error" and "since" in err["message"]
        async with s.get(g.admin_url + "/audit", params={"limit": "0"}, headers=AUTH) as r:
            assert r.status == 400
        # An ip filter that is no address is an error, not an empty page.
        async with s.get(g.admin_url + "/audit", params={"ip": "127.0.0"}, headers=AUTH) as r:
            assert r.status == 400
            assert "ip: expected one IP address" in (await r.json())["error"]["message"]
        async with s.get(g.admin_url + "/audit") as r:
            assert r.status == 401
        async with s.get(g.admin_url + "/audit/verify", headers=AUTH) as r:
            v = await r.json()
            assert v["ok"] is True and v["rows"] == 8
        async with s.get(g.admin_url + "/openapi.json", headers=AUTH) as r:
            assert "/audit" in (await r.json())["paths"]
    # After the reload only the new instance records bus events (no duplicates).
    g.services.events.emit("key.revoked", actor="admin", key_id="k-1")
    await wait_for(lambda: len(rows(db_path)) == 9, what="9 rows")
    await asyncio.sleep(0.3)
    assert len(rows(db_path, "type = 'key.revoked'")) == 1


async def test_an_admin_action_is_answered_once_its_event_is_stored(make_gateway, tmp_path):
    """A key revoked through the admin API (or created, or a reload) is answered after its audit
    event is written, not when it is queued: a crash right after the answer cannot lose it. A slow
    flush_interval shows it: the event is in the table the moment the answer arrives."""
    g = await make_gateway([{"name": "key_auth"}, {"name": "audit", "config": {"flush_interval": 30}}])
    db_path = tmp_path / "gateway.db"
    async with aiohttp.ClientSession(timeout=T) as s:
        key = await create_key(s, g.admin_url, "alice")
        assert [e["key_id"] for e in rows(db_path, "type = 'key.created'")] == [key["id"]]
        async with s.post(f"{g.admin_url}/keys/{key['id']}/revoke", headers=AUTH) as r:
            assert r.status == 200, await r.text()
        assert [e["key_id"] for e in rows(db_path, "type = 'key.revoked'")] == [key["id"]]
        async with s.post(g.admin_url + "/config/reload", headers=AUTH) as r:
            assert r.status == 200
        assert len(rows(db_path, "type = 'config.reloaded'")) == 1
        # requests are not waited for: theirs stay queued for the 30 s flush_interval
        assert (await post(s, g.url, Authorization="Bearer " + key["key"]))[0] == 401
        await asyncio.sleep(0.3)
        assert rows(db_path, "type IN ('request', 'auth_failure')") == []


# -- PostgreSQL -------------------------------------------------------------------------------------------
async def test_postgres_two_gateways_append_to_one_chain(make_gateway, pg_url, tmp_path):
    db = {"url": pg_url, "auto_migrate": True}
    a = await make_gateway([{"name": "audit", "config": {"flush_interval": 0.01, "batch_size": 5}}],
                           name="a.yaml", database=db)
    b = await make_gateway([{"name": "audit", "config": {"flush_interval": 0.01, "batch_size": 5}}],
                           name="b.yaml", database=db)
    sem = asyncio.Semaphore(20)
    async with aiohttp.ClientSession(timeout=T) as s:
        async def one(url: str) -> int:
            async with sem:
                return (await post(s, url))[0]
        statuses = await asyncio.gather(*(one(u) for _ in range(40) for u in (a.url, b.url)))
    assert statuses.count(200) == 80
    await a.stop()
    await b.stop()
    d = Database(pg_url)
    try:
        res = await store.verify(d)
        assert res.ok, res.message()
        assert res.rows == 80 and res.first_seq == 1 and res.last_seq == 80
        from sqlalchemy import text
        async with d.engine.begin() as conn:
            await conn.execute(text("UPDATE audit_events SET client_ip = '10.9.9.9' WHERE seq = 40"))
    finally:
        await d.close()
    res = await acli(tmp_path / "a.yaml", "verify")
    assert res.returncode == 1 and "BROKEN at seq 40 (edited)" in res.stdout and "client_ip" in res.stdout


# -- trace id -------------------------------------------------------------------------------------------
async def test_trace_id_comes_from_the_current_span(make_gateway, tmp_path):
    g = await make_gateway([{"name": "tracing", "config": {"exporter": {"type": "memory"}}}, {"name": "audit"}])
    tid = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with aiohttp.ClientSession(timeout=T) as s:
        await post(s, g.url, traceparent=f"00-{tid}-00f067aa0ba902b7-01")
        await post(s, g.url)
    await wait_for(lambda: len(rows(tmp_path / "gateway.db")) == 2, what="2 rows")
    first, second = rows(tmp_path / "gateway.db")
    assert first["trace_id"] == tid
    assert len(second["trace_id"]) == 32 and second["trace_id"] != tid


async def test_cli_admin_actions_are_recorded(tmp_path):
    jl = tmp_path / "audit.jsonl"
    cfg = write_config(tmp_path / "cli.yaml", base_config("http://127.0.0.1:9", tmp_path, [
        {"name": "conversations"},
        {"name": "audit", "config": {"sinks": ["database", "stdout", {"type": "jsonl", "path": str(jl)}]}}]))
    # a command that reads or changes data needs the database to exist: a mistyped path is an error
    res = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway", "audit", "verify", "-c", str(cfg)],
                                  capture_output=True, text=True, timeout=60)
    # (3: could not verify; 1 is kept for a broken chain)
    assert res.returncode == 3 and "gateway.db does not exist" in res.stderr
    assert not (tmp_path / "gateway.db").exists()
    res = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway", "db", "upgrade", "-c", str(cfg)],
                                  capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    res = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway", "conversations", "purge",
                                                   "--older-than", "30d", "--json", "-c", str(cfg)],
                                  capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"deleted": 0}  # the stdout sink stays out of a command's output
    (ev,) = rows(tmp_path / "gateway.db")
    assert ev["type"] == "conversations.purged" and ev["actor"] == "cli" and ev["deleted"] == 0
    assert [json.loads(x)["type"] for x in jl.read_text().splitlines()] == ["conversations.purged"]


async def test_hostile_unicode_never_costs_other_events_their_record(make_gateway, tmp_path):
    """A lone surrogate is valid in JSON text (a client can send ``"\\ud800"``) but not in UTF-8: the
    request that carries one is still recorded, and so is every other request of its batch."""
    db_path = tmp_path / "gateway.db"
    g = await make_gateway([{"name": "audit", "config": {"flush_interval": 1.0}}])
    hostile = b'{"model": "evil\\ud800model", "messages": [{"role": "user", "content": "x\\udfff"}]}'
    async with aiohttp.ClientSession(timeout=T) as s:
        async def plain() -> int:
            return (await post(s, g.url))[0]

        async def evil() -> int:
            async with s.post(g.url + "/v1/chat/completions", data=hostile,
                              headers={"Content-Type": "application/json"}) as r:
                await r.read()
                return r.status
        statuses = await asyncio.gather(*([plain() for _ in range(5)] + [evil()] + [plain() for _ in range(5)]))
    assert len(statuses) == 11
    await wait_for(lambda: len(rows(db_path, "type = 'request'")) == 11, what="11 audit rows")
    await g.stop()
    evs = rows(db_path, "type = 'request'")
    assert sum(e["model"] == "evil\ud800model" for e in evs) == 1  # kept exactly, escaped in the record
    assert sum(e["model"] == "demo-chat" for e in evs) == 10
    res = await verify_file(db_path)
    assert res.ok, res.message()


async def test_writer_settings_change_by_reload(make_gateway: Any, upstream: Any, tmp_path: Path) -> None:
    """A reload's writer settings apply to the sink's writer already running: the same burst that the
    default queue takes in is, after a reload to a one-record queue that drops, partly dropped and
    counted."""
    log = tmp_path / "audit.jsonl"

    def audit(**cfg: Any) -> list[dict[str, Any]]:
        return [{"name": "audit", "config": {"sinks": [{"type": "jsonl", "path": str(log)}], **cfg}}]

    g = await make_gateway(audit())

    async def burst_dropped() -> float:
        async with aiohttp.ClientSession(timeout=T) as s:
            assert {st for st, _ in await asyncio.gather(*(post(s, g.url) for _ in range(6)))} == {200}
            async with s.get(g.admin_url + "/metrics", headers=AUTH) as r:
                text = await r.text()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("gateway_writer_dropped_total{") and 'writer="audit:' in line)

    assert await burst_dropped() == 0
    write_config(tmp_path / "gateway.yaml", base_config(upstream.url, tmp_path, audit(
        queue_size=1, batch_size=100, flush_interval=2, on_full="drop")))
    ok, detail = await g.gw.reload(actor="test")
    assert ok, detail
    assert await burst_dropped() >= 1


async def test_plugin_api_answers_are_not_refusals(make_gateway: Any, tmp_path: Path) -> None:
    """The conversations caller API answers requests itself: audited as answered by the gateway, not
    as a refusal; its 404 is still a refusal."""
    db = tmp_path / "gateway.db"
    g = await make_gateway([{"name": "conversations"}, {"name": "audit"}])
    async with aiohttp.ClientSession(timeout=T) as s:
        async with s.post(g.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
            cid = r.headers["X-Conversation-ID"]
        async with s.get(g.url + f"/gateway/conversations/{cid}") as r:
            assert r.status == 200 and len((await r.json())["messages"]) == 2
        async with s.get(g.url + "/gateway/conversations/conv_nope") as r:
            assert r.status == 404
    await g.stop()
    evs = {e["path"]: e for e in rows(db, "type = 'request'")}
    assert evs["/v1/chat/completions"]["answered_by"] == "upstream"
    ok = evs[f"/gateway/conversations/{cid}"]
    assert (ok["answered_by"], ok["outcome"], ok["status"]) == ("gateway", "ok", 200)
    miss = evs["/gateway/conversations/conv_nope"]
    assert (miss["answered_by"], miss["outcome"], miss["status"]) == ("gateway_refusal", "refused", 404)


async def test_a_jsonl_sink_that_cannot_be_written_is_refused_up_front(make_gateway: Any, upstream: Any,
                                                                        tmp_path: Path) -> None:
    """Not found out later by dropping events: a reload to a jsonl path that cannot be written is
    refused, and the running sink keeps recording."""
    good = tmp_path / "logs" / "audit.jsonl"  # its directory is made
    blocked = tmp_path / "afile"
    blocked.write_text("a file, not a directory")

    def cfg(path: Path) -> dict[str, Any]:
        return base_config(upstream.url, tmp_path, [{"name": "audit", "config": {"sinks": [{"type": "jsonl", "path": str(path)}]}}])

    g = await make_gateway(cfg(good)["plugins"])
    write_config(tmp_path / "gateway.yaml", cfg(blocked / "audit.jsonl"))
    ok, detail = await g.gw.reload(actor="test")
    assert not ok and "cannot be written" in detail
    async with aiohttp.ClientSession(timeout=T) as s:
        assert (await post(s, g.url))[0] == 200
    await g.stop()
    assert any(json.loads(line)["type"] == "request" for line in good.read_text().splitlines())


def test_one_jsonl_file_is_one_sink_however_its_path_is_spelled(tmp_path):
    """`a.jsonl` and `./a.jsonl` (or a symlink to it) are one file: listed twice, every event would
    be written to it twice."""
    from gateway.config import ConfigError, load_config_text

    (tmp_path / "logs").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "logs")
    for other in (f"{tmp_path}/logs/./a.jsonl", f"{tmp_path}/logs/../logs/a.jsonl", f"{tmp_path}/link/a.jsonl"):
        text = (f"upstream: {{url: 'http://127.0.0.1:9'}}\nplugins:\n- name: audit\n  config:\n    sinks:\n"
                f"    - {{type: jsonl, path: '{tmp_path}/logs/a.jsonl'}}\n    - {{type: jsonl, path: '{other}'}}\n")
        with pytest.raises(ConfigError, match="listed twice"):
            load_config_text(text)


async def test_an_answer_without_a_body_has_its_time_to_first_byte(make_gateway, upstream, tmp_path):
    """HEAD (or any empty answer): the head is the first byte the client gets; ttfb_ms was null."""
    jl = tmp_path / "audit.jsonl"
    g = await make_gateway([{"name": "audit", "config": {"sinks": [{"type": "jsonl", "path": str(jl)}]}}])
    async with aiohttp.ClientSession(timeout=T) as s:
        for method in ("HEAD", "GET"):
            async with s.request(method, g.url + "/v1/models") as r:
                assert r.status == 200
                await r.read()
    await g.stop()
    evs = [json.loads(x) for x in jl.read_text().splitlines()]
    assert [e["method"] for e in evs] == ["HEAD", "GET"]
    for e in evs:
        assert e["ttfb_ms"] is not None and 0 < e["ttfb_ms"] <= e["latency_ms"], e


async def test_the_upstreams_own_request_id_reaches_the_client_and_the_trail(make_gateway, tmp_path):
    """The client's X-Request-ID is the gateway's; an upstream's own id (OpenAI's req_..., what its
    support asks for) comes along as X-Upstream-Request-ID and is recorded. An upstream echoing
    the gateway's id (vLLM does) adds nothing."""
    from aiohttp import web

    from .helpers import serve_handler

    async def answer(request: web.Request) -> web.Response:
        own = request.headers.get("X-Own-Id") or request.headers["X-Request-ID"]
        return web.json_response({"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]},
                                 headers={"X-Request-ID": own})

    runner, url = await serve_handler(answer)
    try:
        jl = tmp_path / "audit.jsonl"
        g = await make_gateway([{"name": "audit", "config": {"sinks": [{"type": "jsonl", "path": str(jl)}]}}],
                               upstream={"url": url})
        async with aiohttp.ClientSession(timeout=T) as s:
            async with s.post(g.url + "/v1/chat/completions", json=CHAT, headers={"X-Own-Id": "req_7f3a"}) as r:
                assert r.status == 200
                assert r.headers["X-Upstream-Request-ID"] == "req_7f3a"
                ours = r.headers["X-Request-ID"]
                assert ours != "req_7f3a"
            async with s.post(g.url + "/v1/chat/completions", json=CHAT) as r:  # echoed back: not relayed
                assert r.status == 200 and "X-Upstream-Request-ID" not in r.headers
        await g.stop()
    finally:
        await runner.cleanup()
    evs = [json.loads(x) for x in jl.read_text().splitlines()]
    assert evs[0]["request_id"] == ours and evs[0]["upstream_request_id"] == "req_7f3a"
    assert "upstream_request_id" not in evs[1]
