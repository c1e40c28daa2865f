"""Memory turns and token accounting: the history the gateway adds to a memory turn is admitted by
rate_limit's token rules and quotas (conversations runs after rate_limit, as in the shipped chain),
and tool definitions, which are in the prompt but in no message, are not counted in the stored
messages' tokens.

The backend is the test's own: it counts prompt tokens as real backends do, the tool definitions
included."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from .helpers import clear_of_a_minute_boundary, serve_handler, until
from .test_conversations_ops import metric
from .test_memory_edges import SYS, chat, count_tokens, stored, user


class Backend:
    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.seen.append(body)
        tools = body.get("tools")
        prompt = count_tokens(body["messages"]) + (len(json.dumps(tools, separators=(",", ":"))) // 4 if tools else 0)
        return web.json_response({
            "id": f"c{len(self.seen)}", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": 3, "total_tokens": prompt + 3}})


@pytest.mark.parametrize("by", ["rule", "quota"])
async def test_a_memory_turn_is_admitted_with_the_history_the_gateway_adds(make_gateway: Any, by: str) -> None:
    await clear_of_a_minute_boundary()
    backend = Backend()
    runner, url = await serve_handler(backend.handle)
    try:
        rl: dict[str, Any] = ({"rules": [{"name": "tpm", "limit": "3000/minute", "counts": "tokens", "key_by": ["ip"]}]}
                              if by == "rule" else {"quotas": {"daily_tokens": 3000}})
        g = await make_gateway([{"name": "rate_limit", "config": rl},
                                {"name": "conversations", "config": {"memory": {"enabled": True}}}],
                               upstream={"url": url})
        big = "word " * 1800  # 9,000 characters: about 2,250 tokens, estimated and counted alike
        status, cid, _ = await chat(g, [user(big)], max_tokens=10)
        assert status == 200 and cid
        # The next turn's own message is a few tokens; the history the gateway sends with it is
        # some 2,250 more, which the 3,000 tokens (less the first turn's) cannot hold.
        status, _, err = await chat(g, [user("And then?")], cid=cid, max_tokens=10)
        assert status == 429, err
        assert err["error"]["code"] == ("rate_limit_exceeded" if by == "rule" else "insufficient_quota")
        assert "history" in err["error"]["message"]
        assert len(backend.seen) == 1  # never forwarded
        assert [m["content"] for m, _ in await stored(g, cid)] == [big, "ok"]
    finally:
        await runner.cleanup()


async def test_a_memory_turn_that_fits_holds_the_estimate_of_what_it_sends(make_gateway: Any) -> None:
    """Admitted on the history too, a running memory turn holds its whole estimate: a second
    request arriving meanwhile gets only what is left beside it."""
    await clear_of_a_minute_boundary()
    backend = Backend()
    gate: list[asyncio.Future[None]] = []

    async def handle(request: web.Request) -> web.Response:
        if len(backend.seen) == 1:  # the second turn (the first memory one) waits to be let go
            fut = asyncio.get_running_loop().create_future()
            gate.append(fut)
            await fut
        return await backend.handle(request)

    runner, url = await serve_handler(handle)
    try:
        g = await make_gateway([{"name": "rate_limit", "config": {"rules": [
            {"name": "tpm", "limit": "6000/minute", "counts": "tokens", "key_by": ["ip"]}]}},
            {"name": "conversations", "config": {"memory": {"enabled": True}}}], upstream={"url": url})
        big = "word " * 1800
        status, cid, _ = await chat(g, [user(big)], max_tokens=10)
        assert status == 200
        turn = asyncio.create_task(chat(g, [user("And then?")], cid=cid, max_tokens=10))
        while not gate:
            await asyncio.sleep(0.02)
        # 6,000 less the first turn's ~2,260 and the running turn's ~2,265: a request of ~2,000 waits
        status, _, err = await chat(g, [user("w " * 4000)], max_tokens=10)
        assert status == 429, err
        assert "held by requests still running" in err["error"]["message"]
        gate[0].set_result(None)
        status, _, _ = await turn
        assert status == 200
        assert [m["role"] for m in backend.seen[1]["messages"]] == ["user", "assistant", "user"]
    finally:
        await runner.cleanup()


async def test_admitted_again_only_when_a_plugin_changed_the_body(make_gateway: Any) -> None:
    """The shipped chain (a token rule, then conversations): a turn without memory, whose body no
    plugin changed, runs no extra hook (nor a span for it); a memory turn with a history does."""
    backend = Backend()
    runner, url = await serve_handler(backend.handle)
    try:
        g = await make_gateway([{"name": "rate_limit", "config": {"rules": [
            {"name": "tpm", "limit": "100000/minute", "counts": "tokens", "key_by": ["ip"]}]}},
            {"name": "conversations"}], upstream={"url": url})
        rl = g.plugin("rate_limit")
        calls: list[Any] = []
        hook = rl.on_forward

        async def counted(ctx: Any) -> Any:
            calls.append(ctx.request_id)
            return await hook(ctx)

        rl.on_forward = counted
        status, cid, _ = await chat(g, [user("Hello")])
        assert status == 200 and calls == []
        status, _, _ = await chat(g, [user("Hello"), {"role": "assistant", "content": "ok"}, user("More")], cid=cid)
        assert status == 200 and calls == []  # (the client sent its history: nothing added)
        async with aiohttp.ClientSession() as s:
            async with s.post(g.url + "/v1/chat/completions", headers={"X-Conversation-ID": cid,
                                                                       "X-Conversation-Memory": "on"},
                              json={"model": "m", "messages": [user("And then?")]}) as r:
                assert r.status == 200
        assert len(calls) == 1
        assert [m["role"] for m in backend.seen[-1]["messages"]] == ["user", "assistant", "user", "assistant", "user"]
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("memory", [False, True])
async def test_a_prompt_another_plugin_makes_larger_is_admitted_on_what_is_sent(make_gateway: Any,
                                                                                memory: bool) -> None:
    """A third-party plugin that adds to the prompt (``rewrites_body``) after rate_limit: the
    request is admitted on what goes upstream, and a refusal names no conversation history."""
    from gateway.plugin import Plugin, registry

    class Pad(Plugin):
        name = "test_pad"
        rewrites_body = True

        async def on_request(self, ctx: Any) -> None:
            body = ctx.json
            ctx.set_json({**body, "messages": [{"role": "system", "content": "Rules. " * 1200}, *body["messages"]]})

    registry.register(Pad)
    backend = Backend()
    runner, url = await serve_handler(backend.handle)
    try:
        conv = [{"name": "conversations", "config": {"memory": {"enabled": True}}}] if memory else []
        g = await make_gateway([{"name": "rate_limit", "config": {"rules": [
            {"name": "tok", "limit": "1500/minute", "counts": "tokens", "key_by": ["ip"]}]}},
            *conv, {"name": "test_pad"}], upstream={"url": url})  # (memory on: a first turn, no history)
        status, _, err = await chat(g, [user("Hi")], max_tokens=10)
        assert status == 429, err
        msg = err["error"]["message"]
        assert "with what a plugin after rate_limit added" in msg and "history" not in msg, msg
        assert backend.seen == []
    finally:
        registry._classes.pop("test_pad", None)
        await runner.cleanup()


async def test_a_memory_turn_with_the_counter_store_down_is_counted_unchecked_once(make_gateway: Any,
                                                                                 redis_server: Any) -> None:
    redis = redis_server()
    backend = Backend()
    runner, url = await serve_handler(backend.handle)
    try:
        g = await make_gateway([{"name": "rate_limit", "config": {
            "storage": redis.url, "storage_timeout": 0.3, "on_store_error": "allow",
            "rules": [{"name": "tpm", "limit": "100000/minute", "counts": "tokens", "key_by": ["ip"]}]}},
            {"name": "conversations", "config": {"memory": {"enabled": True}}}], upstream={"url": url})
        status, cid, _ = await chat(g, [user("word " * 400)], max_tokens=10)
        assert status == 200
        redis.stop()
        before = await metric(g, "gateway_ratelimit_unchecked_total")
        status, _, _ = await chat(g, [user("And then?")], cid=cid, max_tokens=10)
        assert status == 200
        assert len(backend.seen[-1]["messages"]) == 3  # (the history went, and the turn was let through)
        assert await metric(g, "gateway_ratelimit_unchecked_total") == before + 1

        async def charge_tried() -> bool:  # (let through unchecked, its tokens are still charged: here, lost and counted)
            return await metric(g, "gateway_ratelimit_store_errors_total", kind="charge_dropped") >= 1
        await until(charge_tried, timeout=10, what="the memory turn's charge")
    finally:
        await runner.cleanup()


async def test_tool_definitions_are_not_counted_in_the_stored_messages_tokens(make_gateway: Any) -> None:
    backend = Backend()
    runner, url = await serve_handler(backend.handle)
    try:
        g = await make_gateway([{"name": "conversations", "config": {"memory": {"enabled": True}}}],
                               upstream={"url": url})
        tools = [{"type": "function", "function": {
            "name": f"tool_{i}", "description": "Looks things up. " * 25,
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}} for i in range(10)]
        msgs = [SYS, user("What is the weather in Paris?")]
        status, cid, _ = await chat(g, msgs, tools=tools)
        assert status == 200
        rows = await stored(g, cid)
        assert [m["role"] for m, _ in rows] == ["system", "user", "assistant"]
        got = sum(r.tokens for _, r in rows[:2])
        # the backend's prompt_tokens: the two messages (~17) and the tool definitions (~1,200)
        assert backend.seen and abs(got - count_tokens(msgs)) <= 1, got
    finally:
        await runner.cleanup()
