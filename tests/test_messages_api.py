"""The Messages API (/v1/messages, served by vLLM, Ollama, llama.cpp's server and others beside the
OpenAI API, and forwarded by the shipped routes): a streamed answer reports its input tokens in
``message_start`` and its output tokens in ``message_delta``; both are counted, by the token limit,
the key's usage, the audit trail and the metrics, as for a plain answer. A stream the client
cancels is charged its input tokens and what was relayed."""
from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import aiohttp
from aiohttp import web

from gateway.estimate import prompt_estimate
from gateway.observe import ResponseObserver

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


CACHED = {"input_tokens": 100, "cache_creation_input_tokens": 2000, "cache_read_input_tokens": 30000,
          "output_tokens": 50}


def test_prompt_cache_reads_and_writes_are_input_tokens() -> None:
    """The Messages API reports them apart from input_tokens (OpenAI's prompt_tokens count them in)."""
    obs = ResponseObserver(False, False)
    obs.feed(json.dumps({"id": "msg_1", "type": "message", "model": "claude-x", "usage": CACHED,
                         "content": [{"type": "text", "text": "hi"}]}).encode())
    obs.finish()
    assert (obs.c.prompt_tokens, obs.c.completion_tokens) == (32100, 50)
    obs = ResponseObserver(True, False)
    obs.feed(ev({"type": "message_start", "message": {"model": "claude-x", "usage": {**CACHED, "output_tokens": 1}}})
             + text("hi") + end(50))
    obs.finish()
    assert (obs.c.prompt_tokens, obs.c.completion_tokens) == (32100, 50)
    # an OpenAI usage is taken as it is; a cache count that is no count is left out
    obs = ResponseObserver(False, False)
    obs.feed(json.dumps({"usage": {"prompt_tokens": 7, "completion_tokens": 1, "cache_read_input_tokens": 5,
                                   "prompt_tokens_details": {"cached_tokens": 5}}}).encode())
    obs.finish()
    assert obs.c.prompt_tokens == 7
    obs = ResponseObserver(False, False)
    obs.feed(json.dumps({"usage": {"input_tokens": 7, "output_tokens": 1, "cache_read_input_tokens": -5}}).encode())
    obs.finish()
    assert obs.c.prompt_tokens == 7
    # a Responses API usage (a total, input_tokens_details) counts its cached tokens in already
    for extra in ({"total_tokens": 29}, {"input_tokens_details": {"cached_tokens": 8}}):
        obs = ResponseObserver(False, False)
        obs.feed(json.dumps({"usage": {"input_tokens": 20, "output_tokens": 9, "cache_read_input_tokens": 8,
                                       **extra}}).encode())
        obs.finish()
        assert obs.c.prompt_tokens == 20


async def test_counting_cuts_errors_and_traces_of_the_messages_api(make_gateway: Any, tmp_path: Any) -> None:
    """count_tokens is charged nothing (and a prompt near the limit is not refused as too large);
    an error event mid-stream is an upstream error in the audit trail; a stream the upstream cuts
    ends with the Messages API's own error event; the trace has its GenAI span, cache tokens in."""
    from .helpers import serve_handler

    async def upstream(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if request.path.endswith("/count_tokens"):
            return web.json_response({"input_tokens": 7000})
        if not body.get("stream"):
            return web.json_response({"id": "msg_2", "type": "message", "role": "assistant", "model": "claude-x",
                                      "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
                                      "usage": CACHED})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(start(100) + b"".join(text(" w") for _ in range(5)))
        if request.headers.get("X-Mode") == "error":
            await resp.write(ev({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
            return resp
        assert request.transport is not None
        request.transport.close()  # the upstream goes away mid-answer
        return resp

    jl = tmp_path / "audit.jsonl"
    runner, url = await serve_handler(upstream)
    try:
        g = await make_gateway([
            {"name": "rate_limit", "config": {"rules": [
                {"name": "t", "limit": "30000/minute", "counts": "tokens", "key_by": ["ip"]}]}},
            {"name": "audit", "config": {"sinks": [{"type": "jsonl", "path": str(jl)}]}},
            {"name": "tracing", "config": {"exporter": {"type": "memory"}}}], upstream={"url": url})
        async with aiohttp.ClientSession() as s:
            big = {"model": "claude-x", "messages": [{"role": "user", "content": "w" * 119_000}]}  # ~29750 tokens
            rem = []
            for _ in range(3):
                async with s.post(g.url + "/v1/messages/count_tokens", json=big) as r:
                    assert r.status == 200, await r.text()
                    assert await r.json() == {"input_tokens": 7000}
                    rem.append(int(r.headers["x-ratelimit-remaining-tokens"]))
                await g.plugin("rate_limit").drain()
            assert rem == [30000, 30000, 30000]
            body = {"model": "claude-x", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "x"}]}
            async with s.post(g.url + "/v1/messages", json=body, headers={"X-Mode": "error", "X-Request-ID": "err-1"}) as r:
                assert r.status == 200
                await r.read()
            async with s.post(g.url + "/v1/messages", json=body, headers={"X-Request-ID": "cut-1"}) as r:
                raw = b""
                with contextlib.suppress(aiohttp.ClientPayloadError):
                    async for piece in r.content.iter_any():
                        raw += piece
            last = raw.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
            assert last.startswith(b"event: error\ndata: "), raw[-300:]
            err = json.loads(last.split(b"data: ", 1)[1])
            assert err["type"] == "error" and err["error"]["type"] == "api_error"
            assert err["error"]["code"] == "upstream_disconnected"
            async with s.post(g.url + "/v1/messages", json={**body, "stream": False, "system": "Be brief."}) as r:
                assert r.status == 200
                await r.read()
        spans = g.plugin("tracing").memory_exporter.get_finished_spans()
        await g.stop()
    finally:
        await runner.cleanup()
    events = {e.get("request_id"): e for e in map(json.loads, jl.read_text().splitlines())}
    assert events["err-1"]["outcome"] == "upstream_error"
    assert events["cut-1"]["outcome"] == "upstream_disconnected"
    chat = [sp.attributes for sp in spans if sp.name == "chat claude-x"]
    assert len(chat) == 3, [sp.name for sp in spans]
    a = chat[-1]
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (32100, 50)
    assert (a["gen_ai.usage.cache_read.input_tokens"], a["gen_ai.usage.cache_creation.input_tokens"]) == (30000, 2000)


async def test_a_caller_without_a_key_is_told_every_header_it_may_use(make_gateway: Any, upstream: Any) -> None:
    g = await make_gateway([{"name": "key_auth"}])
    async with aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/messages", json={"model": "m", "messages": []}) as r:
            assert r.status == 401
            msg = (await r.json())["error"]["message"]
    assert msg == "Missing API key: send it as 'Authorization: Bearer <key>' or in the X-API-Key or api-key header."
