"""Retention running while the gateway works: a purge never shows up as tampering to a reader of the
trail, never takes newer events than its cutoff, never deletes a conversation under a turn still
running, and a reload that shortens the retention interval applies at once."""
from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

import aiohttp
import yaml

from gateway.db import Database
from gateway.plugins.audit import store

from .helpers import ADMIN_TOKEN, base_config
from .test_conversations import chat, db  # noqa: F401  (db: the SQLite/PostgreSQL fixture)

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def iso(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


async def audit_db(make_gateway: Any, db: dict[str, Any], n: int) -> str:  # noqa: F811
    """A database with the audit table and ``n`` request events in it."""
    g = await make_gateway([{"name": "audit", "config": {"sinks": ["database"]}}], database=db, name="mk.yaml")
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            async with s.get(g.url + "/v1/models") as r:
                await r.read()
    await g.stop()
    return db["url"]


async def test_a_purge_during_a_read_of_the_trail_is_not_a_gap(make_gateway: Any, db: dict[str, Any]) -> None:  # noqa: F811
    url = await audit_db(make_gateway, db, 9)
    d = Database(url)
    try:
        seen = []
        async with store.snapshot(d) as conn:
            async for r in store.iter_rows(d, page=2, conn=conn):
                seen.append(int(r.seq))
                if len(seen) == 3:  # between two pages, a purge of everything so far commits
                    ev = await store.purge(d, iso(dt.datetime.utcnow() + dt.timedelta(minutes=1)))
                    assert ev is not None and ev["deleted"] == 9
        assert seen == list(range(1, 10))  # what the read began with, whole
        res = await store.verify(d)
        assert res.ok, res.message()
    finally:
        await d.close()


async def test_a_purge_stops_at_the_first_event_newer_than_its_cutoff(make_gateway: Any, tmp_path: Any) -> None:
    """An event is stored when its request ends: a long stream's event (arrived long ago) comes
    after newer ones. Purging up to it would delete those newer events."""
    url = await audit_db(make_gateway, {"url": f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"}, 0)
    now = dt.datetime.utcnow()
    old, new = iso(now - dt.timedelta(hours=2)), iso(now)
    d = Database(url)
    try:
        await store.append(d, [{"time": old, "type": "request", "n": 1}, {"time": new, "type": "request", "n": 2},
                               {"time": old, "type": "request", "n": 3}])
        ev = await store.purge(d, iso(now - dt.timedelta(hours=1)))
        assert ev is not None and ev["deleted"] == 1 and ev["anchor"]["seq"] == 1
        left = [r async for r in store.iter_rows(d)]
        assert [int(r.seq) for r in left] == [2, 3, 4]  # the newer event stays, and so (for now) the late one
        assert (await store.verify(d)).ok
    finally:
        await d.close()


async def test_retention_keeps_a_conversation_whose_turn_is_still_streaming(make_gateway: Any) -> None:
    g = await make_gateway([{"name": "conversations", "config": {
        "retention_days": 1.0 / 86400, "retention_interval": 0.3}}])
    u1 = {"role": "user", "content": "first"}
    st, h, body = await chat(g, [u1])
    cid, a1 = h["X-Conversation-ID"], body["choices"][0]["message"]
    await g.plugin("conversations").flush()
    async with aiohttp.ClientSession() as s:  # a turn that outlives the retention several times over
        async with s.post(g.url + "/v1/chat/completions", headers={
                "X-Conversation-ID": cid, "X-Demo-Delay": "0.2", "X-Demo-Words": "20"},
                json={"model": "demo-chat", "stream": True,
                      "messages": [u1, a1, {"role": "user", "content": "a long answer please"}]}) as r:
            assert r.status == 200
            await r.read()
    await g.plugin("conversations").flush()
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{g.url}/gateway/conversations/{cid}") as r:
            assert r.status == 200, "purged under the running turn"
            assert len((await r.json())["messages"]) == 4


async def test_a_reload_that_shortens_the_retention_interval_applies_at_once(make_gateway: Any, upstream: Any,
                                                                             tmp_path: Any) -> None:
    cfg = base_config(upstream.url, tmp_path, [{"name": "conversations", "config": {
        "retention_days": 30, "retention_interval": 3600}}])
    g = await make_gateway(raw=yaml.safe_dump(cfg))
    st, h, _ = await chat(g, [{"role": "user", "content": "keep me a while"}])
    cid = h["X-Conversation-ID"]
    await g.plugin("conversations").flush()
    await asyncio.sleep(5.5)  # the first retention run (5 s after start) is over: the next is an hour away
    cfg["plugins"][0]["config"] = {"retention_days": 1.0 / 86400, "retention_interval": 0.3}
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(cfg))
    async with aiohttp.ClientSession() as s:
        async with s.post(g.admin_url + "/config/reload", headers=ADMIN) as r:
            assert r.status == 200, await r.text()
        deadline = time.monotonic() + 15
        while True:
            async with s.get(f"{g.url}/gateway/conversations/{cid}") as r:
                if r.status == 404:
                    break
            assert time.monotonic() < deadline, "the reload's retention did not apply"
            await asyncio.sleep(0.2)


async def test_an_export_with_chain_can_be_rechecked_as_the_docs_show(make_gateway: Any, tmp_path: Any) -> None:
    """The recipe in docs/audit.md, run on `gateway audit export --with-chain`: records with a float
    below 1e-4 (a purge's `older_than_days`) and non-ASCII text re-check too."""
    import hashlib
    import json
    import re
    import subprocess
    import sys
    from pathlib import Path

    url = await audit_db(make_gateway, {"url": f"sqlite+aiosqlite:///{tmp_path / 'e.db'}"}, 2)
    d = Database(url)
    try:
        await store.append(d, [{"time": iso(dt.datetime.utcnow()), "type": "conversations.purged",
                                "older_than_days": 5.787037037037037e-05, "actor": "cli ü"}])
    finally:
        await d.close()
    cfg = base_config("http://127.0.0.1:9", tmp_path, [{"name": "audit"}], database={"url": url})
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "gateway", "audit", "export", "--with-chain", "-c",
                          str(tmp_path / "e.yaml")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    doc = (Path(__file__).resolve().parent.parent / "docs" / "audit.md").read_text()
    recipe = re.search(r"```python\n(import hashlib, json\n\ndef record_ok.*?)```", doc, re.S)
    assert recipe is not None
    ns: dict[str, Any] = {"hashlib": hashlib, "json": json}
    exec(recipe.group(1), ns)
    records = [json.loads(x) for x in out.stdout.splitlines()]
    assert len(records) == 3 and records[-1]["older_than_days"] == 5.787037037037037e-05
    assert all(ns["record_ok"](r) for r in records)
    records[0]["status"] = 500  # an edited copy is caught
    assert not ns["record_ok"](records[0])


async def test_retention_keeps_the_parent_of_a_fork_whose_turn_is_streaming(make_gateway: Any) -> None:
    """A fork copies the messages it shares with its parent when it is written: the parent of a fork
    in flight is active too, or the fork would be dropped (its parent gone) when its turn ends."""
    g = await make_gateway([{"name": "conversations", "config": {
        "retention_days": 1.0 / 86400, "retention_interval": 0.3}}])
    u1 = {"role": "user", "content": "first"}
    st, h, body = await chat(g, [u1])
    cid = h["X-Conversation-ID"]
    await g.plugin("conversations").flush()
    edited = {"role": "assistant", "content": "an edited answer"}
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions", headers={
                "X-Conversation-ID": cid, "X-Demo-Delay": "0.2", "X-Demo-Words": "20"},
                json={"model": "demo-chat", "stream": True,
                      "messages": [u1, edited, {"role": "user", "content": "go on"}]}) as r:
            assert r.status == 200 and r.headers.get("X-Conversation-Parent-ID") == cid
            fork = r.headers["X-Conversation-ID"]
            await r.read()
    await g.plugin("conversations").flush()
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{g.url}/gateway/conversations/{fork}") as r:
            assert r.status == 200, "the fork whose turn was in flight was dropped"
            assert len((await r.json())["messages"]) == 4


def test_retention_beyond_a_century_is_refused_by_the_config_check(tmp_path: Any) -> None:
    """A retention of a million days passed the check, then every purge failed (its cut-off date
    is out of a datetime's range) and logged an OverflowError each interval."""
    import pytest

    from gateway.config import ConfigError, load_config_text
    for plugin in ("audit", "conversations"):
        ok = base_config("http://127.0.0.1:9", tmp_path, [{"name": plugin, "config": {"retention_days": 36500}}])
        load_config_text(yaml.safe_dump(ok))
        bad = base_config("http://127.0.0.1:9", tmp_path, [{"name": plugin, "config": {"retention_days": 1000000}}])
        with pytest.raises(ConfigError) as e:
            load_config_text(yaml.safe_dump(bad))
        assert "retention_days" in str(e.value), plugin
