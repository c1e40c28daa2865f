"""conversations, memory mode, against a strict backend: what the upstream receives after retries,
trimming, system prompts that change, reasoning models and vLLM-shaped answers.

The backend is the test's own (on loopback): it refuses what OpenAI and strict chat templates
(vLLM with Mistral or Llama templates) refuse: a tool result that does not answer the assistant
tool calls right before it, tool calls without their results, an empty ``tool_calls`` list, and a
conversation whose first message after the system/developer messages is not a user message. It
records every request; the tests assert what it received and what the gateway stored."""
from __future__ import annotations

import json
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import aiohttp
from aiohttp import web
from openai import AsyncOpenAI
from sqlalchemy import select

from gateway.plugins.conversations.store import M, row_message

from . import test_conversations
from .helpers import free_port

db = test_conversations.db  # the fixture: a SQLite file and a PostgreSQL database (for the database reads)


def problem(msgs: Any, user_first: bool = True) -> str | None:
    """Why a strict backend refuses these messages (None: accepted). ``user_first``: as strict chat
    templates (OpenAI itself takes an assistant message first)."""
    if not isinstance(msgs, list) or not msgs:
        return "messages must be a non-empty array"
    i = 0
    while i < len(msgs) and msgs[i].get("role") in ("system", "developer"):
        i += 1
    if user_first and (i == len(msgs) or msgs[i].get("role") != "user"):
        return f"after the system messages the conversation must start with a user message (messages[{i}])"
    pending: set[str] = set()
    for j, m in enumerate(msgs):
        role = m.get("role")
        if user_first and role == "user" and j and msgs[j - 1].get("role") == "user":
            return f"messages[{j}]: roles must alternate (two user messages in a row)"
        if role == "tool":
            if m.get("tool_call_id") not in pending:
                return f"messages[{j}]: a tool message must answer a tool call of the assistant message before it"
            pending.discard(m["tool_call_id"])
            continue
        if pending:
            return f"messages[{j - 1}]: tool calls without results: {sorted(pending)}"
        if role == "system" and j >= i:
            return f"messages[{j}]: a system message after the conversation started"
        if role == "assistant":
            if "tool_calls" in m:
                tcs = m["tool_calls"]
                if not isinstance(tcs, list) or not tcs:
                    return f"messages[{j}].tool_calls must be a non-empty array"
                pending = {tc["id"] for tc in tcs}
            for k in ("annotations", "refusal", "function_call"):
                if k in m:
                    return f"messages[{j}].{k}: unknown field in a request"
            if not m.get("content") and not m.get("tool_calls"):
                return f"messages[{j}]: an assistant message needs content or tool calls"
    if pending:
        return f"tool calls without results: {sorted(pending)}"
    return None


def count_tokens(msgs: list[dict[str, Any]]) -> int:
    """Prompt tokens as OpenAI counts them, roughly: text / 4, 3 per message, 3 to prime the reply."""
    n = 3
    for m in msgs:
        c = m.get("content")
        text = c if isinstance(c, str) else json.dumps(c) if c is not None else ""
        n += 3 + len(text + json.dumps(m.get("tool_calls") or "")) // 4
    return n


class Strict:
    """The backend. Its answer depends on the model asked for:

    * ``text``: ``answer <n>``; ``tools``: three tool calls when the last message is a user's, else text;
      ``compact``: the same, their arguments written compactly with non-ASCII as is (as OpenAI does);
      ``golang``: the same, with ``<``, ``>`` and ``&`` escaped as well (as Go's encoding/json does);
    * ``same``: always ``Yes.``; ``samecut``: a stream of all of ``Yes.`` that dies before its end;
    * ``drop``: a stream that dies after some text; ``drop0``: one that dies before any;
    * ``reason``: an answer whose completion_tokens are mostly hidden reasoning (1000 of 1005);
    * ``vllm``: an answer shaped as vLLM and newer OpenAI models send it (``"tool_calls": []``,
      ``"annotations": []``, ``"refusal": null``, ``"function_call": null``)."""

    def __init__(self, user_first: bool = True) -> None:
        self.seen: list[dict[str, Any]] = []   # every request body
        self.refused: list[str] = []
        self.user_first = user_first

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append(body)
        msgs = body.get("messages")
        why = problem(msgs, self.user_first)
        if why:
            self.refused.append(why)
            return web.json_response({"error": {"message": why, "type": "invalid_request_error", "param": "messages",
                                                "code": None}}, status=400)
        model = body.get("model")
        n = len(self.seen)
        text = "Yes." if model in ("same", "samecut") else f"answer {n}"
        calls = None
        if model in ("tools", "compact", "golang") and msgs[-1]["role"] == "user":
            # (compact: arguments written as OpenAI writes them, no blanks, non-ASCII as is;
            # golang: as Go's encoding/json writes them, <, > and & escaped too)
            calls = [{"id": f"call_{n}_{j}", "type": "function",
                      "function": {"name": "weather", "arguments": json.dumps({"city": f"c{j}"}) if model == "tools"
                                   else json.dumps({"city": f"Zürich {j}", "days": j, "units": {"t": "C"},
                                                    **({"if": "t < 5 & wind > 3"} if model == "golang" else {})},
                                                   separators=(",", ":"), ensure_ascii=False).replace(
                                       "<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")}}
                     for j in range(3)]
        prompt = count_tokens(msgs)
        completion = 3
        usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                                 "total_tokens": prompt + completion}
        if model == "reason":
            usage = {"prompt_tokens": prompt, "completion_tokens": 1005, "total_tokens": prompt + 1005,
                     "completion_tokens_details": {"reasoning_tokens": 1000}}
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)

            async def event(delta: dict[str, Any], finish: str | None = None) -> None:
                chunk = {"id": f"c{n}", "object": "chat.completion.chunk", "model": model,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

            await event({"role": "assistant", "content": ""})
            if model == "drop0":
                request.transport.close()
                return resp
            if calls:
                await event({"tool_calls": [{"index": j, **tc} for j, tc in enumerate(calls)]})
            elif model == "samecut":  # the whole (short) answer, then the stream dies before its end
                await event({"content": text})
                request.transport.close()
                return resp
            else:
                for piece in ("partial ", "answer ", f"{n}") if model != "same" else (text,):
                    await event({"content": piece})
                    if model == "drop":
                        request.transport.close()
                        return resp
            await event({}, "tool_calls" if calls else "stop")
            await resp.write(b"data: " + json.dumps({"id": f"c{n}", "choices": [], "usage": usage}).encode()
                             + b"\n\n" + b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        msg: dict[str, Any] = {"role": "assistant", "content": None if calls else text}
        if calls:
            msg["tool_calls"] = calls
        if model == "vllm":
            msg = {"role": "assistant", "content": text, "tool_calls": [], "annotations": [], "refusal": None,
                   "function_call": None}
        return web.json_response({"id": f"c{n}", "object": "chat.completion", "model": model, "usage": usage,
                                  "choices": [{"index": 0, "message": msg,
                                               "finish_reason": "tool_calls" if calls else "stop"}]})


@asynccontextmanager
async def strict_gateway(make_gateway: Any, memory: dict[str, Any] | None = None, user_first: bool = True,
                         database: dict[str, Any] | None = None, **conv: Any) -> AsyncIterator[tuple[Any, Strict]]:
    """A gateway with memory on (``memory``: more of its settings) in front of a Strict backend."""
    up = Strict(user_first)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", up.chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        g = await make_gateway([{"name": "conversations", "config": {
            "memory": {"enabled": True, **(memory or {})}, **conv}}], upstream={"url": f"http://127.0.0.1:{port}"},
            **({"database": database} if database else {}))
        yield g, up
    finally:
        await runner.cleanup()


async def chat(g: Any, messages: list[dict[str, Any]], cid: str | None = None, model: str = "text",
               **body: Any) -> tuple[int, str | None, Any]:
    """One request through aiohttp: status, the conversation id, the answer message (the error
    body for an error; None for a stream)."""
    h = {"X-Conversation-ID": cid} if cid else {}
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions", json={"model": model, "messages": messages, **body},
                          headers=h, timeout=aiohttp.ClientTimeout(total=20)) as r:
            if body.get("stream"):
                try:
                    await r.read()
                except aiohttp.ClientError:
                    pass  # (a stream the upstream dropped)
                return r.status, r.headers.get("X-Conversation-ID"), None
            got = await r.json()
            if r.status != 200:
                return r.status, r.headers.get("X-Conversation-ID"), got
            return r.status, r.headers.get("X-Conversation-ID"), got["choices"][0]["message"]


async def stored(g: Any, cid: str) -> list[tuple[dict[str, Any], Any]]:
    """The stored messages, each with its row."""
    await g.plugin("conversations").flush()
    async with g.gw.db.engine.connect() as conn:
        rows = (await conn.execute(select(M).where(M.c.conversation_id == cid).order_by(M.c.position))).all()
    return [(row_message(r), r) for r in rows]


def roles(msgs: list[dict[str, Any]]) -> list[str]:
    out = []
    for m in msgs:
        c = m.get("content")
        r = m["role"]
        if m.get("tool_calls"):
            r += "(calls)"
        elif r == "tool":
            r += ":" + m["tool_call_id"]
        elif isinstance(c, str):
            r += ":" + c
        out.append(r)
    return out


def systems(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in msgs if m["role"] == "system"]


SYS = {"role": "system", "content": "Be brief."}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


# -- 1, 5: a retry after an interrupted turn ------------------------------------------------------------
async def test_tool_results_resent_after_an_interrupted_answer_are_sent_and_stored_once(make_gateway: Any) -> None:
    """The upstream drops mid-answer to a turn of tool results; the client (the SDK) gets an error
    and sends the same tool results again. They are not stored again and not sent twice, the cut
    answer is not replayed (the client was told of an error), and the tool call they answer is
    found beyond the max_messages window."""
    async with strict_gateway(make_gateway, {"max_messages": 6}) as (g, up):
        st, cid, call = await chat(g, [SYS, user("weather in three cities?")], model="tools")
        assert st == 200 and len(call["tool_calls"]) == 3
        results = [{"role": "tool", "tool_call_id": tc["id"], "content": f"sunny {j}"}
                   for j, tc in enumerate(call["tool_calls"])]
        await chat(g, results, cid, model="drop", stream=True)    # the client sees an error ...
        await chat(g, results, cid, model="drop0", stream=True)   # ... and again on its retry
        client = AsyncOpenAI(base_url=g.url + "/v1", api_key="unused", max_retries=0)
        r = await client.chat.completions.create(model="text", messages=results,
                                                 extra_headers={"X-Conversation-ID": cid})
        await client.close()
        assert r.choices[0].message.content == "answer 4" and up.refused == []
        want = ["system:Be brief.", "user:weather in three cities?", "assistant(calls)"] + \
            [f"tool:{tc['id']}" for tc in call["tool_calls"]]
        assert [roles(b["messages"]) for b in up.seen[1:]] == [want] * 3
        rows = await stored(g, cid)
        assert [(m["role"], r.status) for m, r in rows] == [
            ("system", None), ("user", None), ("assistant", "complete"), ("tool", None), ("tool", None),
            ("tool", None), ("assistant", "upstream_disconnected"), ("assistant", "complete")]
        # the next turn: max_messages (6) has no room for the whole tool exchange and its question,
        # and a history never starts inside one: it goes whole
        st, _, _ = await chat(g, [user("thanks")], cid)
        assert st == 200 and up.refused == []
        assert roles(up.seen[-1]["messages"]) == ["system:Be brief.", "user:thanks"]


async def test_resent_tool_results_get_their_call_from_beyond_max_messages(make_gateway: Any) -> None:
    """max_messages: 3 and three tool results resent after an interrupted answer: the stored
    results and the cut answer fill the window, and the call they answer is before it. It is sent
    (before the results, once), and the results are not stored again. (No room for the question:
    the history starts with the call, which OpenAI takes.)"""
    async with strict_gateway(make_gateway, {"max_messages": 3}, user_first=False) as (g, up):
        st, cid, call = await chat(g, [SYS, user("weather?")], model="tools")
        results = [{"role": "tool", "tool_call_id": tc["id"], "content": "sunny"} for tc in call["tool_calls"]]
        await chat(g, results, cid, model="drop", stream=True)
        st, _, _ = await chat(g, results, cid)
        assert st == 200 and up.refused == []
        assert roles(up.seen[-1]["messages"]) == ["system:Be brief.", "assistant(calls)"] + \
            [f"tool:{tc['id']}" for tc in call["tool_calls"]]
        rows = await stored(g, cid)
        assert [m["role"] for m, _ in rows] == ["system", "user", "assistant"] + ["tool"] * 3 + ["assistant"] * 2


async def test_a_question_retried_after_a_failed_turn_is_sent_and_stored_once(make_gateway: Any,
                                                                             db: dict[str, Any]) -> None:
    """A turn that died before any text, then one cut mid-answer: each time the client sends its
    question again; the upstream gets it once, after the last complete answer, and it is stored once."""
    async with strict_gateway(make_gateway, {"max_messages": 3}, database=db) as (g, up):
        st, cid, a1 = await chat(g, [user("q1")])
        await chat(g, [user("q2")], cid, model="drop0", stream=True)   # no text: no answer stored
        st, _, a2 = await chat(g, [user("q2")], cid)
        assert st == 200
        await chat(g, [user("q3")], cid, model="drop", stream=True)    # a partial answer stored
        await g.plugin("conversations").flush()
        g.plugin("conversations").shared.forget(cid)  # (the retry reads the conversation from the database)
        st, _, a3 = await chat(g, [user("q3")], cid)
        assert st == 200 and up.refused == []
        assert roles(up.seen[2]["messages"]) == ["user:q1", "assistant:" + a1["content"], "user:q2"]
        assert roles(up.seen[4]["messages"]) == ["user:q2", "assistant:" + a2["content"], "user:q3"]
        rows = await stored(g, cid)
        assert [(m["role"], m["content"], r.status) for m, r in rows] == [
            ("user", "q1", None), ("assistant", a1["content"], "complete"), ("user", "q2", None),
            ("assistant", a2["content"], "complete"), ("user", "q3", None),
            ("assistant", "partial ", "upstream_disconnected"), ("assistant", a3["content"], "complete")]


async def test_a_cut_answer_followed_by_a_new_question_is_replayed(make_gateway: Any) -> None:
    """After a turn cut mid-answer the client asks something else (not a retry): the partial
    answer it was shown stays between the two questions (user and assistant still alternate)."""
    async with strict_gateway(make_gateway) as (g, up):
        st, cid, a1 = await chat(g, [user("q1")])
        await chat(g, [user("q2")], cid, model="drop", stream=True)
        st, _, a3 = await chat(g, [user("something else")], cid)
        assert st == 200 and up.refused == []
        assert roles(up.seen[-1]["messages"]) == ["user:q1", "assistant:answer 1", "user:q2", "assistant:partial ",
                                                  "user:something else"]


# -- 2: trimming starts the history with a user message ----------------------------------------------------
async def test_trimmed_history_starts_with_a_user_message(make_gateway: Any) -> None:
    """max_messages leaves room for an odd number of old messages: the history sent starts with a
    user message, never an answer or a tool result; new tool results get their call and, room
    allowing, the question that asked for it."""
    async with strict_gateway(make_gateway, {"max_messages": 7}) as (g, up):
        st, cid, a1 = await chat(g, [SYS, user("u1")])
        for q in ("u2", "u3", "u4"):
            st, _, _ = await chat(g, [user(q)], cid)
            assert st == 200, up.refused
        assert roles(up.seen[-1]["messages"]) == ["system:Be brief.", "user:u2", "assistant:answer 2", "user:u3",
                                                  "assistant:answer 3", "user:u4"]
        # a tool call and its results: the user's question comes with them (room for it), not the answer before
        st, _, call = await chat(g, [user("weather?")], cid, model="tools")
        results = [{"role": "tool", "tool_call_id": tc["id"], "content": "sunny"} for tc in call["tool_calls"]]
        st, _, _ = await chat(g, results, cid)
        assert st == 200 and up.refused == []
        assert roles(up.seen[-1]["messages"])[:3] == ["system:Be brief.", "user:weather?", "assistant(calls)"]


async def test_tool_results_far_back_get_their_question_when_room_allows(make_gateway: Any) -> None:
    """A cut inside an earlier tool exchange drops that exchange whole (its call and results) up to
    the next user message."""
    async with strict_gateway(make_gateway, {"max_messages": 9}) as (g, up):
        st, cid, call = await chat(g, [SYS, user("first?")], model="tools")
        results = [{"role": "tool", "tool_call_id": tc["id"], "content": "r"} for tc in call["tool_calls"]]
        st, _, _ = await chat(g, results, cid)
        st, _, call2 = await chat(g, [user("second?")], cid, model="tools")
        results2 = [{"role": "tool", "tool_call_id": tc["id"], "content": "r2"} for tc in call2["tool_calls"]]
        st, _, _ = await chat(g, results2, cid)
        assert st == 200 and up.refused == [], up.refused
        assert roles(up.seen[-1]["messages"])[:3] == ["system:Be brief.", "user:second?", "assistant(calls)"]


# -- 3: a leading run of system and developer messages -----------------------------------------------------
async def test_a_leading_system_and_developer_run_is_pinned(make_gateway: Any) -> None:
    async with strict_gateway(make_gateway, {"max_messages": 5}) as (g, up):
        dev = {"role": "developer", "content": "Answer in French."}
        st, cid, _ = await chat(g, [SYS, dev, user("u1")])
        for q in ("u2", "u3", "u4"):
            st, _, _ = await chat(g, [SYS, dev, user(q)], cid)   # the client resends its prompt
            assert st == 200
            assert roles(up.seen[-1]["messages"])[:2] == ["system:Be brief.", "developer:Answer in French."]
        assert roles(up.seen[-1]["messages"]) == ["system:Be brief.", "developer:Answer in French.", "user:u3",
                                                  "assistant:answer 3", "user:u4"]
        st, _, _ = await chat(g, [user("u5")], cid)   # or not
        assert roles(up.seen[-1]["messages"])[:3] == ["system:Be brief.", "developer:Answer in French.", "user:u4"]
        rows = await stored(g, cid)
        assert [m["role"] for m, _ in rows] == ["system", "developer"] + ["user", "assistant"] * 5


async def test_the_pinned_prompt_comes_from_the_cache(make_gateway: Any, monkeypatch: Any) -> None:
    """A system + developer run, or a prompt changed mid-conversation, far behind the cached
    messages: memory pins it from the cache; it was read from the database on every turn (after
    waiting for the previous turn's write)."""
    from gateway.plugins.conversations.store import ConversationStore

    reads: list[int] = []
    load = ConversationStore.load_messages

    async def counted(self: Any, *a: Any, **kw: Any) -> Any:
        reads.append(1)
        return await load(self, *a, **kw)

    monkeypatch.setattr(ConversationStore, "load_messages", counted)
    async with strict_gateway(make_gateway, {"max_messages": 4}, cache_messages=8) as (g, up):
        dev = {"role": "developer", "content": "Answer in French."}
        st, cid, _ = await chat(g, [SYS, dev, user("u1")])
        for i in range(2, 10):
            prompt = [SYS, dev] if i < 6 else [{"role": "system", "content": "Changed."}]
            st, _, _ = await chat(g, [*prompt, user(f"u{i}")], cid)
            assert st == 200 and up.seen[-1]["messages"][:len(prompt)] == prompt
        assert up.refused == [] and reads == []


# -- 4: a system prompt that changes ---------------------------------------------------------------------
async def test_a_changed_system_prompt_replaces_the_old_one_and_is_stored_once(make_gateway: Any,
                                                                               db: dict[str, Any]) -> None:
    async with strict_gateway(make_gateway, database=db) as (g, up):
        def day(n: int) -> dict[str, str]:
            return {"role": "system", "content": f"You are helpful. Date: day {n}"}

        st, cid, a1 = await chat(g, [day(1), user("u1")])
        st, _, a2 = await chat(g, [day(2), user("u2")], cid)
        assert roles(up.seen[-1]["messages"]) == [
            "system:You are helpful. Date: day 2", "user:u1", "assistant:answer 1", "user:u2"]
        st, _, a3 = await chat(g, [day(2), user("u3")], cid)   # the same new prompt again: resent
        assert roles(up.seen[-1]["messages"]) == [
            "system:You are helpful. Date: day 2", "user:u1", "assistant:answer 1", "user:u2", "assistant:answer 2",
            "user:u3"]
        st, _, a4 = await chat(g, [user("u4")], cid)           # none: the current one
        assert systems(up.seen[-1]["messages"]) == [day(2)]
        st, _, a5 = await chat(g, [day(3), user("u5")], cid)
        assert systems(up.seen[-1]["messages"]) == [day(3)] and up.seen[-1]["messages"][0] == day(3)
        assert up.refused == []
        rows = await stored(g, cid)
        assert [(m["role"], m["content"]) for m, _ in rows] == [
            ("system", day(1)["content"]), ("user", "u1"), ("assistant", "answer 1"),
            ("system", day(2)["content"]), ("user", "u2"), ("assistant", "answer 2"),
            ("user", "u3"), ("assistant", "answer 3"), ("user", "u4"), ("assistant", "answer 4"),
            ("system", day(3)["content"]), ("user", "u5"), ("assistant", "answer 5")]
        # read from the database (not the cache), the current prompt is still the newest one
        g.plugin("conversations").shared.forget(cid)
        st, _, _ = await chat(g, [user("u6")], cid)
        assert systems(up.seen[-1]["messages"]) == [day(3)] and up.seen[-1]["messages"][0] == day(3)


# -- 6: max_tokens counts ------------------------------------------------------------------------------
async def test_hidden_reasoning_does_not_count_against_max_tokens(make_gateway: Any, db: dict[str, Any]) -> None:
    """A reasoning model's answer costs 1005 completion tokens, 1000 of them hidden reasoning that
    is never sent back: the history still fits max_tokens: 200 (from the cache and from the
    database); the stored count stays what the upstream reported."""
    async with strict_gateway(make_gateway, {"max_tokens": 200}, database=db) as (g, up):
        st, cid, _ = await chat(g, [SYS, user("u1")], model="reason")
        st, _, _ = await chat(g, [user("u2")], cid, model="reason")
        assert roles(up.seen[-1]["messages"]) == ["system:Be brief.", "user:u1", "assistant:answer 1", "user:u2"]
        g.plugin("conversations").shared.forget(cid)
        st, _, _ = await chat(g, [user("u3")], cid, model="reason")
        assert roles(up.seen[-1]["messages"]) == ["system:Be brief.", "user:u1", "assistant:answer 1", "user:u2",
                                                  "assistant:answer 2", "user:u3"]
        rows = await stored(g, cid)
        assert [r.tokens for m, r in rows if m["role"] == "assistant"] == [1005] * 3


async def test_an_image_counts_against_max_tokens(make_gateway: Any) -> None:
    """An image part is estimated (IMAGE_TOKENS), not counted as nothing."""
    async with strict_gateway(make_gateway, {"max_tokens": 700}) as (g, up):
        st, cid, _ = await chat(g, [user("u1")])
        img = {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                           {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}
        st, _, _ = await chat(g, [img], cid)
        assert st == 200 and up.seen[-1]["messages"] == [img]  # the image alone takes most of the budget


async def test_message_framing_counts_against_max_tokens(make_gateway: Any) -> None:
    """Every message costs its framing (MESSAGE_TOKENS), not only its text: the prompt the upstream
    counts (as OpenAI does) stays within max_tokens."""
    async with strict_gateway(make_gateway, {"max_tokens": 60}) as (g, up):
        st, cid, _ = await chat(g, [user("a")])
        for i in range(12):
            st, _, _ = await chat(g, [user(f"q{i}")], cid)
            assert st == 200
            assert count_tokens(up.seen[-1]["messages"]) <= 60, roles(up.seen[-1]["messages"])
        assert len(up.seen[-1]["messages"]) > 3


# -- 7: response-only fields ---------------------------------------------------------------------------
async def test_empty_response_only_fields_are_not_replayed(make_gateway: Any) -> None:
    async with strict_gateway(make_gateway) as (g, up):
        st, cid, a1 = await chat(g, [user("u1")], model="vllm")
        assert a1["tool_calls"] == [] and a1["annotations"] == []
        st, _, _ = await chat(g, [user("u2")], cid, model="vllm")
        assert st == 200 and up.refused == []
        assert up.seen[-1]["messages"][1] == {"role": "assistant", "content": "answer 1"}
        rows = await stored(g, cid)
        assert rows[1][0] == a1  # stored as received


# -- 8: a client that keeps its own history; cut answers; nothing new ----------------------------------------
async def test_a_full_history_resent_after_a_changed_system_prompt_is_not_doubled(make_gateway: Any,
                                                                                  db: dict[str, Any]) -> None:
    """A client that sends its whole history every turn, with a date-stamped system prompt: the
    stored history has one system prompt per turn, which the client does not resend. Its history
    is still recognised: the upstream gets what the client sent (once), and each turn stores the
    new prompt, the question and the answer only (it grew quadratically: 2/6/12/20/30 messages
    sent, every turn storing the whole history again)."""
    async with strict_gateway(make_gateway, database=db) as (g, up):
        hist: list[dict[str, Any]] = []
        cid = None
        for i in range(5):
            msgs = [{"role": "system", "content": f"Today is day {i}"}] + hist + [user(f"q{i}")]
            st, cid, a = await chat(g, msgs, cid)
            assert st == 200 and up.refused == []
            assert up.seen[-1]["messages"] == msgs
            hist += [user(f"q{i}"), a]
            if i == 2:
                await g.plugin("conversations").flush()
                g.plugin("conversations").shared.forget(cid)  # (the next turn reads the database)
        rows = await stored(g, cid)
        assert [(m["role"], m["content"]) for m, _ in rows] == [
            x for i in range(5) for x in (("system", f"Today is day {i}"), ("user", f"q{i}"),
                                          ("assistant", f"answer {i + 1}"))]


async def test_a_full_history_resent_after_a_cut_answer_is_not_doubled(make_gateway: Any, db: dict[str, Any]) -> None:
    """A client that keeps its history, after an answer cut mid-stream: whether it shows the partial
    answer (a stop button) or retries the question (it was told of an error), its history is
    recognised, from the cache and from the database: nothing is stored twice and the upstream
    gets a valid conversation."""
    async with strict_gateway(make_gateway, database=db) as (g, up):
        st, cid, a1 = await chat(g, [SYS, user("u1")])
        await chat(g, [SYS, user("u1"), a1, user("u2")], cid, model="drop", stream=True)
        shown = [SYS, user("u1"), a1, user("u2"), {"role": "assistant", "content": "partial "}]
        st, _, a3 = await chat(g, shown + [user("u3")], cid)               # shows the partial answer
        assert st == 200 and up.seen[-1]["messages"] == shown + [user("u3")]
        hist = shown + [user("u3"), a3]
        await chat(g, hist + [user("u4")], cid, model="drop", stream=True)
        await g.plugin("conversations").flush()
        g.plugin("conversations").shared.forget(cid)
        st, _, a4 = await chat(g, hist + [user("u4")], cid)                # retries (the SDK raised)
        assert st == 200 and up.seen[-1]["messages"] == hist + [user("u4")]
        st, _, a5 = await chat(g, hist + [user("u4"), a4, user("u5")], cid)
        assert st == 200 and up.seen[-1]["messages"] == hist + [user("u4"), a4, user("u5")]
        assert up.refused == []
        rows = await stored(g, cid)
        assert [(m["role"], m["content"], r.status) for m, r in rows] == [
            ("system", "Be brief.", None), ("user", "u1", None), ("assistant", "answer 1", "complete"),
            ("user", "u2", None), ("assistant", "partial ", "upstream_disconnected"),
            ("user", "u3", None), ("assistant", a3["content"], "complete"),
            ("user", "u4", None), ("assistant", "partial ", "upstream_disconnected"),
            ("assistant", a4["content"], "complete"), ("user", "u5", None), ("assistant", a5["content"], "complete")]


async def test_of_two_cut_answers_to_one_question_only_the_last_is_replayed(make_gateway: Any) -> None:
    """Regenerate, stopped twice, then a new question: the history has one answer between the
    two questions (two assistant messages in a row were replayed on every later turn)."""
    async with strict_gateway(make_gateway) as (g, up):
        st, cid, a1 = await chat(g, [user("q1")])
        await chat(g, [user("q2")], cid, model="drop", stream=True)
        await chat(g, [user("q2")], cid, model="drop", stream=True)      # regenerate: cut again
        st, _, _ = await chat(g, [user("q3")], cid)
        st, _, _ = await chat(g, [user("q4")], cid)
        assert st == 200 and up.refused == []
        assert roles(up.seen[2]["messages"]) == ["user:q1", "assistant:answer 1", "user:q2"]
        assert roles(up.seen[-1]["messages"]) == ["user:q1", "assistant:answer 1", "user:q2", "assistant:partial ",
                                                  "user:q3", "assistant:answer 4", "user:q4"]
        rows = await stored(g, cid)
        assert [r.status for _, r in rows].count("upstream_disconnected") == 2


async def test_nothing_new_with_memory_on_is_refused(make_gateway: Any) -> None:
    """No messages, or only the current system prompt: 400 on messages, nothing forwarded or stored
    (an answer was stored right after the previous one, and both replayed from then on)."""
    async with strict_gateway(make_gateway) as (g, up):
        st, cid, _ = await chat(g, [SYS, user("u1")])
        for msgs in ([], [SYS], [SYS, user("u1"), {"role": "assistant", "content": "answer 1"}]):
            st, _, err = await chat(g, msgs, cid)
            assert st == 400 and err["error"]["param"] == "messages"
            assert err["error"]["type"] == "invalid_request_error"
        assert len(up.seen) == 1
        st, _, _ = await chat(g, [user("u2")], cid)
        assert st == 200 and up.refused == []
        assert roles(up.seen[-1]["messages"]) == ["system:Be brief.", "user:u1", "assistant:answer 1", "user:u2"]
        assert len(await stored(g, cid)) == 5


async def test_a_retry_that_adds_a_question_leaves_the_cut_answer_out_later(make_gateway: Any,
                                                                            db: dict[str, Any]) -> None:
    """z2 is cut mid-answer; the client retries it with one more message: later turns send what
    that turn sent (z2, z3, its answer), not the cut answer between z2 and z3, from the cache and
    from the database."""
    async with strict_gateway(make_gateway, user_first=False, database=db) as (g, up):
        st, cid, a1 = await chat(g, [user("z1")])
        await chat(g, [user("z2")], cid, model="drop", stream=True)
        st, _, a3 = await chat(g, [user("z2"), user("z3")], cid)
        want = ["user:z1", "assistant:answer 1", "user:z2", "user:z3"]
        assert st == 200 and roles(up.seen[-1]["messages"]) == want
        st, _, a4 = await chat(g, [user("z4")], cid)
        want += ["assistant:" + a3["content"], "user:z4"]
        assert roles(up.seen[-1]["messages"]) == want
        await g.plugin("conversations").flush()
        g.plugin("conversations").shared.forget(cid)
        st, _, a5 = await chat(g, [user("z5")], cid)
        assert roles(up.seen[-1]["messages"]) == want + ["assistant:" + a4["content"], "user:z5"]
        assert up.refused == []
        rows = await stored(g, cid)
        assert [(m["content"], r.status) for m, r in rows] == [
            ("z1", None), ("answer 1", "complete"), ("z2", None), ("partial ", "upstream_disconnected"),
            ("z2", None), ("z3", None), (a3["content"], "complete"), ("z4", None), (a4["content"], "complete"),
            ("z5", None), (a5["content"], "complete")]


async def test_a_trimmed_history_never_starts_with_a_function_result(make_gateway: Any, db: dict[str, Any]) -> None:
    """A legacy ``function`` result is a result, as a tool's: a cut that would leave it first moves to
    the next user message (from the cache and from the database)."""
    async with strict_gateway(make_gateway, {"max_messages": 4}, database=db) as (g, up):
        st, cid, _ = await chat(g, [user("u1")])
        st, _, _ = await chat(g, [{"role": "function", "name": "f", "content": "42"}], cid)
        st, _, _ = await chat(g, [user("u3")], cid)
        assert st == 200 and up.refused == []
        assert roles(up.seen[-1]["messages"]) == ["user:u3"]
        await g.plugin("conversations").flush()
        g.plugin("conversations").shared.forget(cid)
        st, _, _ = await chat(g, [{"role": "function", "name": "f", "content": "43"}], cid)
        assert st == 200 and up.refused == []
        assert roles(up.seen[-1]["messages"]) == ["user:u3", "assistant:answer 3", "function:43"]


async def test_tools_run_again_after_a_failed_turn_replace_their_old_results(make_gateway: Any,
                                                                             db: dict[str, Any]) -> None:
    """The answer to three tool results is cut; the client runs the tools again and gets other
    results, in another order (the same tool_call_ids): the upstream gets the call and the new
    results only, on that turn and later ones (from the cache and from the database); it got the
    old and new results for the same ids and refused every turn from then on."""
    async with strict_gateway(make_gateway, database=db) as (g, up):
        st, cid, call = await chat(g, [SYS, user("weather?")], model="tools")
        ids = [tc["id"] for tc in call["tool_calls"]]
        await chat(g, [{"role": "tool", "tool_call_id": i, "content": "sunny"} for i in ids], cid,
                   model="drop", stream=True)
        again = [{"role": "tool", "tool_call_id": i, "content": "rain"} for i in reversed(ids)]
        st, _, a = await chat(g, again, cid)
        want = ["system:Be brief.", "user:weather?", "assistant(calls)"] + [f"tool:{i}" for i in reversed(ids)]
        assert st == 200 and roles(up.seen[-1]["messages"]) == want
        assert up.seen[-1]["messages"][3:] == again
        st, _, t = await chat(g, [user("thanks")], cid)
        want += ["assistant:" + a["content"], "user:thanks"]
        assert st == 200 and roles(up.seen[-1]["messages"]) == want
        await g.plugin("conversations").flush()
        g.plugin("conversations").shared.forget(cid)
        st, _, _ = await chat(g, [user("more")], cid)
        assert st == 200 and up.refused == []
        assert roles(up.seen[-1]["messages"]) == want + ["assistant:" + t["content"], "user:more"]
        assert [m for m in up.seen[-1]["messages"] if m["role"] == "tool"] == again
        rows = await stored(g, cid)
        assert [m.get("content") for m, _ in rows if m["role"] == "tool"] == ["sunny"] * 3 + ["rain"] * 3


# -- a client keeping its own history: matched past retries, equal texts, tools run again, edits ------
def longq(text: str) -> dict[str, str]:
    return user(text + " is a rather long question text")


async def test_a_full_history_after_a_retry_that_added_a_question_is_recognised(make_gateway: Any) -> None:
    """q2 cut; the retry of q2 adds q3 (stored again: q2 twice); the next full-history turn still
    matches the stored history (the first copy of q2 was taken by the match and the second then
    missing: the whole history was stored and sent twice). (The client itself sends two
    questions in a row: a backend that wants the roles to alternate would refuse that.)"""
    async with strict_gateway(make_gateway, user_first=False) as (g, up):
        st, cid, a1 = await chat(g, [SYS, longq("q1")])
        await chat(g, [SYS, longq("q1"), a1, longq("q2")], cid, model="drop", stream=True)
        st, _, a3 = await chat(g, [SYS, longq("q1"), a1, longq("q2"), longq("q3")], cid)
        st, _, a4 = await chat(g, [SYS, longq("q1"), a1, longq("q2"), longq("q3"), a3, longq("q4")], cid)
        assert st == 200 and up.refused == []
        assert up.seen[-1]["messages"] == [SYS, longq("q1"), a1, longq("q2"), longq("q3"), a3, longq("q4")]
        assert len(await stored(g, cid)) == 10  # S q1 a1 q2 (cut) q2 q3 a3 q4 a4


async def test_a_cut_answer_with_the_text_its_retry_gave_again_does_not_break_the_match(make_gateway: Any) -> None:
    """A short answer cut after its last word, the retry answering the same words: the client's
    answer is the complete one, not the cut one with the same text."""
    async with strict_gateway(make_gateway) as (g, up):
        st, cid, a1 = await chat(g, [SYS, user("q1")], model="same")
        await chat(g, [SYS, user("q1"), a1, user("q2")], cid, model="samecut", stream=True)
        st, _, a2 = await chat(g, [SYS, user("q1"), a1, user("q2")], cid, model="same")   # the retry
        for q in ("q3", "q4"):
            hist = [SYS, user("q1"), a1, user("q2"), a2] + ([user("q3"), a2] if q == "q4" else [])
            st, _, _ = await chat(g, hist + [user(q)], cid, model="same")
            assert st == 200 and up.seen[-1]["messages"] == hist + [user(q)]
        assert up.refused == []
        assert len(await stored(g, cid)) == 10  # S q1 a1 q2 (cut) a2 q3 a3 q4 a4


async def test_a_full_history_after_tools_run_again_is_recognised(make_gateway: Any) -> None:
    """The tools' results sent, the answer cut, the tools run again (other results): the next
    full-history turn holds only the new results, and matches (the old ones, which the new ones
    replaced, may be left out): the call and its results were sent twice."""
    async with strict_gateway(make_gateway) as (g, up):
        st, cid, call = await chat(g, [SYS, user("q1")], model="tools")
        def results(tag: str) -> list[dict[str, Any]]:
            return [{"role": "tool", "tool_call_id": tc["id"], "content": f"{tag} {j}"}
                    for j, tc in enumerate(call["tool_calls"])]
        await chat(g, [SYS, user("q1"), call, *results("old")], cid, model="drop", stream=True)
        st, _, a = await chat(g, [SYS, user("q1"), call, *results("new")], cid)
        assert st == 200
        hist = [SYS, user("q1"), call, *results("new"), a]
        st, _, _ = await chat(g, hist + [user("q2")], cid)
        assert st == 200 and up.refused == []
        assert up.seen[-1]["messages"] == hist + [user("q2")]


async def test_a_full_history_client_that_edited_once_is_matched_again(make_gateway: Any) -> None:
    """With memory on an edit is taken as new messages (no fork); the client's later turns resend
    its edited history: matched from where it began again, not stored and sent again each turn
    (the conversation grew by its whole history every turn)."""
    async with strict_gateway(make_gateway) as (g, up):
        st, cid, a1 = await chat(g, [SYS, longq("q1")])
        st, _, a2 = await chat(g, [SYS, longq("q1"), a1, longq("q2")], cid)
        st, _, e1 = await chat(g, [SYS, longq("q1 edited")], cid)          # the edit: new messages
        before = len(await stored(g, cid))
        hist = [SYS, longq("q1 edited"), e1]
        sizes = []
        for q in ("e2", "e3", "e4"):
            st, _, a = await chat(g, hist + [longq(q)], cid)
            assert st == 200
            sizes.append(len(up.seen[-1]["messages"]))
            hist += [longq(q), a]
        rows = await stored(g, cid)
        assert len(rows) == before + 6                      # two messages a turn
        assert sizes[1] - sizes[0] == sizes[2] - sizes[1] == 2
        assert up.refused == []


# -- tool-call arguments written out again by the client -------------------------------------------------
def rewritten(call: dict[str, Any], **dumps: Any) -> dict[str, Any]:
    """An answer with tool calls as LangChain sends it back: the arguments parsed and written again
    with ``json.dumps`` (blanks after ``:`` and ``,``, non-ASCII escaped), the content empty."""
    return {"role": "assistant", "content": "", "tool_calls": [
        {"id": tc["id"], "type": "function", "function": {
            "name": tc["function"]["name"], "arguments": json.dumps(json.loads(tc["function"]["arguments"]), **dumps)}}
        for tc in call["tool_calls"]]}


def answers(call: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "tool", "tool_call_id": tc["id"], "content": f"sunny {j}"} for j, tc in enumerate(call["tool_calls"])]


async def test_tool_call_arguments_written_out_again_are_not_an_edit(make_gateway: Any, db: dict[str, Any]) -> None:
    """An agent loop whose client sends tool calls back with their arguments re-serialised (blanks,
    ``\\uXXXX`` escapes) while the backend wrote them compactly: the same answer, so the
    conversation goes on (it forked at every step: each step a new conversation holding the whole
    history again). A tool call whose arguments really changed is still an edit."""
    async with strict_gateway(make_gateway, {"enabled": False}, database=db) as (g, up):
        for stream in (False, True):
            msgs = [SYS, user("weather in three cities?")]
            st, cid, call = await chat(g, msgs, model="compact")
            if stream:  # (the first answer streamed: its arguments stored as the deltas came)
                st, cid, _ = await chat(g, msgs, model="compact", stream=True)
                call = (await stored(g, cid))[-1][0]
            assert st == 200 and '"city":"Zürich 0"' in call["tool_calls"][0]["function"]["arguments"]
            for step, dumps in enumerate(({}, {"ensure_ascii": False}, {"separators": (",", ":")})):
                back = rewritten(call, **dumps)
                assert back["tool_calls"] != call["tool_calls"] or dumps.get("separators")
                msgs += [back, *answers(call), user(f"and then {step}?")]
                async with aiohttp.ClientSession() as s:
                    async with s.post(g.url + "/v1/chat/completions", json={"model": "compact", "messages": msgs},
                                      headers={"X-Conversation-ID": cid}) as r:
                        assert r.status == 200, await r.text()
                        assert r.headers["X-Conversation-ID"] == cid and "X-Conversation-Parent-ID" not in r.headers
                        call = (await r.json())["choices"][0]["message"]
            rows = await stored(g, cid)
            assert [m["role"] for m, _ in rows] == ["system", "user"] + ["assistant", "tool", "tool", "tool", "user"] * 3 \
                + ["assistant"]
            assert [r.position for _, r in rows] == list(range(len(rows)))
            # the stored answers are the backend's, as it wrote them
            assert all('"city":"Zürich' in m["tool_calls"][0]["function"]["arguments"]
                       for m, _ in rows if m.get("tool_calls"))
        # a real edit: another city
        edited = rewritten(call)
        edited["tool_calls"][0]["function"]["arguments"] = json.dumps({"city": "Bern", "days": 0, "units": {"t": "C"}})
        st, fork, _ = await chat(g, msgs + [edited, *answers(call)], cid, model="compact")
        assert st == 200 and fork != cid
        assert up.refused == []


async def test_with_memory_tool_calls_written_out_again_are_a_resent_history(make_gateway: Any,
                                                                           monkeypatch: Any) -> None:
    """Memory on, a client that resends its whole history with re-serialised tool-call arguments
    (LangChain), from a backend writing them as OpenAI or as Go does: recognised as the history it
    is, so the backend gets each message once and nothing is stored twice (the question and the
    tool calls went upstream twice). Each resent answer's other forms are made once, not again on
    every later turn (an agent loop resends them all)."""
    import gateway.plugins.conversations as conversations

    made: list[str] = []
    forms = conversations._argument_forms
    monkeypatch.setattr(conversations, "_argument_forms", lambda m: made.append(m["tool_calls"][0]["id"]) or forms(m))
    monkeypatch.setattr(conversations, "_FORM_DIGESTS", {})  # (kept process-wide: another test's are there)
    async with strict_gateway(make_gateway) as (g, up):
        for model in ("compact", "golang"):
            msgs = [SYS, user("weather in three cities?")]
            st, cid, call = await chat(g, msgs, model=model)
            for step in range(4):
                msgs += [rewritten(call, ensure_ascii=False), *answers(call), user(f"and then {step}?")]
                st, _, call = await chat(g, msgs, cid, model=model)
                assert st == 200 and up.refused == []
                got = up.seen[-1]["messages"]
                assert [m["role"] for m in got] == [m["role"] for m in msgs]
                assert sum(m.get("content") == "weather in three cities?" for m in got) == 1
            rows = await stored(g, cid)
            assert len(rows) == len(msgs) + 1
        assert len(made) == len(set(made)) == 8


async def test_a_rewritten_answer_is_matched_at_its_own_position_and_stored_rows_keep_their_own_digest(
        make_gateway: Any, monkeypatch: Any) -> None:
    """The same tool call stored twice, written two ways (positions 2 and 5): the client's
    re-serialised copy of the second is matched to the second (it was taken for the first, and
    the conversation forked). A fork stores each new message under the digest of its own text.
    A message of more tool calls than are tried is compared as sent, its forms never made (100,000
    of them held the event loop for seconds)."""
    import gateway.plugins.conversations as conversations
    from gateway.plugins.conversations import digest

    async with strict_gateway(make_gateway, {"enabled": False}) as (g, up):
        def call(args: str, id_: str = "call_x") -> dict[str, Any]:
            return {"role": "assistant", "content": None, "tool_calls": [
                {"id": id_, "type": "function", "function": {"name": "weather", "arguments": args}}]}

        tool = {"role": "tool", "tool_call_id": "call_x", "content": "sunny"}
        msgs = [SYS, user("q1"), call('{"city": "Z\\u00fcrich"}'), tool, user("q2"), call('{"city":"Zürich"}'), tool,
                user("q3")]
        st, cid, a = await chat(g, msgs)
        assert st == 200
        again = msgs[:5] + [call('{"city": "Zürich"}')] + msgs[6:] + [a, user("q4")]
        st, same, _ = await chat(g, again, cid)
        assert st == 200 and same == cid
        # an edit at position 1: a fork, storing the client's texts under their own digests
        st, fork, _ = await chat(g, [SYS, user("q1 edited")] + again[2:], cid)
        assert st == 200 and fork != cid
        rows = await stored(g, fork)
        assert all(r.digest == digest(m) for m, r in rows)
        made: list[int] = []
        forms = conversations._argument_forms
        monkeypatch.setattr(conversations, "_argument_forms", lambda m: made.append(1) or forms(m))
        many = {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{j}", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
            for j in range(conversations.MAX_FORM_CALLS + 1)]}
        results = [{"role": "tool", "tool_call_id": f"c{j}", "content": "1"} for j in range(len(many["tool_calls"]))]
        st, cid2, a2 = await chat(g, [user("many"), many, *results])
        relaxed = {**many, "tool_calls": [{**tc, "function": {**tc["function"], "arguments": '{"a": 1}'}}
                                          for tc in many["tool_calls"]]}
        st, fork2, _ = await chat(g, [user("many"), relaxed, *results, a2, user("next")], cid2)
        assert st == 200 and fork2 != cid2 and made == []  # (compared as sent: an edit)
        assert up.refused == []
