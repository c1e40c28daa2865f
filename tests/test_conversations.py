"""conversations: recording through the real gateway and the OpenAI SDK, on SQLite and PostgreSQL.

Every test here runs twice (``db`` fixture): on a real SQLite file and on a real PostgreSQL server
(``database.auto_migrate: true``)."""
from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aiohttp
import pytest
from openai import AsyncOpenAI, NotFoundError
from sqlalchemy import select

from gateway.plugins.conversations import canonical
from gateway.plugins.conversations.state import Bodies, View, _Views, body_size
from gateway.plugins.conversations.store import C, M, T, row_message

from .helpers import ADMIN_TOKEN, create_pg_database

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "look something up",
                                           "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}]


@pytest.fixture(params=["sqlite", "postgresql"])
async def db(request: Any, tmp_path: Any) -> dict[str, Any]:
    if request.param == "sqlite":
        return {"url": f"sqlite+aiosqlite:///{tmp_path / 'conv.db'}"}
    dsn = request.getfixturevalue("pg_cluster")
    url = await create_pg_database(dsn, "gw_" + uuid.uuid4().hex[:12])
    return {"url": url, "auto_migrate": True}


async def start(make_gateway: Any, db: dict[str, Any], conv: dict[str, Any] | None = None,
                key_auth: bool = False, **sections: Any) -> Any:
    plugins = [{"name": "key_auth"}] if key_auth else []
    plugins.append({"name": "conversations", "config": conv or {}})
    return await make_gateway(plugins, database=db, **sections)


async def stored(g: Any, cid: str) -> list[Any]:
    await g.plugin("conversations").flush()
    async with g.gw.db.engine.connect() as conn:
        return list((await conn.execute(select(M).where(M.c.conversation_id == cid).order_by(M.c.position))).all())


async def turns(g: Any, cid: str) -> list[Any]:
    async with g.gw.db.engine.connect() as conn:
        return list((await conn.execute(select(T).where(T.c.conversation_id == cid).order_by(T.c.id))).all())


async def conv_row(g: Any, cid: str) -> Any:
    async with g.gw.db.engine.connect() as conn:
        return (await conn.execute(select(C).where(C.c.id == cid))).first()


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return canonical(a) == canonical(b)


def sdk(g: Any, key: str = "sk-unused") -> AsyncOpenAI:
    return AsyncOpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0, timeout=20)


async def chat(g: Any, messages: list[dict[str, Any]], cid: str | None = None, headers: dict[str, str] | None = None,
               key: str | None = None, **body: Any) -> tuple[int, dict[str, Any], Any]:
    h = dict(headers or {})
    if cid:
        h["X-Conversation-ID"] = cid
    if key:
        h["Authorization"] = f"Bearer {key}"
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions", json={"model": "demo-chat", "messages": messages, **body},
                          headers=h, timeout=aiohttp.ClientTimeout(total=20)) as r:
            return r.status, dict(r.headers), await r.json()


async def two_turns(g: Any, first: str, second: str) -> tuple[str, list[dict[str, Any]]]:
    """A conversation of two turns; returns its id and the messages the client sent in the second."""
    msgs = [{"role": "user", "content": first}]
    st, h, b = await chat(g, msgs)
    cid = h["X-Conversation-ID"]
    msgs += [b["choices"][0]["message"], {"role": "user", "content": second}]
    st, h, b = await chat(g, msgs, cid)
    assert st == 200 and h["X-Conversation-ID"] == cid
    return cid, msgs


# -- recording through the SDK -----------------------------------------------------------------------
async def test_sdk_multi_turn_plain_stream_and_tools(make_gateway: Any, db: dict[str, Any]) -> None:
    g = await start(make_gateway, db)
    client = sdk(g)
    sent: list[dict[str, Any]] = [{"role": "system", "content": "You are terse."},
                                  {"role": "user", "content": [{"type": "text", "text": "Hello, multi-part"}]}]
    # turn 1: plain
    raw = await client.chat.completions.with_raw_response.create(model="demo-chat", messages=sent)
    cid = raw.headers["X-Conversation-ID"]
    assert cid.startswith("conv_") and len(cid) == 27
    r1 = raw.parse()
    a1 = r1.choices[0].message.model_dump(exclude_none=True)
    sent.append(a1)
    sent.append({"role": "user", "content": "Look up the answer, with tools"})
    # turn 2: streamed, the backend answers with a tool call
    raw = await client.chat.completions.with_raw_response.create(
        model="demo-chat", messages=sent, tools=TOOLS, stream=True, extra_headers={"X-Conversation-ID": cid})
    assert raw.headers["X-Conversation-ID"] == cid
    calls: dict[int, dict[str, Any]] = {}
    async for chunk in raw.parse():
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            slot = calls.setdefault(tc.index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
            slot["id"] = tc.id or slot["id"]
            slot["function"]["name"] += tc.function.name or ""
            slot["function"]["arguments"] += tc.function.arguments or ""
    assert calls and json.loads(calls[0]["function"]["arguments"])["query"]
    a2 = {"role": "assistant", "content": None, "tool_calls": [calls[0]]}
    sent.append(a2)
    sent.append({"role": "tool", "tool_call_id": calls[0]["id"], "content": "42"})
    # turn 3: streamed with usage shown to the client; history resent as-is
    raw = await client.chat.completions.with_raw_response.create(
        model="demo-chat", messages=sent, stream=True, stream_options={"include_usage": True},
        extra_headers={"X-Conversation-ID": cid})
    text, usage = "", None
    async for chunk in raw.parse():
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage:
            usage = chunk.usage
    assert text == "The tool returned: 42" and usage is not None

    rows = await stored(g, cid)
    assert [r.position for r in rows] == list(range(7))  # every message once, in order, no gaps
    expect = sent + [{"role": "assistant", "content": text}]
    for r, m in zip(rows, expect):
        assert same(row_message(r), m), (row_message(r), m)
    assert row_message(rows[1])["content"] == sent[1]["content"]            # multi-part kept as a list
    assert row_message(rows[4])["tool_calls"][0]["function"] == calls[0]["function"]
    assert rows[5].tool_call_id == calls[0]["id"] and rows[5].role == "tool"
    assert row_message(rows[6])["content"] == text                          # byte-identical to what was streamed
    assert [r.status for r in rows if r.role == "assistant"] == ["complete"] * 3
    assert rows[2].finish_reason == "stop" and rows[4].finish_reason == "tool_calls"
    assert all(r.tokens_derived for r in rows if r.role != "assistant")
    assert not any(r.tokens_derived for r in rows if r.role == "assistant")
    assert rows[2].tokens == r1.usage.completion_tokens and rows[6].tokens == usage.completion_tokens
    assert rows[0].tokens + rows[1].tokens == r1.usage.prompt_tokens   # first turn: the whole prompt is new
    assert all(r.latency_ms is not None and r.ttft_ms is not None for r in rows if r.role == "assistant")
    assert {r.request_id for r in rows[:3]} == {rows[2].request_id} and rows[0].owner == "anonymous"
    ts = await turns(g, cid)
    assert len(ts) == 3 and [t.status for t in ts] == ["complete"] * 3
    assert (ts[0].prompt_tokens, ts[0].completion_tokens) == (r1.usage.prompt_tokens, r1.usage.completion_tokens)
    assert (ts[2].prompt_tokens, ts[2].completion_tokens, ts[2].total_tokens) == \
        (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)
    assert json.loads(ts[2].usage) == usage.model_dump(exclude_none=True)
    c = await conv_row(g, cid)
    assert c.message_count == 7 and c.turn_count == 3
    assert c.prompt_tokens == sum(t.prompt_tokens for t in ts)

    # the same history sent again without a new message: nothing stored twice
    raw = await client.chat.completions.with_raw_response.create(
        model="demo-chat", messages=expect, extra_headers={"X-Conversation-ID": cid})
    rows = await stored(g, cid)
    assert len(rows) == 8 and rows[7].role == "assistant"
    await client.close()


async def test_fork_on_edited_history(make_gateway: Any, db: dict[str, Any]) -> None:
    g = await start(make_gateway, db)
    cid, msgs = await two_turns(g, "first question", "second question")
    before = [row_message(r) for r in await stored(g, cid)]
    assert len(before) == 4
    edited = [msgs[0], msgs[1], {"role": "user", "content": "an edited second question"}]
    st, h, b = await chat(g, edited, cid)
    assert st == 200
    fork = h["X-Conversation-ID"]
    assert fork != cid and h["X-Conversation-Parent-ID"] == cid
    assert [row_message(r) for r in await stored(g, cid)] == before      # the parent is never overwritten
    rows = await stored(g, fork)
    assert [r.position for r in rows] == [0, 1, 2, 3]
    assert [row_message(r) for r in rows[:2]] == before[:2]
    assert row_message(rows[2])["content"] == "an edited second question"
    assert rows[3].content == json.dumps(b["choices"][0]["message"]["content"], ensure_ascii=False)
    c = await conv_row(g, fork)
    assert (c.parent_id, c.fork_position, c.message_count) == (cid, 2, 4)
    # the fork continues on its own
    st, h, _ = await chat(g, edited + [b["choices"][0]["message"], {"role": "user", "content": "more"}], fork)
    assert h["X-Conversation-ID"] == fork
    assert len(await stored(g, fork)) == 6


async def test_an_answer_sent_back_with_the_sdks_parsed_field_is_not_an_edit(make_gateway: Any,
                                                                            db: dict[str, Any]) -> None:
    """The OpenAI SDKs' ``chat.completions.parse()`` returns the answer with ``parsed`` (its content
    decoded); a client appending that message to its history sends it back: the same answer, the
    same conversation, not a fork at every such turn."""
    g = await start(make_gateway, db)
    msgs = [{"role": "user", "content": "answer in JSON"}]
    st, h, b = await chat(g, msgs)
    cid = h["X-Conversation-ID"]
    answer = b["choices"][0]["message"]
    msgs += [{**answer, "refusal": None, "tool_calls": None, "parsed": {"answer": 42}},
             {"role": "user", "content": "and again"}]
    st, h, b = await chat(g, msgs, cid)
    assert st == 200 and h["X-Conversation-ID"] == cid and "X-Conversation-Parent-ID" not in h
    assert len(await stored(g, cid)) == 4
    # a user message's own "parsed" is the client's content: kept, so a change to it is an edit
    st, h, _ = await chat(g, [{**msgs[0], "parsed": 1}] + msgs[1:] + [answer, {"role": "user", "content": "3"}], cid)
    assert h["X-Conversation-ID"] != cid and h["X-Conversation-Parent-ID"] == cid


async def test_memory_mode_prepends_trimmed_history(make_gateway: Any, db: dict[str, Any], upstream: Any) -> None:
    g = await start(make_gateway, db, {"memory": {"enabled": True, "max_messages": 5}, "cache_ttl": 0})
    system = {"role": "system", "content": "Remember everything."}
    st, h, b = await chat(g, [system, {"role": "user", "content": "u1"}])
    cid = h["X-Conversation-ID"]
    history = [system, {"role": "user", "content": "u1"}, b["choices"][0]["message"]]
    for i in (2, 3, 4):
        new = {"role": "user", "content": f"u{i}"}
        st, h, b = await chat(g, [new], cid)   # only the new message: the gateway remembers
        assert st == 200 and h["X-Conversation-ID"] == cid
        seen = upstream.requests[-1]["body"]["messages"]
        want = history + [new]
        kept = want[1:][-(5 - 1):]  # system kept, oldest trimmed to max_messages,
        while kept[0]["role"] != "user":  # and the history after it starts with a question
            kept = kept[1:]
        want = [want[0]] + kept
        assert seen == want, (i, seen)
        assert "X-Conversation-ID" not in upstream.requests[-1]["headers"]
        assert b["choices"][0]["message"]["content"].endswith(f"u{i}")
        history += [new, b["choices"][0]["message"]]
    rows = await stored(g, cid)
    assert [same(row_message(r), m) for r, m in zip(rows, history)] == [True] * len(history) == [True] * len(rows)
    # per request off: forwarded as sent
    st, h, b = await chat(g, [{"role": "user", "content": "alone"}], headers={"X-Conversation-Memory": "off"})
    assert upstream.requests[-1]["body"]["messages"] == [{"role": "user", "content": "alone"}]
    assert "X-Conversation-Memory" not in upstream.requests[-1]["headers"]
    st, h, b = await chat(g, [{"role": "user", "content": "x"}], cid, headers={"X-Conversation-Memory": "maybe"})
    assert st == 400 and b["error"]["code"] == "invalid_header"


async def test_memory_with_a_resent_system_prompt_a_repeated_question_and_a_tool_result(
        make_gateway: Any, db: dict[str, Any], upstream: Any) -> None:
    """Memory clients send their new messages; one that resends its system prompt each turn, or
    asks its first question again, continues the conversation (no fork, history kept once). A new
    tool result gets the assistant call it answers even when the token budget is used up."""
    g = await start(make_gateway, db, {"memory": {"enabled": True, "max_tokens": 20}, "cache_ttl": 0})
    system = {"role": "system", "content": "Be terse."}
    st, h, b = await chat(g, [system, {"role": "user", "content": "hi"}])
    cid, a1 = h["X-Conversation-ID"], b["choices"][0]["message"]
    st, h, b = await chat(g, [system, {"role": "user", "content": "a2"}], cid)
    assert st == 200 and h["X-Conversation-ID"] == cid and "X-Conversation-Parent-ID" not in h
    assert upstream.requests[-1]["body"]["messages"] == [system, {"role": "user", "content": "hi"}, a1,
                                                         {"role": "user", "content": "a2"}]
    st, h, b = await chat(g, [{"role": "user", "content": "hi"}], cid)  # the first question again
    assert h["X-Conversation-ID"] == cid and "X-Conversation-Parent-ID" not in h
    assert upstream.requests[-1]["body"]["messages"][-1] == {"role": "user", "content": "hi"}
    # ... and again with the system prompt in front: the question still reaches the upstream
    st, h, b = await chat(g, [system, {"role": "user", "content": "hi"}], cid)
    assert h["X-Conversation-ID"] == cid and "X-Conversation-Parent-ID" not in h
    seen = upstream.requests[-1]["body"]["messages"]
    assert seen[0] == system and seen[-1] == {"role": "user", "content": "hi"} and seen.count(system) == 1
    rows = await stored(g, cid)
    assert [r.role for r in rows] == ["system"] + ["user", "assistant"] * 4
    # a tool call, then its result alone, with a budget the result uses up by itself
    tools = [{"type": "function", "function": {"name": "find", "parameters": {"type": "object", "properties": {}}}}]
    st, h, b = await chat(g, [{"role": "user", "content": "find x"}], cid, tools=tools)
    call = b["choices"][0]["message"]
    assert call.get("tool_calls"), call
    result = {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"], "content": "result X " * 15}
    st, h, b = await chat(g, [result], cid, tools=tools)
    assert st == 200
    seen = upstream.requests[-1]["body"]["messages"]
    assert seen[0] == system and seen[-1] == result
    assert seen[-2]["role"] == "assistant" and seen[-2]["tool_calls"][0]["id"] == result["tool_call_id"]


async def test_memory_cache_keeps_message_bodies_within_cache_bytes(make_gateway: Any, db: dict[str, Any],
                                                                    upstream: Any) -> None:
    """Memory conversations with large messages: past ``cache_bytes`` the cache lets go of the least
    recently used conversations' bodies (the gauge stays under the budget while the turns add up
    to several times it), and memory still sends each conversation's whole history (read from the
    database again)."""
    budget = 150_000  # one conversation (six messages of 20 kB) fits, not all four
    g = await start(make_gateway, db, {"memory": {"enabled": True}, "cache_ttl": None, "cache_bytes": budget})
    history: dict[int, list[dict[str, Any]]] = {i: [] for i in range(4)}
    ids: dict[int, str] = {}
    sent = 0
    async with aiohttp.ClientSession() as s:
        for turn in range(3):
            for i in range(4):
                new = {"role": "user", "content": f"c{i} t{turn} " + "x" * 20_000}
                st, h, b = await chat(g, [new], ids.get(i))
                assert st == 200
                ids[i] = h["X-Conversation-ID"]
                assert upstream.requests[-1]["body"]["messages"] == history[i] + [new], (turn, i)
                history[i] += [new, b["choices"][0]["message"]]
                sent += 2 * 20_000
                async with s.get(g.admin_url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
                    held = next(float(x.split()[1]) for x in (await r.text()).splitlines()
                                if x.startswith("gateway_conversations_cache_bytes "))
                assert 0 < held <= budget, (turn, i, held)
                shared = g.plugin("conversations").shared  # counted as they come and go = counted afresh
                for v in shared.views.values():
                    assert v.nbytes == sum(body_size(m) for m in v.tail) + (
                        sum(body_size(m) for m in v.pinned) if v.pinned is not None and v.prompt[0] < v.tail_start
                        else 0)
    assert sent > 3 * budget
    assert shared.bodies.total == sum(v.nbytes for v in shared.views.values()) > 0
    for i in range(4):
        rows = await stored(g, ids[i])
        assert [same(row_message(r), m) for r, m in zip(rows, history[i])] == [True] * len(rows) == [True] * 6


def test_cache_counts_bodies_through_cuts_forks_and_evictions() -> None:
    def fresh(v: View) -> int:
        return sum(body_size(m) for m in v.tail) + (
            sum(body_size(m) for m in v.pinned) if v.pinned is not None and v.prompt[0] < v.tail_start else 0)

    bodies = Bodies(10 ** 9)
    views = _Views(bodies)
    v = views["c"] = View("c", "o", None)
    v.append([{"role": "system", "content": "s" * 50}], ["s"], [1], keep=3)
    for i in range(10):  # a tail of 3: cut every turn past the third; the system prompt kept aside
        v.append([{"role": "user", "content": "x" * i * 100}, {"role": "assistant", "content": [{"type": "text",
                  "text": "y" * i}]}], [f"u{i}", f"a{i}"], [1, 1], keep=3)
        assert v.nbytes == fresh(v) > 0 and bodies.total == v.nbytes
    assert v.pinned == [{"role": "system", "content": "s" * 50}] and v.tail_start == 18
    f = v.fork("f", 19)
    assert f.nbytes == fresh(f) > 0 and bodies.total == v.nbytes  # not cached yet
    views["f"] = f
    assert bodies.total == v.nbytes + f.nbytes
    del views["c"]
    assert bodies.total == f.nbytes and v.bodies is None
    v.append([{"role": "user", "content": "z"}], ["z"], [1], keep=3)  # (in flight when evicted)
    assert bodies.total == f.nbytes
    views["c"] = v
    bodies.limit = v.nbytes
    bodies.enforce()  # over budget: the least recently grown (f) lets go of its bodies
    assert f.nbytes == 0 and f.tail == [] and f.pinned is None and f.count == 19 and bodies.total == v.nbytes
    v.append([], [], [], keep=0)  # memory off: no bodies
    assert bodies.total == v.nbytes == 0 == fresh(v)
    views.pop("c")
    views.clear()
    assert bodies.total == 0 and not bodies.lru


async def test_memory_token_trim_route_override_and_db_fallback(make_gateway: Any, db: dict[str, Any],
                                                              upstream: Any) -> None:
    # memory off globally, on (with a token budget) for one route; a tiny cache tail and a slow writer
    # force the history to come from the database after this conversation's pending writes land
    g = await start(make_gateway, db, {"cache_messages": 1, "flush_interval": 0.5},
                    routes=[{"path_prefix": "/v1/chat", "plugins": {"conversations": {
                        "config": {"memory": {"enabled": True, "max_messages": None, "max_tokens": 80}}}}}])
    system = {"role": "system", "content": "sys"}
    st, h, b = await chat(g, [system, {"role": "user", "content": "one two three four five six seven eight nine ten"}])
    cid = h["X-Conversation-ID"]
    a1 = b["choices"][0]["message"]
    st, h, b = await chat(g, [{"role": "user", "content": "short"}], cid)   # immediately: writes still queued
    seen = upstream.requests[-1]["body"]["messages"]
    assert seen[0] == system and seen[-1] == {"role": "user", "content": "short"}
    assert seen[1:-1] == [{"role": "user", "content": "one two three four five six seven eight nine ten"}, a1]
    for i in range(4):
        st, h, b = await chat(g, [{"role": "user", "content": f"more words number {i} " * 3}], cid)
    seen = upstream.requests[-1]["body"]["messages"]
    rows = await stored(g, cid)
    assert seen[0] == system and len(seen) < len(rows) + 1       # trimmed by the token budget
    n_hist = len(seen) - 2
    tail = [row_message(r) for r in rows[-2 - n_hist:-2]]  # rows end with the new user message + answer
    assert n_hist >= 1 and seen[1:-1] == tail                                    # the newest stored messages, in order
    assert seen[1]["role"] != "tool"


# -- ownership -------------------------------------------------------------------------------------
async def test_ownership_isolation(make_gateway: Any, db: dict[str, Any]) -> None:
    g = await start(make_gateway, db, key_auth=True)
    keys = {}
    async with aiohttp.ClientSession() as s:
        for owner in ("alice", "bob"):
            async with s.post(g.admin_url + "/keys", json={"owner": owner, "name": owner}, headers=ADMIN) as r:
                assert r.status == 201, await r.text()
                keys[owner] = (await r.json())["key"]
    st, h, b = await chat(g, [{"role": "user", "content": "alice's secret"}], key=keys["alice"])
    cid = h["X-Conversation-ID"]
    before = len(await stored(g, cid))
    # bob with alice's id: 404 in the OpenAI shape, and nothing is read or appended
    st, h, b = await chat(g, [{"role": "user", "content": "alice's secret"}], cid, key=keys["bob"])
    assert st == 404 and "X-Conversation-ID" not in h
    assert b == {"error": {"message": "No conversation with this id exists for this caller.",
                           "type": "invalid_request_error", "code": "conversation_not_found",
                           "param": "X-Conversation-ID"}}
    st, h, b2 = await chat(g, [{"role": "user", "content": "x"}], "conv_doesnotexist0000000000", key=keys["alice"])
    assert st == 404 and b2 == b                                # unknown and foreign ids look the same
    client = sdk(g, keys["bob"])
    with pytest.raises(NotFoundError):
        await client.chat.completions.create(model="demo-chat", messages=[{"role": "user", "content": "hi"}],
                                             extra_headers={"X-Conversation-ID": cid})
    await client.close()
    assert len(await stored(g, cid)) == before
    base = g.url + "/gateway/conversations"
    async with aiohttp.ClientSession() as s:
        bob = {"Authorization": f"Bearer {keys['bob']}"}
        alice = {"Authorization": f"Bearer {keys['alice']}"}
        async with s.get(base, headers=bob) as r:
            assert r.status == 200 and (await r.json())["data"] == []
        for method in ("GET", "DELETE"):
            async with s.request(method, f"{base}/{cid}", headers=bob) as r:
                assert r.status == 404 and (await r.json())["error"]["code"] == "conversation_not_found"
        async with s.get(base, headers=alice) as r:
            assert [c["id"] for c in (await r.json())["data"]] == [cid]
        async with s.get(f"{base}/{cid}", headers=alice) as r:
            body = await r.json()
            assert body["owner"] == "alice" and body["messages"][0]["content"] == "alice's secret"
            assert body["messages"][0]["key_id"] and body["key_id"] == body["messages"][0]["key_id"]
        async with s.get(base) as r:  # no key: key_auth refuses before the API is reached
            assert r.status == 401


async def test_another_owners_fresh_id_takes_as_long_as_one_nobody_made(make_gateway: Any, db: dict[str, Any],
                                                                           monkeypatch: Any) -> None:
    """An id made moments ago that no instance has stored yet is waited for (another instance's
    write may be late). Another owner's fresh id waits as long: answered sooner, the time taken
    would tell that it exists."""
    import time

    import gateway.plugins.conversations as conv_mod
    monkeypatch.setattr(conv_mod, "LATE_WRITE_WAIT", 1.5)
    g = await start(make_gateway, db, key_auth=True)
    keys = {}
    async with aiohttp.ClientSession() as s:
        for owner in ("alice", "bob"):
            async with s.post(g.admin_url + "/keys", json={"owner": owner}, headers=ADMIN) as r:
                keys[owner] = (await r.json())["key"]
    st, h, _ = await chat(g, [{"role": "user", "content": "alice's"}], key=keys["alice"])
    cid = h["X-Conversation-ID"]
    made_up = cid[:11] + ("A" if cid[11] != "A" else "B") + cid[12:]  # the same second, nobody's
    took = {}
    for name, c in (("foreign", cid), ("unknown", made_up)):
        t0 = time.monotonic()
        st, _, b = await chat(g, [{"role": "user", "content": "x"}], c, key=keys["bob"])
        took[name] = time.monotonic() - t0
        assert st == 404 and b["error"]["code"] == "conversation_not_found"
    assert took["foreign"] >= 1.4 and took["unknown"] >= 1.4, took  # (both waited the whole LATE_WRITE_WAIT)


# -- partial answers -------------------------------------------------------------------------------
async def test_client_disconnect_and_upstream_death_mid_stream(make_gateway: Any, db: dict[str, Any]) -> None:
    g = await start(make_gateway, db)
    msgs = [{"role": "user", "content": "tell me a long story"}]
    # client goes away after a few chunks
    got = ""
    async with aiohttp.ClientSession() as s:
        r = await s.post(g.url + "/v1/chat/completions", json={"model": "demo-chat", "messages": msgs, "stream": True},
                         headers={"X-Demo-Delay": "0.05", "X-Demo-Words": "60"})
        cid = r.headers["X-Conversation-ID"]
        chunks = 0
        async for line in r.content:
            if line.startswith(b"data: {"):
                d = json.loads(line[6:])
                got += d["choices"][0]["delta"].get("content") or ""
                chunks += 1
                if chunks == 6:
                    break
        r.close()
    for _ in range(100):
        await asyncio.sleep(0.05)
        rows = await stored(g, cid)
        if len(rows) == 2:
            break
    rows = await stored(g, cid)
    assert len(rows) == 2 and rows[1].status == "client_disconnected"
    text = json.loads(rows[1].content)
    full_len = 60
    assert text.startswith(got) and len(text.split()) < full_len
    assert rows[1].tokens_derived and rows[1].tokens >= 5
    t = (await turns(g, cid))[0]
    assert t.status == "client_disconnected"
    # no usage report came: the turn's output tokens are the deltas delivered and its prompt tokens
    # the gateway's estimate, characters / 4 (as the audit event, key usage and metrics count
    # them), and so are the conversation's totals; the user message's own count stays unknown
    estimate = (len(msgs[0]["content"]) + 3) // 4
    assert (t.prompt_tokens, t.completion_tokens, t.usage) == (estimate, rows[1].tokens, None)
    conv = await conv_row(g, cid)
    assert (conv.prompt_tokens, conv.completion_tokens) == (estimate, rows[1].tokens)
    assert rows[0].tokens is None

    # the upstream dies after 5 chunks: the client got exactly those, and so does the store
    got, errors = "", []
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions",
                          json={"model": "demo-chat", "messages": msgs, "stream": True},
                          headers={"X-Demo-Die-After": "5", "X-Demo-Words": "20"}) as r:
            cid2 = r.headers["X-Conversation-ID"]
            try:
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        d = json.loads(line[6:])
                        if "error" in d:  # the gateway's event saying why the stream stops
                            errors.append(d["error"]["code"])
                        else:
                            got += d["choices"][0]["delta"].get("content") or ""
            except aiohttp.ClientPayloadError:
                pass
    rows = await stored(g, cid2)
    assert errors == ["upstream_disconnected"]
    assert len(rows) == 2 and json.loads(rows[1].content) == got and len(got.split()) == 5
    assert rows[1].status == "upstream_disconnected" and rows[1].finish_reason is None


# -- concurrency -------------------------------------------------------------------------------------
async def test_50_concurrent_conversations(make_gateway: Any, db: dict[str, Any]) -> None:
    g = await start(make_gateway, db, {"batch_size": 64})
    client = sdk(g)

    async def one(i: int) -> tuple[str, list[dict[str, Any]]]:
        msgs: list[dict[str, Any]] = [{"role": "user", "content": f"conversation {i} turn 0"}]
        cid = None
        for t in range(3):
            if t:
                msgs.append({"role": "user", "content": f"conversation {i} turn {t}"})
            raw = await client.chat.completions.with_raw_response.create(
                model="demo-chat", messages=msgs, extra_headers={"X-Conversation-ID": cid} if cid else None)
            cid = raw.headers["X-Conversation-ID"]
            msgs.append(raw.parse().choices[0].message.model_dump(exclude_none=True))
        assert cid
        return cid, msgs

    results = await asyncio.gather(*(one(i) for i in range(50)))
    await client.close()
    assert len({cid for cid, _ in results}) == 50
    await g.plugin("conversations").flush()
    async with g.gw.db.engine.connect() as conn:
        all_rows = (await conn.execute(select(M).order_by(M.c.conversation_id, M.c.position))).all()
    by: dict[str, list[Any]] = {}
    for r in all_rows:
        by.setdefault(r.conversation_id, []).append(r)
    assert len(all_rows) == 50 * 6
    for cid, msgs in results:
        rows = by[cid]
        assert [r.position for r in rows] == list(range(6))
        assert all(same(row_message(r), m) for r, m in zip(rows, msgs))


def test_canonical_form_and_generated_ids() -> None:
    """The direct path for plain text messages writes exactly what the generic encoder writes;
    generated ids have the documented shape, are unique and sort by creation second."""
    import json
    import time

    from gateway.plugins.conversations import canonical, new_id

    enc = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode
    for m in ({"role": "user", "content": "hello"}, {"content": 'é "q" \\ \n \u2028 \x00 😀', "role": "user"},
              {"role": "user", "content": ""}, {"role": "user", "content": None}, {"role": "tool", "name": "x"},
              {"role": "user", "content": [{"type": "text", "text": "a"}]}):
        slow = {k: v for k, v in m.items() if v is not None and v != [] and v != {} and not (k == "content" and v == "")}
        assert canonical(m) == enc(slow)
    ids = [new_id() for _ in range(2000)]
    assert len(set(ids)) == 2000 and all(i.startswith("conv_") and len(i) == 27 and i[5:].isalnum() for i in ids)
    first = new_id()
    time.sleep(1.01)
    assert new_id()[:11] > first[:11]


async def test_hostile_unicode_is_stored_and_read_back(make_gateway: Any, db: dict[str, Any]) -> None:
    """Lone surrogates are valid JSON escapes but not UTF-8: such a message is stored (escaped) and
    read back as sent, and the conversation continues by prefix match like any other."""
    g = await start(make_gateway, db)
    body = (b'{"model": "demo-chat\\ud800", "messages": [{"role": "user\\udfff", "name": "n\\ud801", '
            b'"content": "hi \\ud83d there"}]}')
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions", data=body,
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200
            cid = r.headers["X-Conversation-ID"]
            answer = (await r.json())["choices"][0]["message"]
    rows = await stored(g, cid)
    assert len(rows) == 2
    assert row_message(rows[0])["content"] == "hi \ud83d there"  # the exact text, escape and all
    assert rows[0].role == "user?" and rows[0].name == "n?"    # plain columns: replaced, never lost
    sent = {"role": "user\udfff", "name": "n\ud801", "content": "hi \ud83d there"}
    status, headers, _ = await chat(g, [sent, answer, {"role": "user", "content": "more"}], cid)
    assert status == 200 and headers["X-Conversation-ID"] == cid  # same history: appended, not forked
    assert len(await stored(g, cid)) == 4


async def test_a_stale_instance_regenerating_an_answer_forks_instead_of_interleaving(
        make_gateway: Any, db: dict[str, Any]) -> None:
    """Two instances on one database. A knows turn 1 of a conversation; B stores turn 2; then A,
    within its cache time, is asked to answer turn 2's question again, and (before A's writer ran)
    the question after A's answer. The stored conversation keeps B's history, alternating; A's
    answer and the turn after it go to a fork at the first difference, complete on its own."""
    a = await start(make_gateway, db, {"flush_interval": 1.0})
    b = await make_gateway([{"name": "conversations"}], database=db, name="b.yaml")
    u1, u2 = {"role": "user", "content": "r one"}, {"role": "user", "content": "r two"}
    st, h, body = await chat(a, [u1])
    cid, a1 = h["X-Conversation-ID"], body["choices"][0]["message"]
    await a.plugin("conversations").flush()
    st, h, body = await chat(b, [u1, a1, u2], cid)
    assert st == 200 and h["X-Conversation-ID"] == cid
    a2_b = body["choices"][0]["message"]
    await b.plugin("conversations").flush()
    st, h, body = await chat(a, [u1, a1, u2], cid, headers={"X-Demo-Words": "3"})  # another answer
    assert st == 200
    a2_a = body["choices"][0]["message"]
    assert a2_a["content"] != a2_b["content"]
    u3 = {"role": "user", "content": "r three"}
    st, h, body = await chat(a, [u1, a1, u2, a2_a, u3], cid)  # queued with the turn before it
    assert st == 200
    a3 = body["choices"][0]["message"]
    rows = await stored(a, cid)
    assert [(r.role, row_message(r)["content"]) for r in rows] == [
        ("user", "r one"), ("assistant", a1["content"]), ("user", "r two"), ("assistant", a2_b["content"])]
    async with a.gw.db.engine.connect() as conn:
        forks = (await conn.execute(select(C.c.id, C.c.fork_position, C.c.message_count).where(
            C.c.parent_id == cid))).all()
    assert len(forks) == 1 and forks[0].fork_position == 3 and forks[0].message_count == 6
    fork = await stored(a, forks[0].id)
    assert [row_message(r)["content"] for r in fork] == [
        "r one", a1["content"], "r two", a2_a["content"], "r three", a3["content"]]
    assert [r.position for r in fork] == [0, 1, 2, 3, 4, 5]


async def test_parallel_turns_on_a_conversation_not_yet_written_fork_instead_of_interleaving(
        make_gateway: Any, db: dict[str, Any]) -> None:
    """A first turn, then at once several turns resending its history, each with its own question,
    all written in one batch with the first: one of them continues the conversation, each other
    one becomes a fork at the point they differ. No stored history claims a question was asked
    after an answer it never saw."""
    g = await start(make_gateway, db, {"flush_interval": 2.0})
    u1 = {"role": "user", "content": "first"}
    st, h, body = await chat(g, [u1])
    cid, a1 = h["X-Conversation-ID"], body["choices"][0]["message"]
    results = await asyncio.gather(*[chat(g, [u1, a1, {"role": "user", "content": f"follow-up {i}"}], cid)
                                     for i in range(6)])
    assert all(st == 200 for st, _, _ in results)
    rows = await stored(g, cid)
    assert len(rows) == 4 and row_message(rows[2])["content"].startswith("follow-up")
    async with g.gw.db.engine.connect() as conn:
        forks = (await conn.execute(select(C.c.id, C.c.fork_position, C.c.message_count).where(
            C.c.parent_id == cid))).all()
    assert len(forks) == 5 and {(f.fork_position, f.message_count) for f in forks} == {(2, 4)}
    asked = {row_message(rows[2])["content"]}
    for f in forks:
        frows = await stored(g, f.id)
        assert [row_message(r)["content"] for r in frows[:2]] == ["first", a1["content"]]
        asked.add(row_message(frows[2])["content"])
    assert asked == {f"follow-up {i}" for i in range(6)}


async def test_caller_api_on_another_instance_finds_a_conversation_just_made(
        make_gateway: Any, db: dict[str, Any]) -> None:
    """Readable as soon as its response was received, also through another instance (whose
    writer had not written it yet when the read came in)."""
    a = await start(make_gateway, db, {"flush_interval": 0.05})
    b = await make_gateway([{"name": "conversations"}], database=db, name="b.yaml")
    st, h, _ = await chat(a, [{"role": "user", "content": "made on a"}])
    cid = h["X-Conversation-ID"]
    async with aiohttp.ClientSession() as s:
        async with s.get(b.url + f"/gateway/conversations/{cid}") as r:
            assert r.status == 200, await r.text()
            assert [m["role"] for m in (await r.json())["messages"]] == ["user", "assistant"]


async def test_a_fork_whose_parent_is_deleted_before_it_is_written_is_not_made(make_gateway: Any,
                                                                              db: dict[str, Any]) -> None:
    """A fork copies the messages it shares with its parent when it is written. If the parent is
    deleted (an erasure) while the forking request still runs, the fork is not made: it would lack
    its first messages, and bring back what was erased. Skipped and counted."""
    g = await start(make_gateway, db)
    cid, m = await two_turns(g, "one", "two")
    await g.plugin("conversations").flush()
    edited = m[:2] + [{"role": "user", "content": "two, edited"}]  # a fork at position 2
    async def slow_fork() -> tuple[int, dict[str, str]]:  # a stream: recorded when it ends, ~1 s
        async with aiohttp.ClientSession() as s:
            async with s.post(g.url + "/v1/chat/completions", json={"model": "demo-chat", "messages": edited,
                                                                     "stream": True},
                              headers={"X-Conversation-ID": cid, "X-Demo-Delay": "0.2", "X-Demo-Words": "5"}) as r:
                await r.read()
                return r.status, dict(r.headers)

    fork = asyncio.create_task(slow_fork())
    await asyncio.sleep(0.3)
    async with aiohttp.ClientSession() as s:
        async with s.delete(g.url + f"/gateway/conversations/{cid}") as r:
            assert r.status in (200, 204)
    st, h = await fork
    assert st == 200 and h["X-Conversation-Parent-ID"] == cid
    child = h["X-Conversation-ID"]
    await g.plugin("conversations").flush()
    assert await stored(g, child) == [] and await conv_row(g, child) is None
