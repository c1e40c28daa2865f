"""Answers of less common shapes through conversations: streamed refusals and audio are stored as the
client assembled them (and counted as output), a history resent the way the SDK gives it continues the
conversation, memory replays only what a backend accepts back (no bare assistant message, no tool call
cut off mid-stream, audio by id), and with n > 1 the stored answer (choice 0) gets its own share of
the tokens. A real gateway in front of a backend of the test's own on loopback."""
from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncIterator

import aiohttp
from aiohttp import web

from gateway.observe import ResponseObserver
from gateway.plugins.conversations.store import row_message

from .helpers import free_port
from .test_conversations import stored as rows, turns as turn_rows

REFUSAL = "I can't help with that."
CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]}
AUDIO = {"id": "audio_abc", "transcript": "hello there", "data": "UklGRg==", "expires_at": 9999999999}


def _deltas(model: str, index: int) -> list[dict[str, Any]]:
    if model.startswith("refusal"):
        return [{"role": "assistant", "content": None, "refusal": ""}, {"refusal": "I can't "},
                {"refusal": "help with that."}]
    if model.startswith("audio"):
        return [{"role": "assistant", "content": None}, {"audio": {"id": "audio_abc", "transcript": "hello "}},
                {"audio": {"transcript": "there", "data": "UklGRg=="}}, {"audio": {"expires_at": 9999999999}}]
    if model.startswith("empty"):
        return [{"role": "assistant", "content": None}]
    if model.startswith("tools"):
        call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
        return [{"role": "assistant", "content": None, "tool_calls": [call]},
                {"tool_calls": [{"index": 0, "function": {"arguments": "{\"ci"}}]}]
    # plain text; with n > 1 choice 1 is twice as long as choice 0
    words = [f"choice {index} ", "text"] * (1 + index)
    return [{"role": "assistant", "content": ""}] + [{"content": w} for w in words]


def _message(model: str, index: int) -> dict[str, Any]:
    if model.startswith("refusal"):
        return {"role": "assistant", "content": None, "refusal": REFUSAL}
    if model.startswith("audio"):
        return {"role": "assistant", "content": None, "audio": dict(AUDIO)}
    if model.startswith("call"):
        return dict(CALL)
    return {"role": "assistant", "content": f"choice {index} text", "refusal": None}


@contextlib.asynccontextmanager
async def backend() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A chat backend answering in the shape its model name asks for; yields its URL and the request
    bodies it received. ``nousage`` in the name: no usage reported; ``tools`` streams a tool call
    and then only keep-alive comments until the client goes away."""
    seen: list[dict[str, Any]] = []

    async def chat(req: web.Request) -> web.StreamResponse:
        body = await req.json()
        seen.append(body)
        model, n = body["model"], body.get("n") or 1
        usage = "nousage" not in model
        if not body.get("stream"):
            out: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion", "model": model, "choices": [
                {"index": i, "message": _message(model, i), "finish_reason": "stop"} for i in range(n)]}
            if usage:
                out["usage"] = {"prompt_tokens": 11, "completion_tokens": 7 * n, "total_tokens": 11 + 7 * n}
            return web.json_response(out)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(req)

        async def send(d: dict[str, Any]) -> None:
            await resp.write(b"data: " + json.dumps(d).encode() + b"\n\n")

        generated = 0
        for i in range(n):
            for d in _deltas(model, i):
                generated += 1
                await send({"id": "chatcmpl-1", "model": model, "choices": [{"index": i, "delta": d,
                                                                             "finish_reason": None}]})
        if model.startswith("tools"):
            with contextlib.suppress(ConnectionError, RuntimeError):
                for _ in range(200):  # until the client (so the gateway) hangs up
                    await asyncio.sleep(0.05)
                    await resp.write(b": keep-alive\n\n")
            return resp
        for i in range(n):
            await send({"id": "chatcmpl-1", "model": model,
                        "choices": [{"index": i, "delta": {}, "finish_reason": "stop"}]})
        if usage and (body.get("stream_options") or {}).get("include_usage"):
            await send({"id": "chatcmpl-1", "model": model, "choices": [],
                        "usage": {"prompt_tokens": 11, "completion_tokens": 2 * generated,
                                  "total_tokens": 11 + 2 * generated}})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def gateway(make_gateway: Any, url: str, tmp_path: Any) -> Any:
    return await make_gateway([{"name": "conversations"}], upstream={"url": url},
                              database={"url": f"sqlite+aiosqlite:///{tmp_path / 'conv.db'}"})


async def post(g: Any, messages: list[dict[str, Any]], model: str, cid: str | None = None, memory: bool = False,
               **body: Any) -> tuple[dict[str, str], Any]:
    """One request; returns the response headers and the JSON body (or the raw SSE text)."""
    h = {"X-Conversation-Memory": "on" if memory else "off"}
    if cid:
        h["X-Conversation-ID"] = cid
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions", json={"model": model, "messages": messages, **body},
                          headers=h, timeout=aiohttp.ClientTimeout(total=20)) as r:
            assert r.status == 200, await r.text()
            return dict(r.headers), (await r.text() if body.get("stream") else await r.json())


async def test_streamed_refusal_is_stored_counted_replayed_and_matches_when_resent(make_gateway: Any,
                                                                                   tmp_path: Any) -> None:
    async with backend() as (url, seen):
        g = await gateway(make_gateway, url, tmp_path)
        q = {"role": "user", "content": "how do I pick a lock?"}
        h, _ = await post(g, [q], "refusal-nousage", stream=True)
        cid = h["X-Conversation-ID"]
        r = await rows(g, cid)
        assert len(r) == 2 and r[1].status == "complete"
        assert row_message(r[1]) == {"role": "assistant", "content": None, "refusal": REFUSAL}
        assert r[1].tokens == 2 and r[1].tokens_derived  # two refusal deltas, no usage reported
        # memory replays it as the client got it
        await post(g, [{"role": "user", "content": "ok then"}], "plain", cid, memory=True)
        assert seen[-1]["messages"][:2] == [q, {"role": "assistant", "content": None, "refusal": REFUSAL}]
        # the client resends the history as the SDK gives it (refusal kept): the conversation continues
        sent = [q, {"role": "assistant", "content": None, "refusal": REFUSAL},
                {"role": "user", "content": "ok then"}, {"role": "assistant", "content": "choice 0 text"},
                {"role": "user", "content": "and now?"}]
        h, _ = await post(g, sent, "plain", cid)
        assert h["X-Conversation-ID"] == cid and "X-Conversation-Parent-ID" not in h
        assert len(await rows(g, cid)) == 6


async def test_streamed_audio_is_stored_and_resent_by_id(make_gateway: Any, tmp_path: Any) -> None:
    async with backend() as (url, seen):
        g = await gateway(make_gateway, url, tmp_path)
        q = {"role": "user", "content": "say hello"}
        for stream in (True, False):
            h, _ = await post(g, [q], "audio-nousage", stream=stream, modalities=["text", "audio"])
            cid = h["X-Conversation-ID"]
            r = await rows(g, cid)
            assert row_message(r[1]) == {"role": "assistant", "content": None, "audio": AUDIO}
            if stream:
                assert r[1].tokens == 2 and r[1].tokens_derived  # the deltas with transcript / data
            # resent as OpenAI asks (audio by id): the same conversation, not a fork
            sent = [q, {"role": "assistant", "audio": {"id": "audio_abc"}}, {"role": "user", "content": "again"}]
            h, _ = await post(g, sent, "plain", cid)
            assert h["X-Conversation-ID"] == cid and "X-Conversation-Parent-ID" not in h
            r = await rows(g, cid)
            assert len(r) == 4 and row_message(r[1])["audio"] == AUDIO  # what the client got, kept whole
            # memory replays the audio by its id only, not the data
            await post(g, [{"role": "user", "content": "once more"}], "plain", cid, memory=True)
            assert seen[-1]["messages"][1] == {"role": "assistant", "content": None, "audio": {"id": "audio_abc"}}


async def test_memory_never_replays_a_bare_assistant_message(make_gateway: Any, tmp_path: Any) -> None:
    async with backend() as (url, seen):
        g = await gateway(make_gateway, url, tmp_path)
        q = {"role": "user", "content": "hello?"}
        h, _ = await post(g, [q], "empty", stream=True)
        cid = h["X-Conversation-ID"]
        r = await rows(g, cid)
        assert row_message(r[1]) == {"role": "assistant", "content": None}  # stored as received
        await post(g, [{"role": "user", "content": "are you there?"}], "plain", cid, memory=True)
        assert seen[-1]["messages"] == [q, {"role": "user", "content": "are you there?"}]


async def test_memory_leaves_out_a_tool_call_cut_off_mid_stream(make_gateway: Any, tmp_path: Any) -> None:
    async with backend() as (url, seen):
        g = await gateway(make_gateway, url, tmp_path)
        q = {"role": "user", "content": "weather in Paris?"}
        async with aiohttp.ClientSession() as s:
            r = await s.post(g.url + "/v1/chat/completions", json={"model": "tools", "messages": [q], "stream": True},
                             headers={"X-Conversation-Memory": "on"})
            cid = r.headers["X-Conversation-ID"]
            async for line in r.content:
                if b'{\\"ci' in line:
                    break  # the client gives up mid tool call
            r.close()
        for _ in range(100):
            stored = await rows(g, cid)
            if len(stored) == 2:
                break
            await asyncio.sleep(0.05)
        assert stored[1].status == "client_disconnected"
        assert json.loads(stored[1].tool_calls)[0]["function"]["arguments"] == "{\"ci"
        # the next turns replay the question, not the call no result answers
        for text in ("never mind, hello", "still there?"):
            await post(g, [{"role": "user", "content": text}], "plain", cid, memory=True)
            sent = seen[-1]["messages"]
            assert sent[0] == q and not any(m.get("tool_calls") for m in sent)
            assert all(m["role"] != "assistant" or m.get("content") for m in sent)
        # a whole call is replayed with the tool result that answers it
        await post(g, [{"role": "user", "content": "weather in Rome?"}], "call", cid, memory=True)
        result = {"role": "tool", "tool_call_id": "call_9", "content": "sunny"}
        await post(g, [result], "plain", cid, memory=True)
        sent = seen[-1]["messages"]
        assert sent[-2:] == [CALL, result] and sum(bool(m.get("tool_calls")) for m in sent) == 1


async def test_n2_stores_choice_0_share_of_the_tokens(make_gateway: Any, tmp_path: Any) -> None:
    async with backend() as (url, seen):
        g = await gateway(make_gateway, url, tmp_path)
        q = {"role": "user", "content": "two answers please"}
        # JSON: 7 tokens per choice, 14 reported
        h, b = await post(g, [q], "plain", n=2)
        cid = h["X-Conversation-ID"]
        r = await rows(g, cid)
        assert len(b["choices"]) == 2 and len(r) == 2 and row_message(r[1])["content"] == "choice 0 text"
        assert r[1].tokens == 7 and r[1].tokens_derived
        t = await turn_rows(g, cid)
        assert t[0].completion_tokens == 14 and json.loads(t[0].usage)["completion_tokens"] == 14
        # streamed: choice 0 has 2 text deltas, choice 1 has 4; 2 tokens per delta reported (incl. role deltas)
        h, _ = await post(g, [q], "plain", stream=True, n=2)
        cid = h["X-Conversation-ID"]
        r = await rows(g, cid)
        t = await turn_rows(g, cid)
        assert row_message(r[1])["content"] == "choice 0 text"
        assert t[0].completion_tokens == 2 * (3 + 5)
        assert r[1].tokens == round(16 * 2 / 6) and r[1].tokens_derived
        # n = 1 keeps the exact count
        h, _ = await post(g, [q], "plain", stream=True)
        r = await rows(g, h["X-Conversation-ID"])
        assert r[1].tokens == 2 * 3 and not r[1].tokens_derived


LONG_AUDIO = [{"id": "audio_long" if i == 0 else f"audio_other{i}", "transcript": f"word{i} ",
               "data": f"{i:04d}" * 256, "expires_at": 1000 + i} for i in range(400)]


async def test_long_streamed_audio_is_assembled_once_and_stored_whole(make_gateway: Any, tmp_path: Any,
                                                                       monkeypatch: Any) -> None:
    """Hundreds of audio deltas of a KB each, merged as the SDK does (the id as it first came, text
    concatenated, expires_at its last value): stored exactly so. The observer keeps the parts and
    joins them once when read, instead of copying a growing string on every delta."""
    plain = _deltas

    def deltas(model: str, index: int) -> list[dict[str, Any]]:
        if model.startswith("longaudio"):
            return [{"role": "assistant", "content": None}] + [{"audio": dict(a)} for a in LONG_AUDIO]
        return plain(model, index)

    monkeypatch.setitem(globals(), "_deltas", deltas)  # the backend streams these for "longaudio"
    want = {"id": "audio_long", "transcript": "".join(a["transcript"] for a in LONG_AUDIO),
            "data": "".join(a["data"] for a in LONG_AUDIO), "expires_at": LONG_AUDIO[-1]["expires_at"]}
    async with backend() as (url, _):
        g = await gateway(make_gateway, url, tmp_path)
        h, _ = await post(g, [{"role": "user", "content": "talk"}], "longaudio-nousage", stream=True,
                          modalities=["text", "audio"])
        r = await rows(g, h["X-Conversation-ID"])
        assert row_message(r[1]) == {"role": "assistant", "content": None, "audio": want}
        assert r[1].tokens == len(LONG_AUDIO) and r[1].tokens_derived

    obs = ResponseObserver(True, False)
    for a in LONG_AUDIO[:3]:
        obs.feed(b"data: " + json.dumps({"id": "c", "choices": [{"index": 0, "delta": {"audio": a}}]}).encode()
                 + b"\n\n")
    parts = obs.c._audio["data"]  # not yet joined: one part per delta, no copy of what came before
    assert list(parts) == [a["data"] for a in LONG_AUDIO[:3]] and not isinstance(parts, str)
    assert obs.c.audio == {"id": "audio_long", "transcript": "word0 word1 word2 ",
                           "data": "".join(a["data"] for a in LONG_AUDIO[:3]), "expires_at": 1002}
    assert obs.c.assistant_message()["audio"] == obs.c.audio
