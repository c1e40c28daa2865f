"""conversations, as a chat UI uses them: message keys that look like the API's own fields, two tabs on
one conversation, a delete or a read while the first answer streams, an admin purge under a running
turn, what another owner's fresh id tells, search beyond ASCII, the admin API's page size."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
from typing import Any

import aiohttp
import sqlalchemy as sa

from gateway.plugins.conversations.store import C, row_message

from .helpers import base_config, write_config
from .test_conversations import ADMIN, chat, conv_row, db, start, stored  # noqa: F401  (db is a fixture)
from .test_conversations_ops import run_cli_here


async def get_json(url: str, headers: dict[str, str] | None = None, **params: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers=headers, params=params) as r:
            return r.status, await r.json(content_type=None)


async def make_key(g: Any, owner: str) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.post(g.admin_url + "/keys", json={"owner": owner, "name": owner}, headers=ADMIN) as r:
            assert r.status == 201, await r.text()
            return (await r.json())["key"]


class Stream:
    """A streamed chat request read chunk by chunk (the conversation id is in its headers)."""

    def __init__(self, g: Any, messages: list[dict[str, Any]], cid: str | None = None, words: int = 20) -> None:
        self.g, self.messages, self.cid_in, self.words = g, messages, cid, words

    async def __aenter__(self) -> "Stream":
        self.session = aiohttp.ClientSession()
        h = {"X-Demo-Delay": "0.05", "X-Demo-Words": str(self.words)}
        if self.cid_in:
            h["X-Conversation-ID"] = self.cid_in
        self.r = await self.session.post(self.g.url + "/v1/chat/completions", headers=h, json={
            "model": "demo-chat", "messages": self.messages, "stream": True})
        assert self.r.status == 200
        self.cid = self.r.headers["X-Conversation-ID"]
        self.text = ""
        await self.chunks(2)
        return self

    async def chunks(self, n: int | None = None) -> None:
        """Read n content chunks (None: to the end)."""
        got = 0
        async for line in self.r.content:
            if line.startswith(b"data: {"):
                d = json.loads(line[6:])
                if d["choices"]:
                    self.text += d["choices"][0]["delta"].get("content") or ""
                got += 1
                if n is not None and got >= n:
                    return

    async def __aexit__(self, *exc: Any) -> None:
        self.r.close()
        await self.session.close()


# -- 1. the API's fields win over the client's message keys --------------------------------------------
async def test_message_keys_named_like_api_fields_never_replace_them(make_gateway: Any, upstream: Any,
                                                                     db: dict[str, Any], tmp_path: Any) -> None:
    g = await start(make_gateway, db)
    spoof = {"position": 0, "conversation_id": "conv_XXXXXXXXXXXXXXXXXXXXXX", "object": "x"}
    u1 = {"role": "user", "content": "one", **spoof}
    st, h, b = await chat(g, [u1])
    cid = h["X-Conversation-ID"]
    msgs = [u1, b["choices"][0]["message"], {"role": "user", "content": "two", **spoof}]
    st, h, b = await chat(g, msgs, cid)
    assert st == 200 and h["X-Conversation-ID"] == cid  # same history: appended
    rows = await stored(g, cid)
    assert row_message(rows[0]) == u1 and row_message(rows[2])["position"] == 0  # stored as sent

    def envelope(ms: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [(m["object"], m["conversation_id"], m["position"]) for m in ms]

    want = [("conversation.message", cid, p) for p in range(4)]
    # the caller API, paged one message at a time as a UI does: ends, every position once
    seen: list[dict[str, Any]] = []
    after = -1
    for _ in range(10):
        st, page = await get_json(f"{g.url}/gateway/conversations/{cid}", limit=1, after=after)
        assert st == 200
        seen += page["messages"]
        if not page["has_more"]:
            break
        after = page["next_after"]
    assert envelope(seen) == want and [m["content"] for m in seen][::2] == ["one", "two"]
    st, one = await get_json(f"{g.admin_url}/conversations/{cid}", ADMIN)
    assert envelope(one["messages"]) == want
    async with aiohttp.ClientSession(headers=ADMIN) as s:
        async with s.get(f"{g.admin_url}/conversations/{cid}/export") as r:
            lines = [json.loads(x) for x in (await r.text()).splitlines()]
    assert envelope(lines) == want
    cfg = write_config(tmp_path / "cli.yaml", base_config(upstream.url, tmp_path, [{"name": "conversations"}],
                                                          database=db))
    r = await asyncio.to_thread(run_cli_here, cfg, "show", cid, "--json")
    assert r.returncode == 0, r.stderr
    assert envelope(json.loads(r.stdout)["messages"]) == want
    r = await asyncio.to_thread(run_cli_here, cfg, "export", cid)
    assert envelope([json.loads(x) for x in r.stdout.splitlines()]) == want
    r = await asyncio.to_thread(run_cli_here, cfg, "show", cid)
    assert [int(x.split()[0]) for x in r.stdout.splitlines()[1:]] == [0, 1, 2, 3]


# -- 2. two tabs on one conversation --------------------------------------------------------------------
async def tabs(g: Any, cid: str, sent: list[dict[str, Any]], headers: dict[str, str] | None = None
               ) -> list[dict[str, Any]]:
    """Tab A and tab B send their own next message on ``cid`` at once; A is answered first."""
    async def tab(name: str, delay: str) -> dict[str, Any]:
        st, h, b = await chat(g, sent + [{"role": "user", "content": "u2" + name}], cid,
                              headers={**(headers or {}), "X-Demo-Head-Delay": delay})
        assert st == 200 and h["X-Conversation-ID"] == cid
        return b["choices"][0]["message"]

    return list(await asyncio.gather(tab("A", "0.1"), tab("B", "0.6")))


async def test_two_tabs_at_once_without_memory_the_first_continues_without_a_fork(make_gateway: Any,
                                                                                  db: dict[str, Any]) -> None:
    g = await start(make_gateway, db)
    u1 = {"role": "user", "content": "u1"}
    st, h, b = await chat(g, [u1])
    cid, a1 = h["X-Conversation-ID"], b["choices"][0]["message"]
    a2a, a2b = await tabs(g, cid, [u1, a1])
    history_a = [u1, a1, {"role": "user", "content": "u2A"}, a2a, {"role": "user", "content": "u3A"}]
    st, h, b = await chat(g, history_a, cid)  # tab A goes on at once
    assert st == 200 and h["X-Conversation-ID"] == cid and "X-Conversation-Parent-ID" not in h
    rows = await stored(g, cid)
    assert [row_message(r)["content"] for r in rows] == \
        ["u1", a1["content"], "u2A", a2a["content"], "u3A", b["choices"][0]["message"]["content"]]
    async with g.gw.db.engine.connect() as conn:
        forks = (await conn.execute(sa.select(C.c.id).where(C.c.parent_id == cid))).all()
    assert len(forks) == 1  # tab B: a fork at the point the two differ
    assert [row_message(r)["content"] for r in await stored(g, forks[0].id)] == \
        ["u1", a1["content"], "u2B", a2b["content"]]


async def test_two_tabs_at_once_with_memory_never_send_both_histories(make_gateway: Any, db: dict[str, Any],
                                                                      upstream: Any) -> None:
    g = await start(make_gateway, db, {"memory": {"enabled": True}})
    u1 = {"role": "user", "content": "u1"}
    st, h, b = await chat(g, [u1])
    cid, a1 = h["X-Conversation-ID"], b["choices"][0]["message"]
    a2a, _ = await tabs(g, cid, [])
    st, h, b = await chat(g, [{"role": "user", "content": "u3"}], cid)
    assert st == 200 and h["X-Conversation-ID"] == cid
    sent = upstream.requests[-1]["body"]["messages"]
    assert [m["content"] for m in sent] == ["u1", a1["content"], "u2A", a2a["content"], "u3"]
    rows = await stored(g, cid)
    assert [row_message(r)["content"] for r in rows][:5] == ["u1", a1["content"], "u2A", a2a["content"], "u3"]


# -- 3. a delete or a read while the first answer streams ------------------------------------------------
async def test_a_new_conversation_deleted_while_its_first_answer_streams_is_not_stored(
        make_gateway: Any, db: dict[str, Any]) -> None:
    g = await start(make_gateway, db)
    base = g.url + "/gateway/conversations"
    async with Stream(g, [{"role": "user", "content": "deleted by the caller mid-stream"}]) as s1:
        st, body = await get_json(f"{base}/{s1.cid}")  # it exists: nothing stored yet
        assert st == 200 and body["id"] == s1.cid and body["in_progress"] is True and body["messages"] == []
        async with aiohttp.ClientSession() as s:
            async with s.delete(f"{base}/{s1.cid}") as r:
                assert r.status == 200 and (await r.json())["deleted"] is True
        await s1.chunks()
        assert s1.text
    async with Stream(g, [{"role": "user", "content": "deleted by an admin mid-stream"}]) as s2:
        async with aiohttp.ClientSession(headers=ADMIN) as s:
            async with s.delete(f"{g.admin_url}/conversations/{s2.cid}") as r:
                assert r.status == 200, await r.text()
        await s2.chunks()
    for cid in (s1.cid, s2.cid):
        assert await stored(g, cid) == [] and await conv_row(g, cid) is None
        st, body = await get_json(f"{base}/{cid}")
        assert st == 404 and body["error"]["code"] == "conversation_not_found"
        st, h, b = await chat(g, [{"role": "user", "content": "again"}], cid)
        assert st == 404


# -- 4. the admin purge keeps a conversation with a turn running ----------------------------------------
async def test_admin_purge_keeps_a_conversation_whose_turn_is_streaming(make_gateway: Any, db: dict[str, Any]) -> None:
    g = await start(make_gateway, db)
    u1 = {"role": "user", "content": "long ago"}
    st, h, b = await chat(g, [u1])
    cid, a1 = h["X-Conversation-ID"], b["choices"][0]["message"]
    st, h, _ = await chat(g, [{"role": "user", "content": "idle, not resumed"}])
    idle = h["X-Conversation-ID"]
    await g.plugin("conversations").flush()
    async with g.gw.db.engine.begin() as conn:  # both idle for ten days
        await conn.execute(C.update().values(updated_at=dt.datetime.utcnow() - dt.timedelta(days=10)))
    async with Stream(g, [u1, a1, {"role": "user", "content": "resumed now"}], cid) as s1:
        async with aiohttp.ClientSession(headers=ADMIN) as s:
            async with s.post(g.admin_url + "/conversations/purge", params={"older_than_days": "1"}) as r:
                assert r.status == 200 and (await r.json())["deleted"] == 1
        await s1.chunks()
    rows = await stored(g, cid)
    assert [row_message(r)["content"] for r in rows] == ["long ago", a1["content"], "resumed now", s1.text]
    assert await conv_row(g, idle) is None


# -- 5. another owner's fresh id answers as a made-up one does --------------------------------------------
async def test_another_owners_fresh_conversation_is_looked_up_like_an_unknown_id(make_gateway: Any,
                                                                               db: dict[str, Any]) -> None:
    """Another owner's conversation cached here (just made, its write queued) takes the path of an id
    that does not exist: the wait and the second lookup (its time tells nothing)."""
    g = await start(make_gateway, db, {"flush_interval": 5.0}, key_auth=True)
    alice, bob = await make_key(g, "alice"), await make_key(g, "bob")
    st, h, _ = await chat(g, [{"role": "user", "content": "bob's"}], key=bob)
    bobs = h["X-Conversation-ID"]
    store = g.plugin("conversations").shared.store
    looked: list[str] = []
    get = store.get

    async def counting(cid: str) -> Any:
        looked.append(cid)
        return await get(cid)

    store.get = counting
    answers = []
    for cid in (bobs, bobs[:-4] + "ZZZZ"):
        st, body = await get_json(f"{g.url}/gateway/conversations/{cid}", {"Authorization": f"Bearer {alice}"})
        answers.append((st, body))
    assert answers[0] == answers[1] and answers[0][0] == 404
    assert looked == [bobs, bobs, bobs[:-4] + "ZZZZ", bobs[:-4] + "ZZZZ"]


# -- 6. search beyond ASCII -------------------------------------------------------------------------------
async def test_admin_search_is_case_insensitive_beyond_ascii(make_gateway: Any, db: dict[str, Any]) -> None:
    g = await start(make_gateway, db)
    st, h, _ = await chat(g, [{"role": "user", "content": "Grüße aus Köln, ÉCOLE 100%_done"}])
    cid = h["X-Conversation-ID"]
    await g.plugin("conversations").flush()
    for q in ("KÖLN", "köln", "école", "GRÜSSE"[:3], "grüße", "100%_d"):
        st, body = await get_json(g.admin_url + "/conversations", ADMIN, q=q)
        assert st == 200 and [c["id"] for c in body["data"]] == [cid], q
    for q in ("KÖLNER", "100%x", "_x"):
        st, body = await get_json(g.admin_url + "/conversations", ADMIN, q=q)
        assert body["data"] == [], q


# -- 7. the admin API's page size -------------------------------------------------------------------------
async def test_admin_api_pages_by_page_size(make_gateway: Any, db: dict[str, Any]) -> None:
    g = await start(make_gateway, db, {"page_size": 2})
    ids, answers = [], []
    for i in range(3):
        st, h, b = await chat(g, [{"role": "user", "content": f"c{i}"}])
        ids.append(h["X-Conversation-ID"])
        answers.append(b["choices"][0]["message"])
    st, page = await get_json(g.admin_url + "/conversations", ADMIN)
    assert len(page["data"]) == 2 and page["has_more"]
    st, h, _ = await chat(g, [{"role": "user", "content": "c0"}, answers[0], {"role": "user", "content": "more"}],
                          ids[0])
    assert h["X-Conversation-ID"] == ids[0]
    st, one = await get_json(f"{g.admin_url}/conversations/{ids[0]}", ADMIN)
    assert [m["position"] for m in one["messages"]] == [0, 1] and one["has_more"] and one["next_after"] == 1
