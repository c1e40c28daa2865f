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

import pytest
from aiohttp import web

from .helpers import clear_of_a_minute_boundary, serve_handler
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
