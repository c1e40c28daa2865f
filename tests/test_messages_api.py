"""The Messages API (/v1/messages, served by vLLM, Ollama, llama.cpp's server and others beside the
OpenAI API, and forwarded by the shipped routes): a streamed answer reports its input tokens in
``message_start`` and its output tokens in ``message_delta``; both are counted, by the token limit,
the key's usage, the audit trail and the metrics, as for a plain answer. A stream the client
cancels is charged its input tokens and what was relayed."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from aiohttp import web

from gateway.observe import ResponseObserver
from gateway.plugins.rate_limit.rules import prompt_estimate

from .helpers import ADMIN_TOKEN
from .test_observe import backend

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def ev(o: dict[str, Any]) -> bytes:
    return f"event: {o['type']}\ndata: {json.dumps(o)}\n\n".encode()


def start(input_tokens: int) -> bytes:
    return ev({"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
        "stop_reason": None, "usage": {"input_tokens": input_tokens, "output_tokens": 1}}})


def text(t: str, index: int = 0) -> bytes:
    return ev({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": t}})


def end(output_tokens: int) -> bytes:
    return (ev({"type": "content_block_stop", "index": 0})
            + ev({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                  "usage": {"output_tokens": output_tokens}})
            + ev({"type": "message_stop"}))


def test_a_streamed_message_counts_the_input_of_its_start_and_the_output_of_its_last_delta() -> None:
    raw = (start(5000) + ev({"type": "ping"})
           + ev({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}})
           + ev({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hm"}})
           + ev({"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "s"}})
           + ev({"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}})
           + text("Hi", 1) + text(" there", 1)
           + ev({"type": "content_block_delta", "index": 2,
                 "delta": {"type": "input_json_delta", "partial_json": "{\"a\": 1}"}})
           + end(800))
    obs = ResponseObserver(True, False)
    out = b"".join(obs.feed(raw[i:i + 37]) for i in range(0, len(raw), 37)) + obs.finish()
    assert out == raw  # relayed as it came
    c = obs.c
    assert (c.prompt_tokens, c.completion_tokens, c.usage_stale) == (5000, 800, False)
    assert (c.model, c.response_id, c.content, c.finish_reason, c.done) == ("claude-x", "msg_1", "Hi there",
                                                                            "end_turn", True)
    assert c.deltas == 4  # thinking, two texts, the tool input (a signature is not output)
    # a later delta that reports the input too (newer servers send cumulative counts): it wins
    obs = ResponseObserver(True, False)
    obs.feed(start(10) + text("a") + ev({"type": "message_delta", "delta": {"stop_reason": "max_tokens"},
                                        "usage": {"input_tokens": 12, "output_tokens": 3}}))
    obs.finish()
    assert (obs.c.prompt_tokens, obs.c.completion_tokens, obs.c.finish_reason) == (12, 3, "max_tokens")


def test_odd_typed_events_are_read_without_failing() -> None:
    obs = ResponseObserver(True, False)
    obs.feed(b'data: {"type": {"a": 1}, "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n'
             + ev({"type": "message_delta", "delta": [], "usage": {"output_tokens": "9"}})
             + ev({"type": "content_block_delta", "delta": {"type": ["text_delta"], "text": "x"}})
             + ev({"type": "message_start", "message": {"usage": [1]}}))
    obs.finish()
    assert (obs.c.prompt_tokens, obs.c.completion_tokens, obs.c.deltas) == (3, 2, 0)


def test_a_message_stream_cut_before_its_last_delta_counts_what_was_relayed() -> None:
    obs = ResponseObserver(True, False)
    obs.feed(start(5000) + b"".join(text(" w") for _ in range(40)))
    obs.finish()
    c = obs.c
    assert (c.prompt_tokens, c.completion_tokens, c.done) == (5000, 40, False)


def test_the_estimate_reads_the_system_prompt_and_the_tool_definitions() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}]}
    assert prompt_estimate(base) == 100
    assert prompt_estimate({**base, "system": "s" * 4000}) == 1100
    assert prompt_estimate({**base, "system": [{"type": "text", "text": "s" * 4000}]}) == 1100
    tools = [{"type": "function", "function": {"name": "f", "description": "d" * 4000, "parameters": {}}}]
    assert prompt_estimate({**base, "tools": tools}) >= 1100


async def test_streamed_messages_are_metered_like_plain_ones(make_gateway: Any, tmp_path: Any) -> None:
    """Plain, streamed and cancelled /v1/messages calls: the token limit, the key's usage, the audit
    events and the token metric all count the upstream's input and output tokens."""
    async def messages(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.json_response({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
                                      "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
                                      "usage": {"input_tokens": 500, "output_tokens": 80}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(start(500))
        long = request.headers.get("X-Long") == "1"
        for _ in range(400 if long else 20):
            await resp.write(text(" w"))
            if long:
                await asyncio.sleep(0.01)
        await resp.write(end(80))
        return resp

    jl = tmp_path / "audit.jsonl"
    async with backend(messages, "/v1/messages") as url:
        g = await make_gateway([
            {"name": "key_auth"},
            {"name": "rate_limit", "config": {"estimate_default_max_tokens": 0, "rules": [
                {"name": "t", "limit": "100000/minute", "counts": "tokens", "key_by": ["key"]}]}},
            {"name": "audit", "config": {"sinks": [{"type": "jsonl", "path": str(jl)}]}},
            {"name": "metrics"}], upstream={"url": url})
        async with aiohttp.ClientSession() as s:
            async with s.post(g.admin_url + "/keys", json={"owner": "o"}, headers=ADMIN) as r:
                rec = await r.json()
            auth = {"Authorization": f"Bearer {rec['key']}"}
            body = {"model": "claude-x", "max_tokens": 100, "system": "be brief",
                    "messages": [{"role": "user", "content": "hello"}]}

            async def left() -> int:
                await g.plugin("rate_limit").drain()
                async with s.post(g.url + "/v1/messages", headers=auth, json={**body, "max_tokens": 0}) as r:
                    await r.read()
                    return int(r.headers["x-ratelimit-remaining-tokens"])

            spent = []
            before = await left()  # (this one's own 580 are charged after its headers)
            for stream in (False, True):
                async with s.post(g.url + "/v1/messages", headers=auth, json={**body, "stream": stream}) as r:
                    assert r.status == 200
                    await r.read()
                now = await left()
                spent.append(before - now - 580)  # less the previous probe's charge
                before = now
            assert spent == [580, 580]
            # a stream the client leaves after 10 deltas: its input and what it was sent
            async with s.post(g.url + "/v1/messages", headers={**auth, "X-Long": "1"},
                              json={**body, "stream": True}) as r:
                seen = 0
                async for line in r.content:
                    if line.startswith(b"data: ") and b"text_delta" in line:
                        seen += 1
                        if seen == 10:
                            break
                r.close()
            await asyncio.sleep(0.3)
            now = await left()
            cancelled = before - now - 580
            assert 500 + 10 <= cancelled < 500 + 100, cancelled
            await g.plugin("key_auth").flush_usage()
            async with s.get(g.admin_url + f"/keys/{rec['id']}/usage", headers=ADMIN) as r:
                totals = (await r.json())["totals"]
            assert totals["prompt_tokens"] == 7 * 500  # the three calls and the four probes
            async with s.get(g.admin_url + "/metrics", headers=ADMIN) as r:
                metrics = await r.text()
            assert 'gateway_tokens_total{direction="input",model="claude-x"}' in metrics
        await g.stop()
        events = [json.loads(x) for x in jl.read_text().splitlines()]
        ours = [e for e in events if e.get("path") == "/v1/messages" and e.get("status") == 200
                and e.get("streamed") is not None]
        streamed = [(e["tokens_in"], e["tokens_out"]) for e in ours if e["streamed"]]
        assert streamed[0] == (500, 80)
        assert streamed[1][0] == 500 and 10 <= streamed[1][1] < 100  # the cancelled one
        assert [(e["tokens_in"], e["tokens_out"]) for e in ours if not e["streamed"]][0] == (500, 80)
